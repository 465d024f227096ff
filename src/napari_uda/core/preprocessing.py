"""Preprocessing: intensity normalisation, resampling, 2D slicing and padding, and their inverse.

Every choice lives in :class:`PreprocessingConfig`, which a model bundle stores so that
prediction and adaptation repeat training exactly. :func:`prepare_volume` turns a
:class:`~napari_uda.core.volume.Volume` into network input; :meth:`PreparedVolume.to_source_grid`
maps network output back onto the grid of the file the volume came from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .fields import (
    MAX_PATCH_SIDE,
    known_keys,
    mapping,
    one_of,
    percentile_pair,
    spacing_mm,
    whole_number,
)
from .volume import Volume, require_room_on_model_grid

Normalization = Literal["percentile_zscore", "zscore", "minmax", "none"]
NORMALIZATIONS: tuple[str, ...] = ("percentile_zscore", "zscore", "minmax", "none")


@dataclass
class PreprocessingConfig:
    """How a volume becomes network input.

    Attributes:
        normalization: ``"percentile_zscore"`` (clip to ``clip_percentiles`` of the non-zero
            voxels, then zero mean / unit variance; default), ``"zscore"``, ``"minmax"``
            (to [0, 1] after clipping) or ``"none"``.
        clip_percentiles: lower and upper percentile for clipping. Default (0.5, 99.5).
        target_spacing: voxel size in mm the model works at (canonical RAS axes), or ``None``
            to keep the scan's own spacing. Default (2.0, 2.0, 2.0).
        slice_axis: canonical axis the 2D slices are taken along (0 sagittal, 1 coronal,
            2 axial). Default 2.
        pad_multiple: slices are padded to a multiple of this (2 ** U-Net depth). Default 16.
    """

    normalization: Normalization = "percentile_zscore"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    target_spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    slice_axis: int = 2
    pad_multiple: int = 16

    def __post_init__(self) -> None:
        """Every field's type and range, a bad one named (:mod:`napari_uda.core.fields`)."""
        self.normalization = one_of(self.normalization, "normalization", NORMALIZATIONS)
        self.clip_percentiles = percentile_pair(self.clip_percentiles, "clip_percentiles")
        if self.target_spacing is not None:
            self.target_spacing = spacing_mm(self.target_spacing, "target_spacing")
        self.slice_axis = one_of(self.slice_axis, "slice_axis", (0, 1, 2))
        self.pad_multiple = whole_number(
            self.pad_multiple, "pad_multiple", minimum=1, maximum=MAX_PATCH_SIDE
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessingConfig:
        values = mapping(values, "preprocessing")
        known_keys(values, "preprocessing", {f.name for f in fields(cls)})
        return cls(**values)


def normalize_intensity(data: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """Normalise intensities as ``config.normalization`` says; returns float32."""
    data = np.asarray(data, dtype=np.float32)
    if config.normalization == "none":
        return data
    foreground = data[data > data.min()] if np.any(data > data.min()) else data.ravel()
    if config.normalization in ("percentile_zscore", "minmax"):
        low, high = np.percentile(foreground, config.clip_percentiles)
        data = np.clip(data, low, high)
        foreground = np.clip(foreground, low, high)
        if config.normalization == "minmax":
            return ((data - low) / max(float(high - low), 1e-8)).astype(np.float32)
    mean, std = float(foreground.mean()), float(foreground.std())
    return ((data - mean) / max(std, 1e-8)).astype(np.float32)


def resample_channels(array: np.ndarray | torch.Tensor, shape: tuple[int, ...], *, nearest=False):
    """Resample a (C, X, Y, Z) array to ``shape`` (trilinear, or nearest for labels).

    Both modes keep the volume's extent: voxel centres sit at ``(i + 0.5) * old / new - 0.5``
    (``align_corners=False``; ``nearest-exact``, not PyTorch's shifted ``nearest``), so
    resampling there and back puts labels where they were.
    """
    tensor = torch.as_tensor(array)
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    mode = "nearest-exact" if nearest else "trilinear"
    kwargs = {} if nearest else {"align_corners": False}
    resampled = F.interpolate(tensor[None].float(), size=tuple(shape), mode=mode, **kwargs)[0]
    return resampled


def model_grid_shape(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], config: PreprocessingConfig
) -> tuple[int, int, int]:
    """Shape of the canonical volume once resampled to ``config.target_spacing``."""
    if config.target_spacing is None:
        return tuple(shape)
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, config.target_spacing))


@runtime_checkable
class PreparedInputs(Protocol):
    """What every model adapter's ``prepare`` returns (2D :class:`PreparedVolume`, 2D or 3D
    :class:`~napari_uda.core.models.volumetric.VolumetricPrepared`, third-party ones).

    ``inputs`` is a float32 tensor (N, C, H, W) of slices or (N, C, D, H, W) of patches or whole
    volumes; the other members map to and from it, so inference and adaptation never need to
    know which kind they hold.
    """

    source: Volume
    inputs: torch.Tensor

    def valid_mask(self) -> torch.Tensor:
        """(N, 1, ...) boolean like :attr:`inputs`: True on the volume, False on padding."""
        ...

    def to_source_grid(self, outputs, *, nearest: bool = False) -> np.ndarray:
        """Network outputs shaped like :attr:`inputs` (C channels) -> (C, *source.shape)."""
        ...

    def labels_to_inputs(self, labels: Volume | np.ndarray, *, fill: int = 0) -> torch.Tensor:
        """A label map on the source grid -> int64 (N, ...) aligned with :attr:`inputs`
        (nearest neighbour, so every label value, negative ones too, is kept); padding
        holds ``fill``."""
        ...


