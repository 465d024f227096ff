"""npe2 reader: NIfTI files (``.nii``, ``.nii.gz``) as napari image or labels layers.

The array stays in the file's own voxel order, so predictions made on the scan's grid overlay it
without resampling. Placement in millimetres comes from the affine: the layer's ``scale`` is the
voxel size and its ``translate`` the position of the first voxel, both along the scan's own axes
(for an axis-aligned scan these are the scanner axes, possibly flipped or permuted). napari layers
cannot show a rotation together with 2D slicing, so an *oblique* scan is shown along its own axes
with the right spacing and a warning; the full affine and header go into the layer's metadata
(``metadata["affine"]``, ``metadata["nifti_header"]``) and every writer restores them exactly.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .core.volume import Volume, is_nifti_path, label_dtype, load_volume, looks_like_labels

#: Columns of the direction matrix may deviate this much from a scanner axis before a scan
#: counts as oblique (about 0.06 degrees).
OBLIQUE_TOLERANCE = 1e-3


def napari_get_reader(path: str | list[str]) -> Callable | None:
    """Return :func:`read_nifti` when every path is a NIfTI file, else ``None``."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(is_nifti_path(p) for p in paths):
        return None
    return read_nifti


def read_nifti(path: str | list[str]) -> list[tuple]:
    """Read one or more NIfTI files into napari layer-data tuples."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [volume_layer_data(load_volume(p)) for p in paths]


def layer_name(path: str | os.PathLike) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def placement_from_affine(affine: np.ndarray) -> tuple[tuple, tuple, float]:
    """Layer ``scale`` and ``translate`` (mm, along the voxel axes) from a 4x4 affine.

    Returns ``(scale, translate, obliquity_degrees)``: the voxel size along each array axis, the
    position of voxel (0, 0, 0) expressed along the scan's own axes, and how far (degrees) the
    most tilted voxel axis is from the nearest scanner axis (0 for an axis-aligned scan).
    """
    affine = np.asarray(affine, dtype=float)
    linear, offset = affine[:3, :3], affine[:3, 3]
    spacing = np.sqrt((linear**2).sum(axis=0))
    spacing = np.where(spacing > 0, spacing, 1.0)
    directions = linear / spacing
    left, _, right = np.linalg.svd(directions)  # nearest orthonormal frame (removes shear)
    rotation = left @ right
    translate = rotation.T @ offset
    cosines = np.clip(np.abs(directions).max(axis=0), 0.0, 1.0)
    obliquity = max(math.degrees(math.acos(c)) for c in cosines)
    if obliquity < math.degrees(OBLIQUE_TOLERANCE):
        obliquity = 0.0
    return tuple(float(s) for s in spacing), tuple(float(t) for t in translate), obliquity


def volume_layer_data(volume: Volume, name: str | None = None) -> tuple:
    """A napari ``(data, kwargs, layer_type)`` tuple for ``volume``.

    An integer-valued volume with few distinct non-negative values (also one stored as floats)
    opens as ``labels``
    (:func:`~napari_uda.core.volume.looks_like_labels`), anything else as ``image``.
    """
    name = name or (layer_name(volume.path) if volume.path else "volume")
    scale, translate, obliquity = placement_from_affine(volume.affine)
    if obliquity > 0:
        warnings.warn(
            f"{name}: the scan is oblique (tilted {obliquity:.1f}° from the scanner axes); napari "
            "shows it along its own voxel axes with the right spacing. The full affine is kept "
            "and restored when saving.",
            UserWarning,
            stacklevel=2,
        )
    metadata = {
        "affine": volume.affine.copy(),
        "nifti_header": volume.header,
        "source_path": str(volume.path) if volume.path else None,
        "axcodes": "".join(str(c) for c in volume.axcodes),
    }
    kwargs = {"name": name, "scale": scale, "translate": translate, "metadata": metadata}
    data = volume.data
    if looks_like_labels(data):
        if not np.issubdtype(data.dtype, np.integer):
            data = data.astype(label_dtype(data, name))
        return np.asarray(data), kwargs, "labels"
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    low, high = (float(v) for v in np.percentile(data, (0.5, 99.5)))
    if high > low:
        kwargs["contrast_limits"] = (low, high)
    kwargs["colormap"] = "gray"
    return data, kwargs, "image"
