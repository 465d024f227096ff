"""npe2 writers: napari image and labels layers to NIfTI, on the grid of the scan they came from.

A layer opened by :mod:`napari_uda._reader` (or made by the widgets from such a layer) carries the
source scan's affine and header in its metadata; they are written back unchanged, so the file
overlays the scan in 3D Slicer, ITK-SNAP or FSLeyes. A layer without them is written with an
axis-aligned affine built from its ``scale`` and ``translate``. Writes are atomic
(:func:`~napari_uda.core.volume.save_volume`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .core.volume import Volume, VolumeError, is_nifti_path, save_volume


def affine_from_placement(scale: Sequence[float], translate: Sequence[float]) -> np.ndarray:
    """An axis-aligned 4x4 affine placing voxel ``i`` at ``translate + scale * i``."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.asarray(scale, dtype=float)[-3:])
    affine[:3, 3] = np.asarray(translate, dtype=float)[-3:]
    return affine


def volume_from_layer_data(data: Any, meta: Mapping[str, Any]) -> Volume:
    """A :class:`Volume` from a layer's data and its napari ``meta`` dict (as writers get it).

    Uses ``meta["metadata"]["affine"]`` and ``["nifti_header"]`` when present, else builds the
    affine from ``meta["scale"]`` and ``meta["translate"]`` (default 1 mm, origin 0).
    """
    array = np.asarray(data)
    if array.ndim != 3:
        raise VolumeError(f"a 3D volume is needed; this layer is {array.ndim}D")
    metadata = meta.get("metadata") or {}
    affine = metadata.get("affine")
    if affine is None:
        affine = affine_from_placement(
            meta.get("scale") if meta.get("scale") is not None else (1.0, 1.0, 1.0),
            meta.get("translate") if meta.get("translate") is not None else (0.0, 0.0, 0.0),
        )
    return Volume(array, np.asarray(affine, dtype=float), metadata.get("nifti_header"))


def label_dtype(data: np.ndarray) -> np.dtype:
    """The smallest integer type that holds every label (``uint8`` for most masks)."""
    low, high = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if low >= 0 and high < 2**8:
        return np.dtype(np.uint8)
    if low >= 0 and high < 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _check_path(path: str) -> str:
    if not is_nifti_path(path):
        raise VolumeError(f"{path}: NIfTI files end in .nii or .nii.gz")
    return path


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Write an image layer to ``path`` (float64 is stored as float32)."""
    volume = volume_from_layer_data(data, meta)
    dtype = np.float32 if volume.data.dtype == np.float64 else None
    return [str(save_volume(volume, _check_path(path), dtype=dtype))]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a labels layer to ``path`` as the smallest fitting integer type."""
    volume = volume_from_layer_data(data, meta)
    return [str(save_volume(volume, _check_path(path), dtype=label_dtype(volume.data)))]