def check_labels_shape(labels: Volume | np.ndarray, source: Volume) -> np.ndarray:
    """The label array of ``labels``; ``ValueError`` if it is not on ``source``'s grid."""
    data = np.asarray(labels.data if isinstance(labels, Volume) else labels)
    if data.shape != source.shape:
        raise ValueError(
            f"labels of shape {data.shape} do not match the image of shape {source.shape}"
        )
    return data


@dataclass
class PreparedVolume:
    """A volume as network input, with what it takes to map predictions back.

    Attributes:
        source: the volume as read (its grid is where outputs go).
        inputs: float32 tensor (N, 1, H, W) of padded slices.
        canonical_shape: shape of the volume in canonical orientation.
        model_shape: shape of the canonical volume resampled to the model's spacing.
        slice_axis: canonical axis the slices were taken along.
        padded_hw: (H, W) before padding, to crop predictions.
    """

    source: Volume
    inputs: torch.Tensor
    canonical_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    slice_axis: int
    padded_hw: tuple[int, int]
    config: PreprocessingConfig = field(default_factory=PreprocessingConfig)

    @property
    def num_slices(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def model_affine(self) -> np.ndarray:
        """Voxel-to-world (mm) matrix of the model grid (canonical axes, resampled)."""
        ratio = np.asarray(self.canonical_shape, float) / np.asarray(self.model_shape, float)
        index_map = np.eye(4)
        index_map[:3, :3] = np.diag(ratio)
        index_map[:3, 3] = 0.5 * ratio - 0.5
        return self.source.canonical_affine @ index_map

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm of the model grid (close to ``config.target_spacing``)."""
        return tuple(float(v) for v in np.sqrt((self.model_affine[:3, :3] ** 2).sum(axis=0)))

    def slices_to_model_grid(self, outputs: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, C, H, W) network output -> (C, X, Y, Z) on the model grid (padding removed)."""
        outputs = torch.as_tensor(outputs)
        height, width = self.padded_hw
        outputs = outputs[:, :, :height, :width]
        # (N, C, H, W) -> (C, N, H, W) -> put N back at slice_axis
        outputs = outputs.permute(1, 0, 2, 3)
        return torch.movedim(outputs, 1, 1 + self.slice_axis)

    def model_grid_to_slices(
        self, channels: torch.Tensor | np.ndarray, value: float = 0.0
    ) -> torch.Tensor:
        """(C, X, Y, Z) on the model grid -> (N, C, H, W) padded like :attr:`inputs`.

        Padding holds ``value`` (default 0, the background label; :attr:`inputs` is padded with
        the image's minimum).
        """
        channels = torch.as_tensor(channels)
        slices = torch.movedim(channels, 1 + self.slice_axis, 1).permute(1, 0, 2, 3)
        height, width = self.inputs.shape[-2:]
        pad = (0, width - slices.shape[-1], 0, height - slices.shape[-2])
        return F.pad(slices, pad, value=value)

    def to_source_grid(self, outputs: torch.Tensor | np.ndarray, *, nearest=False) -> np.ndarray:
        """Map (N, C, H, W) slice outputs back to (C, *source.shape) on the source grid."""
        channels = self.slices_to_model_grid(outputs).float()
        channels = resample_channels(channels, self.canonical_shape, nearest=nearest)
        canonical = channels.permute(1, 2, 3, 0).cpu().numpy()  # (X, Y, Z, C)
        back = self.source.from_canonical(canonical).data
        return np.ascontiguousarray(np.moveaxis(back, -1, 0))

    def valid_mask(self) -> torch.Tensor:
        """(N, 1, H, W) boolean: True inside each slice, False on its padding."""
        mask = torch.zeros(self.inputs.shape[0], 1, *self.inputs.shape[-2:], dtype=torch.bool)
        mask[:, :, : self.padded_hw[0], : self.padded_hw[1]] = True
        return mask

    def labels_to_inputs(self, labels: Volume | np.ndarray, *, fill: int = 0) -> torch.Tensor:
        """A label map on the source grid -> (N, H, W) int64 slices aligned with :attr:`inputs`.

        ``labels`` (a volume or a bare array) must be voxel for voxel on the image's grid; the
        image's affine is used to orient it. Resampling is nearest-neighbour (every value is
        kept, negative ones too); the padding holds ``fill`` (default 0, background).
        """
        data = check_labels_shape(labels, self.source)
        canonical = self.source.with_data(data).to_canonical().data
        channels = torch.as_tensor(np.asarray(canonical, dtype=np.float32))[None]
        channels = resample_channels(channels, self.model_shape, nearest=True)
        return self.model_grid_to_slices(channels, value=float(fill))[:, 0].round().long()


def prepare_volume(volume: Volume, config: PreprocessingConfig) -> PreparedVolume:
    """Canonical orientation -> normalisation -> resampling -> 2D slices padded to a multiple."""
    canonical = volume.to_canonical()
    data = normalize_intensity(canonical.data, config)
    model_shape = model_grid_shape(canonical.shape, canonical.spacing, config)
    require_room_on_model_grid(volume, model_shape, 1, config.target_spacing)
    resampled = resample_channels(torch.from_numpy(data)[None], model_shape)
    slices = torch.movedim(resampled, 1 + config.slice_axis, 1).permute(1, 0, 2, 3)
    height, width = slices.shape[-2:]
    multiple = max(1, config.pad_multiple)
    padded_h = -(-height // multiple) * multiple
    padded_w = -(-width // multiple) * multiple
    background = float(resampled.min())
    slices = F.pad(slices, (0, padded_w - width, 0, padded_h - height), value=background)
    return PreparedVolume(
        source=volume,
        inputs=slices.contiguous().float(),
        canonical_shape=tuple(canonical.shape),
        model_shape=tuple(model_shape),
        slice_axis=config.slice_axis,
        padded_hw=(int(height), int(width)),
        config=config,
    )
