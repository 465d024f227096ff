"""Per-slice QA numbers (no Qt): entropy, voxels changed by the adaptation, Dice vs reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SliceTable:
    """One row per slice along ``axis``.

    Attributes:
        axis: the array axis the slices are taken along.
        entropy_before / entropy_after: mean normalised entropy of each slice (0..1).
        changed: voxels whose label differs between before and after.
        dice_before / dice_after: mean foreground Dice against the reference per slice (NaN
            where neither the prediction nor the reference has foreground), or None.
    """

    axis: int
    entropy_before: np.ndarray
    entropy_after: np.ndarray
    changed: np.ndarray
    dice_before: np.ndarray | None = None
    dice_after: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.changed)


def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a != axis)


def slice_dice(
    prediction: np.ndarray, reference: np.ndarray, axis: int, num_classes: int
) -> np.ndarray:
    """Mean Dice over the foreground classes present in each slice (NaN: none present)."""
    axes = _other_axes(prediction.ndim, axis)
    scores = []
    for label in range(1, num_classes):
        predicted, expected = prediction == label, reference == label
        overlap = np.logical_and(predicted, expected).sum(axis=axes)
        total = predicted.sum(axis=axes) + expected.sum(axis=axes)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores.append(np.where(total > 0, 2.0 * overlap / total, np.nan))
    stacked = np.stack(scores)
    present = ~np.isnan(stacked)
    sums = np.where(present, stacked, 0.0).sum(axis=0)
    counts = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def slice_table(
    before_labels: np.ndarray,
    after_labels: np.ndarray,
    entropy_before: np.ndarray,
    entropy_after: np.ndarray,
    axis: int,
    *,
    reference: np.ndarray | None = None,
    num_classes: int | None = None,
) -> SliceTable:
    """Per-slice numbers of a run along array ``axis``."""
    axes = _other_axes(after_labels.ndim, axis)
    if num_classes is None:
        num_classes = max(2, int(max(before_labels.max(), after_labels.max())) + 1)
    table = SliceTable(
        axis=axis,
        entropy_before=np.asarray(entropy_before, dtype=np.float64).mean(axis=axes),
        entropy_after=np.asarray(entropy_after, dtype=np.float64).mean(axis=axes),
        changed=(np.asarray(before_labels) != np.asarray(after_labels)).sum(axis=axes),
    )
    if reference is not None:
        reference = np.asarray(reference)
        table.dice_before = slice_dice(np.asarray(before_labels), reference, axis, num_classes)
        table.dice_after = slice_dice(np.asarray(after_labels), reference, axis, num_classes)
    return table
