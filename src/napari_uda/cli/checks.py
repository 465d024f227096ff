"""Input checks the subcommands share: scans worth segmenting, label maps with sane labels, and
a reference that fits its image and its model. Each failure is one :class:`CLIError` line."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..core.volume import Volume, load_volume, require_contrast
from . import CLIError

#: The largest label value a label map may hold (``evaluate`` computes one set of metrics per
#: label value up to the largest; 2^40 would never finish).
MAX_LABEL = 999


def load_scan(path: str | os.PathLike) -> Volume:
    """A scan to segment: a readable NIfTI volume whose intensities vary (a blank or constant
    scan is refused instead of being called mostly foreground)."""
    return require_contrast(load_volume(path))


def volume_name(volume: Volume) -> str:
    return str(volume.path) if volume.path is not None else "labels"


def label_array(volume: Volume, max_label: int = MAX_LABEL, why: str = "") -> np.ndarray:
    """The volume's data as integer labels ``0 .. max_label`` (``why``: the option that sets
    the limit, for the message), or a one-line error."""
    data = np.asarray(volume.data)
    name = volume_name(volume)
    if data.dtype.kind == "f" and not np.all(np.mod(data, 1) == 0):
        raise CLIError(f"{name}: is not a label map (non-integer values)")
    if data.min() < 0:
        raise CLIError(f"{name}: is not a label map (negative values)")
    if data.max() > max_label:
        raise CLIError(
            f"{name}: holds label {int(data.max())}; labels go from 0 to {max_label}{why}"
        )
    return data.astype(np.int64)


def same_grid(first: Volume, second: Volume) -> bool:
    """Same shape and (within 0.001 mm) the same affine: voxel i of one is voxel i of the other."""
    return first.shape == second.shape and np.allclose(first.affine, second.affine, atol=1e-3)


def check_reference(reference: Volume, image: Volume, class_names: Sequence[str]) -> np.ndarray:
    """A reference mask for ``image``: on its grid, holding only the model's classes. Returns
    the labels."""
    if not same_grid(reference, image):
        raise CLIError(
            f"{volume_name(reference)}: not on the grid of {volume_name(image)} (shape "
            f"{reference.shape} vs {image.shape}, and the affines must match)"
        )
    classes = len(class_names)
    labels = label_array(reference, max_label=MAX_LABEL)
    if labels.max() >= classes:
        raise CLIError(
            f"{volume_name(reference)}: holds label {int(labels.max())} but the model has "
            f"{classes} classes ({', '.join(class_names)}: labels 0 to {classes - 1})"
        )
    return labels
