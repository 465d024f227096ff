"""Segmentation metrics: overlap, HD95 and surface Dice, spacing-aware and per class.

All distances are in millimetres (the ``spacing`` passed in). Surfaces are the boundary voxels
of a mask (the mask minus its binary erosion with a face-connected structuring element, outside
the array counting as background), and surface distances come from
:func:`scipy.ndimage.distance_transform_edt` with ``sampling=spacing``: the definitions of
MONAI's ``compute_hausdorff_distance`` / ``compute_surface_dice`` and, up to weighting each
boundary voxel equally rather than by its surface area, of DeepMind's ``surface-distance``
(Nikolov et al. 2021).

Empty masks (see ``docs/metrics.md``):

* a ratio whose denominator is zero (for example precision with an empty prediction) is 1.0
  when prediction and reference agree that there is nothing to count and 0.0 otherwise;
* HD95 is 0.0 when both masks are empty and ``nan`` when exactly one is (no distance exists);
* surface Dice is 1.0 when both masks are empty and 0.0 when exactly one is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("dice", "iou", "precision", "recall", "specificity", "hd95", "surface_dice")


def _as_numpy(array) -> np.ndarray:
    """A numpy view of a numpy array or a (possibly GPU) torch tensor."""
    if hasattr(array, "detach"):  # torch tensor, without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _check_pair(prediction: np.ndarray, reference: np.ndarray) -> None:
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction of shape {prediction.shape} and reference of shape "
            f"{reference.shape} are not on the same grid"
        )


def _infer_num_classes(prediction: np.ndarray, reference: np.ndarray) -> int:
    largest = max(int(prediction.max(initial=0)), int(reference.max(initial=0)))
    return max(2, largest + 1)


def _ratio(numerator: float, denominator: float, *, nothing_to_count: bool) -> float:
    """``numerator / denominator``; for a zero denominator 1.0 if both masks agree, else 0.0."""
    if denominator == 0:
        return 1.0 if nothing_to_count else 0.0
    return float(numerator) / float(denominator)


def confusion_matrix(prediction, reference, num_classes: int) -> np.ndarray:
    """(C, C) voxel counts; entry ``[p, r]`` counts voxels predicted ``p`` with reference ``r``.

    Labels outside ``0 .. num_classes - 1`` are ignored.
    """
    prediction, reference = _as_numpy(prediction), _as_numpy(reference)
    _check_pair(prediction, reference)
    prediction = prediction.astype(np.int64, copy=False).ravel()
    reference = reference.astype(np.int64, copy=False).ravel()
    valid = (prediction >= 0) & (prediction < num_classes) & (reference >= 0)
    valid &= reference < num_classes
    if not valid.all():
        prediction, reference = prediction[valid], reference[valid]
    counts = np.bincount(prediction * num_classes + reference, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def dice_per_class(prediction, reference, num_classes: int) -> list[float]:
    """Dice of every class ``0 .. num_classes - 1`` (index ``c`` is class ``c``, 0 background).

    Fast (one pass, no distances), for numpy arrays or torch tensors of class indices on any
    device; a class absent from both gets Dice 1.0.
    """
    if hasattr(prediction, "detach") and hasattr(reference, "detach"):
        import torch  # only reached with tensors, so numpy callers never pay for it

        _check_pair(prediction, reference)
        flat_prediction = prediction.reshape(-1).long()
        flat_reference = reference.reshape(-1).long().to(flat_prediction.device)
        valid = (flat_prediction >= 0) & (flat_prediction < num_classes) & (flat_reference >= 0)
        valid &= flat_reference < num_classes
        flat = flat_prediction[valid] * num_classes + flat_reference[valid]
        counts = torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)
        counts = counts.cpu().numpy()
    else:
        counts = confusion_matrix(prediction, reference, num_classes)
    return dice_from_counts(counts)


def dice_from_counts(counts: np.ndarray) -> list[float]:
    """Dice of every class from a (C, C) confusion matrix (rows predicted, columns reference;
    :func:`confusion_matrix`); a class absent from both gets Dice 1.0."""
    counts = np.asarray(counts)
    true_positive = np.diag(counts).astype(np.float64)
    predicted = counts.sum(axis=1)
    actual = counts.sum(axis=0)
    return [
        _ratio(2 * true_positive[c], predicted[c] + actual[c], nothing_to_count=True)
        for c in range(len(counts))
    ]


def mean_foreground_dice(prediction, reference, num_classes: int) -> float:
    """Mean Dice over classes ``1 .. num_classes - 1``."""
    return float(np.mean(dice_per_class(prediction, reference, num_classes)[1:]))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its face-connected erosion (outside is background)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _crop_to_union(prediction: np.ndarray, reference: np.ndarray):
    """Both masks cropped to their joint bounding box, padded by one background voxel.

    Boundaries and Euclidean distances between them do not change; the work shrinks to the
    structure's size instead of the whole scan's.
    """
    box = ndimage.find_objects((prediction | reference).astype(np.uint8))[0]
    cropped = [np.pad(mask[box], 1, constant_values=False) for mask in (prediction, reference)]
    return cropped[0], cropped[1]


def surface_distances(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each boundary voxel of one mask to the other mask's boundary.

    Returns ``(prediction -> reference, reference -> prediction)``; both masks must be
    non-empty.
    """
    prediction, reference = _crop_to_union(prediction.astype(bool), reference.astype(bool))
    surface_prediction, surface_reference = _surface(prediction), _surface(reference)
    to_reference = ndimage.distance_transform_edt(~surface_reference, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~surface_prediction, sampling=spacing)
    return to_reference[surface_prediction], to_prediction[surface_reference]


