"""NIfTI volumes: read, validate, reorient to canonical (RAS+) and back, write atomically.

A :class:`Volume` holds a 3D array together with the affine and the header of the file it came
from. Work inside the package happens on the *canonical* (closest RAS+) orientation; every output
is mapped back onto the grid of the input with :meth:`Volume.from_canonical`, so a written mask
overlays its source scan exactly in any viewer.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.casting import able_int_type
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Orientation (nibabel ``ornt``) of the canonical grid: axes in order, all positive (RAS+).
CANONICAL_ORNT = np.array([[0, 1], [1, 1], [2, 1]])


class VolumeError(ValueError):
    """A file that is not a usable 3D NIfTI volume; the message is one readable line."""


def one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line (its type name if it has no message)."""
    return " ".join(str(error).split()) or type(error).__name__


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; it replaces ``path`` only on success.

    On any failure the temporary file is removed and an existing ``path`` is left untouched.
    The result gets the usual permissions (``0o666`` less the umask). ``suffix`` is the
    temporary file's suffix, for writers that choose the format from it (default none).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
    def _to_canonical_transform(self) -> np.ndarray:
        return ornt_transform(io_orientation(self.affine), CANONICAL_ORNT)

    @property
    def canonical_affine(self) -> np.ndarray:
        """The affine of :meth:`to_canonical`'s grid, without touching the data."""
        transform = self._to_canonical_transform()
        return self.affine @ inv_ornt_aff(transform, self.data.shape[:3])

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """The shape of :meth:`to_canonical`'s grid, without touching the data."""
        shape = [0, 0, 0]
        for axis, (new_axis, _flip) in enumerate(self._to_canonical_transform()):
            shape[int(new_axis)] = self.data.shape[axis]
        return tuple(shape)

    def to_canonical(self) -> Volume:
        """The same volume with axes permuted and flipped to the closest RAS+ orientation."""
        transform = self._to_canonical_transform()
        data = apply_orientation(self.data, transform)
        affine = self.affine @ inv_ornt_aff(transform, self.data.shape[:3])
        return Volume(np.ascontiguousarray(data), affine, self.header, self.path, transform)

    def from_canonical(self, canonical_data: np.ndarray) -> Volume:
        """Map an array on this volume's canonical grid back onto this volume's own grid.

        Extra trailing axes (for example classes) are carried along.
        """
        canonical_shape = self.canonical_shape
        if canonical_data.shape[:3] != canonical_shape:
            raise VolumeError(
                f"canonical data of shape {canonical_data.shape} does not fit the canonical "
                f"grid {canonical_shape}"
            )
        back = ornt_transform(CANONICAL_ORNT, io_orientation(self.affine))
        data = apply_orientation(canonical_data, back)
        return self.with_data(np.ascontiguousarray(data))


