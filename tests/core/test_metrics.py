"""Metrics against hand-computed values, a brute-force distance computation and MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from napari_uda.core.metrics import (
    METRIC_NAMES,
    binary_metrics,
    compute_metrics,
    confusion_matrix,
    dice_per_class,
    mean_foreground_dice,
    volume_ml,
)

SPACING = (2.0, 2.0, 3.0)
SIDE = 8


def cube(shape=(16, 16, 18), corner=(3, 3, 3), side=SIDE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + side) for c in corner)] = True
    return mask


def shifted_cubes(axis: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    corner = [3, 3, 3]
    reference = cube(corner=corner)
    corner[axis] += offset
    return cube(corner=corner), reference


def boundary_voxel_count(side: int) -> int:
    return side**3 - (side - 2) ** 3


@pytest.mark.parametrize(("axis", "offset"), [(0, 1), (1, 3), (2, 2)])
def test_offset_cubes_match_hand_computed_values(axis, offset):
    prediction, reference = shifted_cubes(axis, offset)
    metrics = compute_metrics(prediction.astype(np.uint8), reference.astype(np.uint8), SPACING)

    assert list(metrics) == [1]
    values = metrics[1]
    assert set(values) == set(METRIC_NAMES)
    overlap = SIDE**2 * (SIDE - offset)
    union = SIDE**2 * (SIDE + offset)
    false_positive = SIDE**3 - overlap
    negatives = prediction.size - SIDE**3
    assert values["dice"] == pytest.approx(2 * overlap / (2 * SIDE**3))
    assert values["iou"] == pytest.approx(overlap / union)
    assert values["precision"] == pytest.approx(overlap / SIDE**3)
    assert values["recall"] == pytest.approx(overlap / SIDE**3)
    assert values["specificity"] == pytest.approx((negatives - false_positive) / negatives)
    # Every boundary voxel lies within offset * spacing of the other cube's boundary and a whole
    # face (over 5 % of the boundary) lies exactly that far away.
    assert values["hd95"] == pytest.approx(offset * SPACING[axis])


@pytest.mark.parametrize(("axis", "offset"), [(0, 2), (2, 2)])
def test_surface_dice_below_and_above_the_offset(axis, offset):
    prediction, reference = shifted_cubes(axis, offset)
    distance = offset * SPACING[axis]

    above = compute_metrics(prediction, reference, SPACING, tolerance_mm=distance)
    assert above[1]["surface_dice"] == pytest.approx(1.0)

    # Below the smallest voxel size only boundary voxels shared by both cubes count: the side
    # walls where the cubes overlap, a square ring of 4 * (side - 1) voxels per layer.
    zero = compute_metrics(prediction, reference, SPACING, tolerance_mm=0.5 * min(SPACING))
    shared = 4 * (SIDE - 1) * (SIDE - offset)
    assert zero[1]["surface_dice"] == pytest.approx(shared / boundary_voxel_count(SIDE))

    just_below = compute_metrics(prediction, reference, SPACING, tolerance_mm=distance - 0.01)
    assert zero[1]["surface_dice"] < just_below[1]["surface_dice"] < 1.0


def brute_force_surface_distances(prediction, reference, spacing):
    """Distances between boundary voxels by checking every pair (no distance transform)."""

    def boundary_points(mask):
        surface = mask & ~ndimage.binary_erosion(mask, border_value=0)
        return np.argwhere(surface) * np.asarray(spacing)

    pairs = cdist(boundary_points(prediction), boundary_points(reference))
    return pairs.min(axis=1), pairs.min(axis=0)


def random_labels(shape, num_classes, seed):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    edges = np.quantile(noise, np.linspace(0, 1, num_classes + 1)[1:-1])
    return np.digitize(noise, edges).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_distances_match_brute_force(seed):
    spacing = (1.5, 0.8, 2.5)
    prediction = random_labels((14, 16, 12), 2, seed) == 1
    reference = random_labels((14, 16, 12), 2, seed + 10) == 1
    forward, backward = brute_force_surface_distances(prediction, reference, spacing)
    tolerance = 2.0

    values = binary_metrics(prediction, reference, spacing, tolerance_mm=tolerance)

    expected_hd95 = max(np.percentile(forward, 95), np.percentile(backward, 95))
    within = (forward <= tolerance).sum() + (backward <= tolerance).sum()
    assert values["hd95"] == pytest.approx(expected_hd95)
    assert values["surface_dice"] == pytest.approx(within / (forward.size + backward.size))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_matches_monai_on_multiclass_blobs():
    monai_metrics = pytest.importorskip("monai.metrics")
    spacing = (1.2, 1.0, 2.0)
    num_classes = 3
    prediction = random_labels((18, 20, 14), num_classes, seed=3)
    reference = random_labels((18, 20, 14), num_classes, seed=4)
    # make the two maps similar, as a real prediction would be
    agree = random_labels((18, 20, 14), 2, seed=5).astype(bool)
    prediction[agree] = reference[agree]

    ours = compute_metrics(
        prediction, reference, spacing, num_classes=num_classes, tolerance_mm=2.0
    )

    def one_hot(labels):
        return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), num_classes).permute(
            3, 0, 1, 2
        )[None]

    y_pred, y = one_hot(prediction), one_hot(reference)
    dice = monai_metrics.compute_dice(y_pred, y, include_background=False)[0]
    iou = monai_metrics.compute_iou(y_pred, y, include_background=False)[0]
    hd95 = monai_metrics.compute_hausdorff_distance(
        y_pred, y, include_background=False, percentile=95, spacing=spacing
    )[0]
    surface = monai_metrics.compute_surface_dice(
        y_pred, y, [2.0] * (num_classes - 1), include_background=False, spacing=spacing
    )[0]
    confusion = monai_metrics.get_confusion_matrix(y_pred, y, include_background=False)
    for index, label in enumerate(range(1, num_classes)):
        values = ours[label]
        assert values["dice"] == pytest.approx(float(dice[index]), abs=1e-6)
        assert values["iou"] == pytest.approx(float(iou[index]), abs=1e-6)
        assert values["hd95"] == pytest.approx(float(hd95[index]), abs=1e-4)
        assert values["surface_dice"] == pytest.approx(float(surface[index]), abs=1e-6)
        for name, monai_name in [
            ("precision", "precision"),
            ("recall", "sensitivity"),
            ("specificity", "specificity"),
        ]:
            expected = monai_metrics.compute_confusion_matrix_metric(
                monai_name, confusion[:, index : index + 1]
            )
            assert values[name] == pytest.approx(float(expected.squeeze()), abs=1e-6)


def test_both_masks_empty_is_perfect_agreement():
    empty = np.zeros((6, 6, 6), dtype=np.uint8)
    values = compute_metrics(empty, empty, SPACING, num_classes=2)[1]
    assert values == {
        "dice": 1.0,
        "iou": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "specificity": 1.0,
        "hd95": 0.0,
        "surface_dice": 1.0,
    }


@pytest.mark.parametrize("empty_side", ["prediction", "reference"])
def test_one_empty_mask_is_total_failure_and_hd95_is_nan(empty_side):
    full = cube(shape=(12, 12, 12), corner=(2, 2, 2), side=4).astype(np.uint8)
    empty = np.zeros_like(full)
    prediction, reference = (empty, full) if empty_side == "prediction" else (full, empty)
    values = compute_metrics(prediction, reference, SPACING)[1]
    assert values["dice"] == 0.0
    assert values["iou"] == 0.0
    assert values["precision"] == 0.0
    assert values["recall"] == 0.0
    assert values["surface_dice"] == 0.0
    assert math.isnan(values["hd95"])
    # specificity stays defined: no false positives, or 4**3 of them among 12**3 negatives
    expected_specificity = 1.0 if empty_side == "prediction" else (12**3 - 4**3) / 12**3
    assert values["specificity"] == pytest.approx(expected_specificity)


def test_identical_masks_are_perfect():
    labels = random_labels((10, 12, 8), 3, seed=7)
    metrics = compute_metrics(labels, labels, (1.0, 1.0, 1.0), tolerance_mm=0.0)
    assert set(metrics) == {1, 2}
    for values in metrics.values():
        assert values["dice"] == values["surface_dice"] == 1.0
        assert values["hd95"] == 0.0


def test_classes_are_inferred_and_absent_classes_reported():
    reference = np.zeros((6, 6), dtype=np.uint8)
    reference[1:3, 1:3] = 3
    prediction = reference.copy()
    metrics = compute_metrics(prediction, reference, (1.0, 1.0))
    assert set(metrics) == {1, 2, 3}
    assert metrics[1]["dice"] == 1.0  # absent from both
    assert metrics[3]["dice"] == 1.0


def test_two_dimensional_spacing_is_used():
    reference = np.zeros((10, 10), dtype=np.uint8)
    reference[2:6, 2:6] = 1
    prediction = np.roll(reference, 2, axis=1)
    assert compute_metrics(prediction, reference, (1.0, 0.5))[1]["hd95"] == pytest.approx(1.0)
    assert compute_metrics(prediction, reference, (1.0, 4.0))[1]["hd95"] == pytest.approx(8.0)


def test_bad_shapes_and_spacing_are_rejected():
    with pytest.raises(ValueError, match="same grid"):
        compute_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        compute_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1))
    with pytest.raises(ValueError, match="same grid"):
        dice_per_class(torch.zeros(4, 4), torch.zeros(2, 8), 2)


def test_dice_per_class_agrees_for_numpy_and_torch():
    prediction = random_labels((12, 10, 9), 3, seed=1)
    reference = random_labels((12, 10, 9), 3, seed=2)
    expected = compute_metrics(prediction, reference, (1, 1, 1), num_classes=3)

    from_numpy = dice_per_class(prediction, reference, 3)
    from_torch = dice_per_class(torch.from_numpy(prediction), torch.from_numpy(reference), 3)

    assert len(from_numpy) == 3
    assert from_numpy == pytest.approx(from_torch)
    assert from_numpy[1] == pytest.approx(expected[1]["dice"])
    assert from_numpy[2] == pytest.approx(expected[2]["dice"])
    background = 2 * np.sum((prediction == 0) & (reference == 0))
    background /= np.sum(prediction == 0) + np.sum(reference == 0)
    assert from_numpy[0] == pytest.approx(background)
    assert mean_foreground_dice(prediction, reference, 3) == pytest.approx(
        (expected[1]["dice"] + expected[2]["dice"]) / 2
    )


def test_confusion_matrix_counts_and_ignores_out_of_range_labels():
    prediction = np.array([0, 1, 1, 2, 5])
    reference = np.array([0, 1, 0, 2, 1])
    counts = confusion_matrix(prediction, reference, 3)
    assert counts.sum() == 4
    assert counts[1, 0] == 1 and counts[1, 1] == 1 and counts[2, 2] == 1 and counts[0, 0] == 1


def test_volume_in_millilitres():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[:5, :4, :2] = 1
    labels[9, 9, 9] = 2
    volumes = volume_ml(labels, SPACING, num_classes=3)
    voxel_ml = 2.0 * 2.0 * 3.0 / 1000
    assert volumes == pytest.approx({1: 40 * voxel_ml, 2: voxel_ml})
    assert volume_ml(labels, SPACING) == pytest.approx(volumes)
