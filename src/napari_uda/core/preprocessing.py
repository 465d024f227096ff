"""Preprocessing: intensity normalisation, resampling, 2D slicing and padding, and their inverse.

Every choice lives in :class:`PreprocessingConfig`, which a model bundle stores so that
prediction and adaptation repeat training exactly. :func:`prepare_volume` turns a
:class:`~napari_uda.core.volume.Volume` into network input; :meth:`PreparedVolume.to_source_grid`
maps network output back onto the grid of the file the volume came from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .volume import Volume

Normalization = Literal["percentile_zscore", "zscore", "minmax", "none"]


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessingConfig:
        values = dict(values)
        if values.get("target_spacing") is not None:
            values["target_spacing"] = tuple(float(v) for v in values["target_spacing"])
        if "clip_percentiles" in values:
            values["clip_percentiles"] = tuple(float(v) for v in values["clip_percentiles"])
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
    """Resample a (C, X, Y, Z) array to ``shape`` (trilinear, or nearest for labels)."""
    tensor = torch.as_tensor(array)
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    mode = "nearest" if nearest else "trilinear"
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

    def slices_to_model_grid(self, outputs: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, C, H, W) network output -> (C, X, Y, Z) on the model grid (padding removed)."""
        outputs = torch.as_tensor(outputs)
        height, width = self.padded_hw
        outputs = outputs[:, :, :height, :width]
        # (N, C, H, W) -> (C, N, H, W) -> put N back at slice_axis
        outputs = outputs.permute(1, 0, 2, 3)
        return torch.movedim(outputs, 1, 1 + self.slice_axis)

    def model_grid_to_slices(self, channels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(C, X, Y, Z) on the model grid -> (N, C, H, W) padded like :attr:`inputs`."""
        channels = torch.as_tensor(channels)
        slices = torch.movedim(channels, 1 + self.slice_axis, 1).permute(1, 0, 2, 3)
        height, width = self.inputs.shape[-2:]
        pad = (0, width - slices.shape[-1], 0, height - slices.shape[-2])
        return F.pad(slices, pad)

    def to_source_grid(self, outputs: torch.Tensor | np.ndarray, *, nearest=False) -> np.ndarray:
        """Map (N, C, H, W) slice outputs back to (C, *source.shape) on the source grid."""
        channels = self.slices_to_model_grid(outputs).float()
        channels = resample_channels(channels, self.canonical_shape, nearest=nearest)
        canonical = channels.permute(1, 2, 3, 0).cpu().numpy()  # (X, Y, Z, C)
        back = self.source.from_canonical(canonical).data
        return np.ascontiguousarray(np.moveaxis(back, -1, 0))

    def labels_to_slices(self, labels: Volume) -> torch.Tensor:
        """A label volume on the source grid -> (N, H, W) int64 slices aligned with inputs."""
        if labels.shape != self.source.shape:
            raise ValueError(
                f"labels of shape {labels.shape} do not match the image of shape "
                f"{self.source.shape}"
            )
        canonical = labels.with_data(np.asarray(labels.data)).to_canonical().data
        channels = torch.as_tensor(np.asarray(canonical, dtype=np.float32))[None]
        channels = resample_channels(channels, self.model_shape, nearest=True)
        return self.model_grid_to_slices(channels)[:, 0].round().long()


def prepare_volume(volume: Volume, config: PreprocessingConfig) -> PreparedVolume:
    """Canonical orientation -> normalisation -> resampling -> 2D slices padded to a multiple."""
    canonical = volume.to_canonical()
    data = normalize_intensity(canonical.data, config)
    model_shape = model_grid_shape(canonical.shape, canonical.spacing, config)
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