def load_volume(path: str | os.PathLike, *, allow_4d_singleton: bool = True) -> Volume:
    """Read a 3D NIfTI file into memory, keeping its affine and header.

    Trailing singleton dimensions (a 4D file with one volume) are dropped unless
    ``allow_4d_singleton`` is False (default True).

    Raises:
        VolumeError: the file is missing, not NIfTI, not 3D, empty, not real-valued, or holds
            NaN/inf values; the message is one line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file")
    if path.is_dir():
        raise VolumeError(f"{path}: is a folder, not a NIfTI file")
    if not is_nifti_path(path):
        raise VolumeError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(str(path), mmap=False)  # read into memory: nothing ties us to the file
    except Exception as error:  # nibabel raises many kinds for foreign or corrupt files
        raise VolumeError(f"{path}: cannot be read as NIfTI ({one_line(error)})") from error
    check_declared_size(path, image.header)  # before a single voxel is read
    problem = affine_problem(image.affine)
    if problem:
        raise VolumeError(f"{path}: {problem}")
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise VolumeError(f"{path}: cannot be read as NIfTI ({one_line(error)})") from error
    while data.ndim > 3 and allow_4d_singleton and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got {data.ndim}D of shape {data.shape}")
    if data.size == 0:
        raise VolumeError(f"{path}: the volume is empty (shape {data.shape})")
    if data.dtype.kind not in "biuf":
        raise VolumeError(f"{path}: holds {data.dtype} values; expected real numbers")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise VolumeError(f"{path}: holds NaN or infinite values")
    header = image.header.copy()
    return Volume(np.asarray(data), image.affine.copy(), header, path)


#: The most a gzip stream can shrink data (deflate's limit is about 1032:1).
MAX_GZIP_RATIO = 1100
#: Voxel axes shorter than this (mm) count as zero length.
MIN_AXIS_MM = 1e-6


def _size(nbytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""  # pragma: no cover


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable`` on Linux), or ``None``
    when the system does not say."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_declared_size(path: Path, header: nib.Nifti1Header) -> None:
    """Refuse a file whose header declares more voxels than the file can hold, or more than
    fits in the available memory, *before* anything is allocated (a 1.4 kB file may declare
    gigabytes).

    An uncompressed file must hold ``vox_offset`` + the declared bytes; a ``.gz`` file cannot
    unpack to more than :data:`MAX_GZIP_RATIO` times its size. In memory, scaled data
    (``scl_slope``) becomes float64.

    Raises:
        VolumeError: one line with the declared shape and the sizes.
    """
    shape = tuple(int(n) for n in header.get_data_shape())
    dtype = np.dtype(header.get_data_dtype())
    voxels = int(np.prod(shape, dtype=object)) if shape else 0
    declared = voxels * dtype.itemsize
    file_size = path.stat().st_size
    what = f"the header declares {'x'.join(map(str, shape))} {dtype} voxels ({_size(declared)})"
    if str(path).lower().endswith(".gz"):
        if declared > MAX_GZIP_RATIO * file_size:
            raise VolumeError(
                f"{path}: {what}, more than a {_size(file_size)} compressed file can hold; "
                "the file is truncated or its header is wrong"
            )
    else:
        offset = int(header.get_data_offset() or 0)
        if offset + declared > file_size:
            raise VolumeError(
                f"{path}: {what} but the file holds {_size(max(file_size - offset, 0))} of data; "
                "the file is truncated or its header is wrong"
            )
    slope, intercept = header.get_slope_inter()
    scaled = (slope not in (None, 1.0)) or (intercept not in (None, 0.0))
    in_memory = voxels * (8 if scaled else dtype.itemsize)
    available = available_memory()
    if available is not None and in_memory > available:
        raise VolumeError(
            f"{path}: reading it needs {_size(in_memory)} of memory but only "
            f"{_size(available)} is available"
        )


def require_room_on_model_grid(
    volume: Volume, shape: Sequence[int], channels: int = 1, spacing: Sequence[float] | None = None
) -> None:
    """Refuse, before resampling, a scan whose copy on the model's grid cannot fit in memory.

    A model with a fine ``target_spacing`` turns a large scan into a much larger grid. The
    estimate is a lower bound: the resampled inputs (``channels`` float32 values per voxel of
    ``shape``) and the interpolation's own copy, so only a grid that certainly cannot fit is
    refused (the network's outputs need more on top).

    Raises:
        VolumeError: one line naming the scan, the grid and the sizes.
    """
    voxels = int(np.prod([int(n) for n in shape], dtype=object))
    needed = 2 * voxels * max(int(channels), 1) * 4
    available = available_memory()
    if available is None or needed <= available:
        return
    name = str(volume.path) if volume.path else "the scan"
    where = (
        f"resampled to the model's {'x'.join(f'{s:g}' for s in spacing)} mm spacing"
        if spacing
        else "on the model's grid"
    )
    raise VolumeError(
        f"{name}: {where} it is {'x'.join(str(int(n)) for n in shape)} voxels, which needs at "
        f"least {_size(needed)} of memory; only {_size(available)} is available"
    )


def affine_problem(affine: np.ndarray) -> str | None:
    """Why a voxel-to-world affine is unusable (non-finite, a voxel axis of zero length, two
    axes in the same direction), in the user's words; ``None`` if it is fine."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return "the affine (voxel to world matrix) holds NaN or infinite values"
    lengths = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    for axis, length in enumerate(lengths):
        if length < MIN_AXIS_MM:
            return (
                f"voxel axis {axis} has zero size in the affine (voxel to world matrix); the "
                "header's pixdim or sform/qform is broken"
            )
    directions = affine[:3, :3] / lengths
    if abs(np.linalg.det(directions)) < 1e-6:
        return (
            "the affine (voxel to world matrix) is singular: two voxel axes point the same "
            "way; the header's sform/qform is broken"
        )
    return None


def require_contrast(volume: Volume, name: str | None = None) -> Volume:
    """``volume`` if its intensities vary; a blank or constant scan has nothing to segment
    (a model would call most of it foreground with full confidence).

    Raises:
        VolumeError: one line naming the scan and its one value.
    """
    data = np.asarray(volume.data)
    low, high = data.min(), data.max()
    if low == high:
        name = name or (str(volume.path) if volume.path else "the scan")
        raise VolumeError(
            f"{name}: every voxel is {float(low):g}; a blank or constant scan has nothing to "
            "segment"
        )
    return volume


#: Integer types a label map is stored as, smallest first (NIfTI readers handle these well).
LABEL_DTYPES = (np.uint8, np.uint16, np.int16, np.int32)


def label_dtype(data: np.ndarray, name: str = "labels") -> np.dtype:
    """The smallest integer type that holds every label (``uint8`` for most masks).

    Raises:
        VolumeError: a label does not fit in 32 bits (it would be stored wrongly, e.g. as 0).
    """
    low, high = (int(np.min(data)), int(np.max(data))) if np.size(data) else (0, 0)
    for dtype in LABEL_DTYPES:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise VolumeError(
        f"{name}: labels from {low} to {high} do not fit in a 32-bit label map; "
        "renumber them (each label is a whole number from -2^31 to 2^31-1)"
    )


def output_dtype(data: np.ndarray) -> np.dtype:
    """The data type a volume is written with when none is asked for.

    The array's own type, except those NIfTI readers handle badly: booleans become uint8,
    64-bit integers the smallest integer type that holds their range, float16 float32.
    """
    dtype = data.dtype
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype in (np.int64, np.uint64):
        if data.size == 0:
            return np.dtype(np.uint8)
        return np.dtype(able_int_type([int(data.min()), int(data.max())]) or np.int64)
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype


def save_volume(
    volume: Volume,
    path: str | os.PathLike,
    *,
    dtype: np.dtype | type | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``volume`` to ``path`` atomically (temporary file in the same folder, then rename).

    The source header is reused (so descriptions, units, qform/sform codes carry over; codes of
    0 become 1, scanner) with the data type set to ``dtype`` (default: :func:`output_dtype` of
    the array), the scaling reset and the display range cleared. If writing fails nothing is
    left behind and an existing file at ``path`` is untouched.

    Raises:
        VolumeError: bad output name, existing file without ``overwrite``, or a write error.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise VolumeError(f"{path}: output must end in .nii or .nii.gz")
    problem = affine_problem(volume.affine)
    if problem:
        raise VolumeError(f"{path}: cannot be written: {problem}")
    if path.exists() and not overwrite:
        raise VolumeError(f"{path}: exists already; choose another name or allow overwriting")
    data = np.asarray(volume.data)
    data = data.astype(dtype if dtype is not None else output_dtype(data), copy=False)
    header = volume.header.copy() if isinstance(volume.header, nib.Nifti1Header) else None
    image_type = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        image = image_type(data, volume.affine, header=header)
        image.header.set_data_dtype(data.dtype)
    except Exception as error:  # nibabel refuses some data types
        raise VolumeError(f"{path}: cannot be written as NIfTI ({one_line(error)})") from error
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"] = image.header["cal_max"] = 0
    qform_code = int(header["qform_code"]) if header is not None else 0
    sform_code = int(header["sform_code"]) if header is not None else 0
    image.set_qform(volume.affine, code=qform_code or 1)
    image.set_sform(volume.affine, code=sform_code or 1)
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"
    try:
        with atomic_output(path, suffix=suffix) as temporary:
            nib.save(image, temporary)
    except OSError as error:
        raise VolumeError(f"{path}: cannot be written ({one_line(error)})") from error
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
