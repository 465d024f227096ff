"""Network input for any model, 2D or 3D, and the way back onto the scan's grid.

:class:`~napari_uda.core.preprocessing.PreparedVolume` serves the product's own 2D U-Nets. Models
brought by users need more: their own axis orientation, a crop, a fixed input size, 3D patches.
This module splits that into three small pieces that compose:

* :class:`ModelGrid`: canonical (RAS+) grid -> the network's orientation -> optional crop ->
  resampling to the model's grid, and the exact way back;
* :class:`SliceTiling` (2D slices along one axis) and :class:`PatchTiling` (3D whole volume or
  overlapping sliding-window patches, stitched with Gaussian or constant weights);
* :class:`VolumetricPrepared`: what :meth:`ModelAdapter.prepare` returns. Like ``PreparedVolume``
  it implements :class:`~napari_uda.core.preprocessing.PreparedInputs` (``source``, ``inputs``
  (N, C, ...), ``valid_mask``, ``to_source_grid``, ``labels_to_inputs``), so the inference and
  adaptation code treat both alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from ..preprocessing import check_labels_shape
from ..volume import Volume, require_room_on_model_grid

Interpolation = Literal["trilinear", "nearest-exact"]
Weighting = Literal["gaussian", "constant"]

RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]])


def resize_channels(
    channels: torch.Tensor, shape: Sequence[int], mode: Interpolation = "trilinear"
) -> torch.Tensor:
    """Resize (C, X, Y, Z) to ``shape``; a no-op when the shape already matches."""
    shape = tuple(int(n) for n in shape)
    if tuple(channels.shape[1:]) == shape:
        return channels
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(channels[None].float(), size=shape, mode=mode, **kwargs)[0]


@dataclass
class ModelGrid:
    """How the canonical grid of a scan becomes the grid a network works on, and back.

    Attributes:
        canonical_shape: shape of the scan in canonical (RAS+) orientation.
        axcodes: orientation of the network's array axes, e.g. ``"RAS"`` (default) or ``"LPS"``.
        crop: box in network axes kept before resizing (``None``: the whole volume).
        model_shape: shape of the (cropped) volume once resized to the model's grid.
        interpolation: mode for images and probabilities, ``"trilinear"`` (default) or
            ``"nearest-exact"`` (what deepbet uses); labels always use ``"nearest-exact"``
            (voxel centres kept, unlike PyTorch's shifted ``"nearest"``).
    """

    canonical_shape: tuple[int, int, int]
    axcodes: str = "RAS"
    crop: tuple[slice, slice, slice] | None = None
    model_shape: tuple[int, int, int] | None = None
    interpolation: Interpolation = "trilinear"

    @property
    def orientation(self) -> np.ndarray:
        """nibabel orientation transform canonical (RAS) -> network axes."""
        return ornt_transform(RAS_ORNT, axcodes2ornt(tuple(self.axcodes.upper())))

    @property
    def oriented_shape(self) -> tuple[int, int, int]:
        axes = self.orientation[:, 0].astype(int)
        shape = [0, 0, 0]
        for source_axis, target_axis in enumerate(axes):
            shape[target_axis] = self.canonical_shape[source_axis]
        return tuple(shape)

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        if self.crop is None:
            return self.oriented_shape
        return tuple(s.stop - s.start for s in self.crop)

    @property
    def _model_shape(self) -> tuple[int, int, int]:
        return self.model_shape or self.cropped_shape

    def model_affine(self, canonical_affine: np.ndarray) -> np.ndarray:
        """Voxel-to-world (mm) matrix of the model grid, given the scan's canonical affine."""
        oriented = canonical_affine @ inv_ornt_aff(self.orientation, self.canonical_shape)
        offset = np.eye(4)
        if self.crop is not None:
            offset[:3, 3] = [s.start for s in self.crop]
        ratio = np.asarray(self.cropped_shape, float) / np.asarray(self._model_shape, float)
        scale = np.eye(4)
        scale[:3, :3] = np.diag(ratio)
        scale[:3, 3] = 0.5 * ratio - 0.5
        return oriented @ offset @ scale

    def orient(self, canonical: np.ndarray) -> np.ndarray:
        """(X, Y, Z, ...) canonical array -> network axes (numpy, trailing axes kept)."""
        return np.ascontiguousarray(apply_orientation(canonical, self.orientation))

    def unorient(self, oriented: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`orient`."""
        back = ornt_transform(axcodes2ornt(tuple(self.axcodes.upper())), RAS_ORNT)
        return np.ascontiguousarray(apply_orientation(oriented, back))

    def to_model(self, channels: torch.Tensor, *, nearest: bool = False) -> torch.Tensor:
        """(C, *oriented_shape) in network axes -> (C, *model_shape), cropped and resized."""
        if self.crop is not None:
            channels = channels[(slice(None), *self.crop)]
        mode = "nearest-exact" if nearest else self.interpolation
        return resize_channels(channels, self._model_shape, mode)

    def from_model(
        self, channels: torch.Tensor, *, nearest: bool = False, fill: Sequence[float] | None = None
    ) -> np.ndarray:
        """(C, *model_shape) -> (C, X, Y, Z) numpy array on the canonical grid.

        Outside the crop each channel takes its value in ``fill`` (default: zeros).
        """
        mode = "nearest-exact" if nearest else self.interpolation
        channels = resize_channels(channels.float(), self.cropped_shape, mode)
        if self.crop is not None:
            num_channels = channels.shape[0]
            values = torch.as_tensor(fill if fill is not None else [0.0] * num_channels)
            full = values.float().view(-1, 1, 1, 1).expand(-1, *self.oriented_shape).clone()
            full[(slice(None), *self.crop)] = channels
            channels = full
        oriented = channels.permute(1, 2, 3, 0).cpu().numpy()  # (x, y, z, C) in network axes
        return np.moveaxis(self.unorient(oriented), -1, 0)


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // max(1, multiple)) * max(1, multiple)


@dataclass
class SliceTiling:
    """2D slices along ``axis`` of the model grid, padded (bottom/right) to ``padded_size``."""

    grid_shape: tuple[int, int, int]
    axis: int
    padded_size: tuple[int, int]

    @classmethod
    def build(cls, grid_shape, axis: int, pad_multiple: int = 16) -> SliceTiling:
        in_plane = [n for i, n in enumerate(grid_shape) if i != axis]
        padded = (_ceil_to(in_plane[0], pad_multiple), _ceil_to(in_plane[1], pad_multiple))
        return cls(tuple(grid_shape), axis, padded)

    @property
    def spatial_dims(self) -> int:
        return 2

    def split(self, channels: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """(C, *grid_shape) -> (N, C, H, W) slices, padded."""
        slices = torch.movedim(channels, 1 + self.axis, 0)
        height, width = slices.shape[-2:]
        pad = (0, self.padded_size[1] - width, 0, self.padded_size[0] - height)
        return F.pad(slices, pad, value=pad_value).contiguous()

    def merge(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) outputs -> (C, *grid_shape), padding removed."""
        in_plane = [n for i, n in enumerate(self.grid_shape) if i != self.axis]
        outputs = outputs[:, :, : in_plane[0], : in_plane[1]]
        return torch.movedim(outputs, 0, 1 + self.axis)


def window_positions(size: int, patch: int, overlap: float) -> list[int]:
    """Start positions of patches of length ``patch`` covering ``size`` with ``overlap``."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch, step))
    return [*starts, size - patch]


def importance_map(patch_size: Sequence[int], weighting: Weighting = "gaussian") -> torch.Tensor:
    """Stitching weights of one patch: a Gaussian (sigma = patch / 8, as nnU-Net and MONAI) or
    ones. The minimum is kept above zero so every voxel has weight."""
    if weighting == "constant":
        return torch.ones(tuple(patch_size))
    weights = torch.ones(())
    for n in patch_size:
        coords = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        sigma = max(n * 0.125, 1e-3)
        weights = weights[..., None] * torch.exp(-(coords**2) / (2 * sigma**2))
    weights = weights / weights.max()
    return weights.clamp_min(1e-3)


@dataclass
class PatchTiling:
    """3D patches of the model grid: the whole (padded) volume or overlapping sliding windows.

    Attributes:
        grid_shape: shape of the model grid.
        patch_size: network input size (D, H, W).
        origins: corner of each patch on the padded grid.
        weighting: ``"gaussian"`` (default) or ``"constant"`` stitching weights.
    """

    grid_shape: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    origins: list[tuple[int, int, int]]
    weighting: Weighting = "gaussian"

    @classmethod
    def build(
        cls,
        grid_shape,
        patch_size: Sequence[int] | None = None,
        *,
        overlap: float = 0.5,
        pad_multiple: int = 16,
        weighting: Weighting = "gaussian",
    ) -> PatchTiling:
        """Whole volume padded to ``pad_multiple`` when ``patch_size`` is None, else windows."""
        grid_shape = tuple(int(n) for n in grid_shape)
        if patch_size is None:
            padded = tuple(_ceil_to(n, pad_multiple) for n in grid_shape)
            return cls(grid_shape, padded, [(0, 0, 0)], "constant")
        patch_size = tuple(int(n) for n in patch_size)
        positions = [window_positions(n, p, overlap) for n, p in zip(grid_shape, patch_size)]
        origins = [(a, b, c) for a in positions[0] for b in positions[1] for c in positions[2]]
        return cls(grid_shape, patch_size, origins, weighting)

    @property
    def spatial_dims(self) -> int:
        return 3

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(max(n, p) for n, p in zip(self.grid_shape, self.patch_size))

    def _windows(self):
        for origin in self.origins:
            yield tuple(slice(o, o + p) for o, p in zip(origin, self.patch_size))

    def split(self, channels: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """(C, *grid_shape) -> (N, C, D, H, W) patches (the grid padded at the far end)."""
        pad = []
        for n, p in zip(reversed(self.grid_shape), reversed(self.padded_shape)):
            pad += [0, p - n]
        padded = F.pad(channels, pad, value=pad_value)
        return torch.stack([padded[(slice(None), *w)] for w in self._windows()]).contiguous()

    def merge(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, C, D, H, W) outputs -> (C, *grid_shape): weighted average where patches overlap."""
        outputs = torch.as_tensor(outputs)
        if len(self.origins) == 1:
            merged = outputs[0]
        else:
            weights = importance_map(self.patch_size, self.weighting)
            merged = torch.zeros((outputs.shape[1], *self.padded_shape), dtype=torch.float32)
            total = torch.zeros(self.padded_shape, dtype=torch.float32)
            for patch, window in zip(outputs, self._windows()):
                merged[(slice(None), *window)] += patch.float() * weights
                total[window] += weights
            merged /= total
        return merged[(slice(None), *(slice(0, n) for n in self.grid_shape))]


Tiling = SliceTiling | PatchTiling


@dataclass
class VolumetricPrepared:
    """A volume as input to a 2D or 3D network, with the exact way back to the scan's grid.

    Attributes:
        source: the volume as read (outputs go onto its grid).
        inputs: float32 (N, C, H, W) slices or (N, C, D, H, W) patches.
        grid: canonical grid <-> model grid.
        tiling: model grid <-> inputs.
        postprocess: optional function applied to (C, X, Y, Z) canonical probabilities by
            :meth:`to_source_grid` (deepbet's connected-component and hole filling).
    """

    source: Volume
    inputs: torch.Tensor
    grid: ModelGrid
    tiling: Tiling
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def num_slices(self) -> int:
        """Number of network inputs (slices or patches)."""
        return int(self.inputs.shape[0])

    @property
    def spatial_dims(self) -> int:
        return self.tiling.spatial_dims

    @property
    def model_shape(self) -> tuple[int, int, int]:
        return self.tiling.grid_shape

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return self.grid.canonical_shape

    def valid_mask(self) -> torch.Tensor:
        """(N, 1, ...) boolean, True where :attr:`inputs` hold the volume and False on padding
        (beyond the model grid, in slices, whole volumes and windows alike)."""
        ones = torch.ones((1, *self.tiling.grid_shape), dtype=torch.uint8)
        return self.tiling.split(ones, pad_value=0).bool()

    def to_model_grid(self, outputs: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Network outputs shaped like :attr:`inputs` -> (C, *model_shape)."""
        return self.tiling.merge(torch.as_tensor(outputs).float())

    def to_source_grid(self, outputs: torch.Tensor | np.ndarray, *, nearest=False) -> np.ndarray:
        """Network outputs shaped like :attr:`inputs` -> (C, *source.shape) on the scan's grid.

        Outside a crop, probabilities (C > 1, not ``nearest``) are background (class 0 = 1) and
        anything else is 0. :attr:`postprocess` applies to probabilities only.
        """
        merged = self.to_model_grid(outputs)
        num_channels = merged.shape[0]
        fill = None
        if num_channels > 1 and not nearest:
            fill = [1.0] + [0.0] * (num_channels - 1)
        canonical = self.grid.from_model(merged, nearest=nearest, fill=fill)
        if self.postprocess is not None and not nearest:
            canonical = self.postprocess(canonical)
        back = self.source.from_canonical(np.moveaxis(canonical, 0, -1)).data
        return np.ascontiguousarray(np.moveaxis(back, -1, 0))

    @property
    def model_affine(self) -> np.ndarray:
        """Voxel-to-world (mm) matrix of the model grid (network axes, cropped, resampled)."""
        return self.grid.model_affine(self.source.to_canonical().affine)

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm of the model grid."""
        return tuple(float(v) for v in np.sqrt((self.model_affine[:3, :3] ** 2).sum(axis=0)))

    def labels_to_inputs(self, labels: Volume | np.ndarray, *, fill: int = 0) -> torch.Tensor:
        """A label map on the source grid -> int64 (N, ...) aligned with :attr:`inputs`.

        ``labels`` (a volume or a bare array) must be voxel for voxel on the image's grid; the
        image's affine orients it. Resampling is nearest-neighbour (every value is kept,
        negative ones too); padding holds ``fill`` (default 0, background).
        """
        data = check_labels_shape(labels, self.source)
        canonical = self.source.with_data(data).to_canonical().data
        oriented = self.grid.orient(np.asarray(canonical, dtype=np.float32))
        channels = self.grid.to_model(torch.from_numpy(oriented)[None], nearest=True)
        return self.tiling.split(channels, pad_value=float(fill))[:, 0].round().long()


def prepare_on_grid(
    volume: Volume,
    *,
    normalize: Callable[[np.ndarray], np.ndarray],
    orientation: str = "RAS",
    spacing: Sequence[float] | None = None,
    spatial_dims: int = 3,
    slice_axis: int = 2,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    pad_multiple: int = 16,
    weighting: Weighting = "gaussian",
) -> VolumetricPrepared:
    """Canonical -> ``orientation`` -> ``normalize`` -> resample to ``spacing`` -> slices/patches.

    Args:
        normalize: intensity normalisation of the oriented float32 volume.
        orientation: axis codes of the network's array axes; default "RAS".
        spacing: voxel size in mm along the network axes, or ``None`` to keep the scan's.
        spatial_dims: 2 (slices along ``slice_axis``) or 3 (patches or the whole volume).
        patch_size: 3D window size; ``None`` feeds the whole volume padded to ``pad_multiple``.
        overlap: fraction of a window shared with its neighbour; default 0.5.
        weighting: how overlapping windows are averaged; default Gaussian.
    """
    canonical = volume.to_canonical()
    grid = ModelGrid(tuple(canonical.shape), orientation)
    oriented = grid.orient(np.asarray(canonical.data, dtype=np.float32))
    spacing_in_network_axes = [0.0, 0.0, 0.0]
    for source_axis, (target_axis, _) in enumerate(grid.orientation):
        spacing_in_network_axes[int(target_axis)] = canonical.spacing[source_axis]
    if spacing is not None:
        grid.model_shape = tuple(
            max(1, round(n * s / t))
            for n, s, t in zip(oriented.shape, spacing_in_network_axes, spacing)
        )
        require_room_on_model_grid(volume, grid.model_shape, 1, spacing)
    data = np.asarray(normalize(oriented), dtype=np.float32)
    channels = grid.to_model(torch.from_numpy(data)[None])
    if spatial_dims == 2:
        tiling: Tiling = SliceTiling.build(channels.shape[1:], slice_axis, pad_multiple)
    else:
        tiling = PatchTiling.build(
            channels.shape[1:],
            patch_size,
            overlap=overlap,
            pad_multiple=pad_multiple,
            weighting=weighting,
        )
    inputs = tiling.split(channels, pad_value=float(channels.min()))
    return VolumetricPrepared(volume, inputs.float(), grid, tiling)
