"""npe2 writers: napari image and labels layers to NIfTI, on the grid of the scan they came from.

A layer opened by :mod:`napari_uda._reader` (or made by the widgets from such a layer) carries the
source scan's affine and header in its metadata; they are written back unchanged, so the file
overlays the scan in 3D Slicer, ITK-SNAP or FSLeyes. A layer without them is written with an
axis-aligned affine built from its ``scale`` and ``translate``. Writes are atomic
(:func:`~napari_uda.core.volume.save_volume`). The file a layer was read from (its
``metadata["source_path"]``, which layers made from a scan carry too) is never overwritten.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .core.volume import Volume, VolumeError, is_nifti_path, label_dtype, save_volume


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


class LayerWriteError(OSError):
    """A layer that cannot be written as asked; the message is one line. Not a ``ValueError``:
    napari takes a writer's ``ValueError`` to mean "not my format", tries other writers and
    tells the user only that no writer was found."""


def _check_path(path: str, meta: Mapping[str, Any]) -> str:
    """A NIfTI name (else ``ValueError``: another writer may take it) that is not the file
    the layer, or the scan it was made from, was read from: napari-uda never replaces a scan
    or a mask in place."""
    if not is_nifti_path(path):
        raise VolumeError(f"{path}: NIfTI files end in .nii or .nii.gz")
    source = (meta.get("metadata") or {}).get("source_path")
    if source and Path(path).resolve() == Path(source).resolve():
        raise LayerWriteError(
            f"{path}: is the file this layer was read from (or made from); napari-uda does not "
            "overwrite it: save under another name"
        )
    return path


def _write(path: str, data: Any, meta: dict, dtype_of: Callable[[np.ndarray], Any]) -> list[str]:
    path = _check_path(path, meta)
    try:
        volume = volume_from_layer_data(data, meta)
        return [str(save_volume(volume, path, dtype=dtype_of(volume.data)))]
    except VolumeError as error:
        raise LayerWriteError(str(error)) from None


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Write an image layer to ``path`` (float64 is stored as float32)."""
    return _write(path, data, meta, lambda array: np.float32 if array.dtype == np.float64 else None)


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a labels layer to ``path`` as the smallest integer type that holds every label
    (:func:`~napari_uda.core.volume.label_dtype`; labels beyond 32 bits are refused)."""
    return _write(path, data, meta, lambda array: label_dtype(array, str(path)))
