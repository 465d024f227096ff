"""User corrections: a label map on a scan's grid saying which voxels the user fixed, and to what.

A corrections map has the scan's shape. :data:`NOT_CORRECTED` (-1) marks voxels the user left
alone; any value >= 0 is the user's truth there (a class index of the model). The adaptation
engine maps it onto the network's inputs like a reference mask (nearest neighbour, so -1 stays
-1; padding and other volumes are :data:`NOT_CORRECTED` too) and hands it to the methods as
``AdaptationContext.corrections``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: The value of voxels the user did not correct.
NOT_CORRECTED = -1


def corrections_from_slices(labels: np.ndarray, axis: int, indices: Iterable[int]) -> np.ndarray:
    """A corrections map (int16) that keeps ``labels`` on the slices ``indices`` along ``axis``
    (the slices the user corrected) and is :data:`NOT_CORRECTED` everywhere else."""
    labels = np.asarray(labels)
    corrections = np.full(labels.shape, NOT_CORRECTED, dtype=np.int16)
    index: list[slice | list[int]] = [slice(None)] * labels.ndim
    index[axis] = sorted({int(i) for i in indices})
    corrections[tuple(index)] = labels[tuple(index)]
    return corrections
