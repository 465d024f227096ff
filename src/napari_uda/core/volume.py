"""NIfTI volumes: read, validate, reorient to canonical (RAS+) and back, write atomically.

A :class:`Volume` holds a 3D array together with the affine and the header of the file it came
from. Work inside the package happens on the *canonical* (closest RAS+) orientation; every output
is mapped back onto the grid of the input with :meth:`Volume.from_canonical`, so a written mask
overlays its source scan exactly in any viewer.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A file that is not a usable 3D NIfTI volume; the message is one readable line."""


def is_nifti_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a NIfTI suffix (``.nii`` or ``.nii.gz``)."""
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


@dataclass
class Volume:
    """A 3D image or label volume on a voxel grid given by ``affine`` (voxel -> mm, RAS).

    Attributes:
        data: 3D array (x, y, z) in the file's voxel order.
        affine: 4x4 voxel-to-world matrix in mm.
        header: the NIfTI header the volume was read with, or ``None`` for a new volume.
        path: where the volume was read from, if anywhere.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: Path | None = None
    _canonical_ornt: np.ndarray | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Orientation codes, for example ``('R', 'A', 'S')``."""
        return nib.aff2axcodes(self.affine)

    def with_data(self, data: np.ndarray) -> Volume:
        """A volume on the same grid (same affine and header) holding ``data``."""
        if data.shape[:3] != self.data.shape[:3]:
            raise VolumeError(f"shape {data.shape} does not match the volume's grid {self.shape}")
        return Volume(data, self.affine.copy(), self.header, None, self._canonical_ornt)

    # -- orientation --------------------------------------------------------------------------
    def to_canonical(self) -> Volume:
        """The same volume with axes permuted and flipped to the closest RAS+ orientation."""
        ornt = io_orientation(self.affine)
        target = np.array([[0, 1], [1, 1], [2, 1]])
        transform = ornt_transform(ornt, target)
        data = apply_orientation(self.data, transform)
        affine = self.affine @ inv_ornt_aff(transform, self.data.shape[:3])
        return Volume(np.ascontiguousarray(data), affine, self.header, self.path, transform)

    def from_canonical(self, canonical_data: np.ndarray) -> Volume:
        """Map an array on this volume's canonical grid back onto this volume's own grid."""
        canonical = self.to_canonical()
        if canonical_data.shape[:3] != canonical.data.shape[:3]:
            raise VolumeError(
                f"canonical data of shape {canonical_data.shape} does not fit the canonical "
                f"grid {canonical.data.shape}"
            )
        back = ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), io_orientation(self.affine))
        data = apply_orientation(canonical_data, back)
        return self.with_data(np.ascontiguousarray(data))


def load_volume(path: str | os.PathLike, *, allow_4d_singleton: bool = True) -> Volume:
    """Read a 3D NIfTI file, keeping its affine and header.

    Raises:
        VolumeError: the file is missing, not NIfTI, not 3D, or holds NaN/inf values.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file")
    if path.is_dir():
        raise VolumeError(f"{path}: is a folder, not a NIfTI file")
    if not is_nifti_path(path):
        raise VolumeError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many kinds for foreign or corrupt files
        raise VolumeError(f"{path}: cannot be read as NIfTI ({error})") from error
    if data.ndim == 4 and allow_4d_singleton and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got {data.ndim}D of shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise VolumeError(f"{path}: holds NaN or infinite values")
    header = image.header.copy()
    return Volume(np.asarray(data), image.affine.copy(), header, path)


def save_volume(
    volume: Volume,
    path: str | os.PathLike,
    *,
    dtype: np.dtype | type | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``volume`` to ``path`` atomically (temporary file in the same folder, then rename).

    The source header is reused (so descriptions, units, qform/sform codes carry over) with the
    data type set to ``dtype`` (default: the array's own) and the scaling reset.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise VolumeError(f"{path}: output must end in .nii or .nii.gz")
    if path.exists() and not overwrite:
        raise VolumeError(f"{path}: exists already; choose another name or allow overwriting")
    data = np.asarray(volume.data)
    if dtype is not None:
        data = data.astype(dtype)
    header = volume.header.copy() if volume.header is not None else None
    if header is not None and not isinstance(header, nib.Nifti1Header):
        header = None
    image = nib.Nifti1Image(data, volume.affine, header=header)
    image.header.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if header is not None:
        image.set_qform(volume.affine, code=int(header["qform_code"]) or 1)
        image.set_sform(volume.affine, code=int(header["sform_code"]) or 1)
    else:
        image.set_qform(volume.affine, code=1)
        image.set_sform(volume.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def looks_like_labels(data: np.ndarray, max_labels: int = 32) -> bool:
    """Whether an array looks like a label map: integer-valued with few distinct values."""
    if data.dtype == bool:
        return True
    if np.issubdtype(data.dtype, np.floating):
        sample = data.ravel()[:: max(1, data.size // 200_000)]
        if not np.all(np.mod(sample, 1) == 0):
            return False
    elif not np.issubdtype(data.dtype, np.integer):
        return False
    sample = data.ravel()[:: max(1, data.size // 200_000)]
    values = np.unique(sample)
    return len(values) <= max_labels and values.min() >= 0