def _distance_metrics(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> tuple[float, float]:
    """(HD95, surface Dice at ``tolerance_mm``) of two binary masks, with the empty cases."""
    has_prediction, has_reference = bool(prediction.any()), bool(reference.any())
    if not has_prediction and not has_reference:
        return 0.0, 1.0
    if not (has_prediction and has_reference):
        return float("nan"), 0.0
    forward, backward = surface_distances(prediction, reference, spacing)
    hd95 = max(float(np.percentile(forward, 95)), float(np.percentile(backward, 95)))
    within = np.count_nonzero(forward <= tolerance_mm) + np.count_nonzero(backward <= tolerance_mm)
    return hd95, within / (forward.size + backward.size)


def binary_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    *,
    tolerance_mm: float = 1.0,
) -> dict[str, float]:
    """All metrics of :data:`METRIC_NAMES` for two binary masks on the same grid."""
    prediction = _as_numpy(prediction).astype(bool, copy=False)
    reference = _as_numpy(reference).astype(bool, copy=False)
    _check_pair(prediction, reference)
    true_positive = int(np.count_nonzero(prediction & reference))
    predicted = int(np.count_nonzero(prediction))
    actual = int(np.count_nonzero(reference))
    false_positive = predicted - true_positive
    false_negative = actual - true_positive
    true_negative = prediction.size - predicted - actual + true_positive
    both_empty = predicted == 0 and actual == 0
    both_full = predicted == prediction.size and actual == prediction.size
    hd95, surface_dice = _distance_metrics(prediction, reference, spacing, tolerance_mm)
    return {
        "dice": _ratio(2 * true_positive, predicted + actual, nothing_to_count=both_empty),
        "iou": _ratio(
            true_positive,
            true_positive + false_positive + false_negative,
            nothing_to_count=both_empty,
        ),
        "precision": _ratio(true_positive, predicted, nothing_to_count=both_empty),
        "recall": _ratio(true_positive, actual, nothing_to_count=both_empty),
        "specificity": _ratio(
            true_negative, true_negative + false_positive, nothing_to_count=both_full
        ),
        "hd95": hd95,
        "surface_dice": surface_dice,
    }


def compute_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: tuple[float, ...],
    *,
    num_classes: int | None = None,
    tolerance_mm: float = 1.0,
) -> dict[int, dict[str, float]]:
    """Per-class metrics of a label map against a reference label map on the same grid.

    Args:
        prediction: class indices (numpy array or torch tensor), any number of dimensions.
        reference: class indices on the same grid.
        spacing: voxel size in mm along each array axis (one value per dimension).
        num_classes: classes including background. Default: the largest label found + 1
            (at least 2).
        tolerance_mm: tolerance of the surface Dice in mm. Default 1.0.

    Returns:
        ``{class: {"dice", "iou", "precision", "recall", "specificity", "hd95",
        "surface_dice"}}`` for the foreground classes ``1 .. num_classes - 1``; HD95 in mm.
    """
    prediction, reference = _as_numpy(prediction), _as_numpy(reference)
    _check_pair(prediction, reference)
    spacing = tuple(float(value) for value in spacing)
    if len(spacing) != prediction.ndim:
        raise ValueError(
            f"spacing {spacing} has {len(spacing)} values for a {prediction.ndim}D label map"
        )
    if num_classes is None:
        num_classes = _infer_num_classes(prediction, reference)
    return {
        label: binary_metrics(
            prediction == label, reference == label, spacing, tolerance_mm=tolerance_mm
        )
        for label in range(1, num_classes)
    }


def volume_ml(labels, spacing: Sequence[float], num_classes: int | None = None) -> dict[int, float]:
    """Volume in millilitres (cm³) of each foreground class ``1 .. num_classes - 1``.

    ``num_classes`` defaults to the largest label + 1 (at least 2).
    """
    labels = _as_numpy(labels).astype(np.int64, copy=False)
    if num_classes is None:
        num_classes = _infer_num_classes(labels, labels)
    voxel_ml = float(np.prod([float(value) for value in spacing])) / 1000.0
    counts = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
    return {label: float(counts[label]) * voxel_ml for label in range(1, num_classes)}
