"""Paired random spatial transforms (2D and 3D) for source training and consistency training.

Mean Teacher (Perone et al. 2019) feeds the student a transformed image ``g(x)`` and compares
its prediction with the teacher's prediction of the *untransformed* image, transformed the same
way: ``student(g(x))`` vs ``g(teacher(x))``. Both sides must use exactly the same ``g``. Here a
transform is one affine matrix per sample (rotation, isotropic scale, translation and optional
flips, drawn in voxel space so that rotations stay rigid on non-square slices) applied with
:func:`torch.nn.functional.affine_grid` / :func:`~torch.nn.functional.grid_sample`, which work
on (B, C, H, W) and (B, C, D, H, W) tensors alike.

Typical use::

    transform = SpatialAugmentation().sample(images, generator=generator)
    student_logits = model(transform(images))
    target = transform(teacher_probabilities)  # same matrices
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SpatialAugmentation:
    """Ranges of the random affine transforms.

    Attributes:
        rotation_degrees: rotation drawn uniformly in +-this, about every axis in 3D. Default 15.
        max_translation: shift drawn uniformly in +-this fraction of the image size per axis.
            Default 0.1.
        scale_range: isotropic zoom factor drawn uniformly in this range. Default (0.9, 1.1).
        flip_probability: probability of mirroring each spatial axis. Default 0 (left-right
            flips change anatomy's handedness; enable for symmetric structures).
    """

    rotation_degrees: float = 15.0
    max_translation: float = 0.1
    scale_range: tuple[float, float] = (0.9, 1.1)
    flip_probability: float = 0.0

    def sample(
        self, like: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> PairedTransform:
        """Draw one transform per sample of ``like`` (B, C, *spatial) on ``like``'s device."""
        spatial_shape = tuple(like.shape[2:])
        theta = random_affine(self, like.shape[0], spatial_shape, generator=generator)
        return PairedTransform(theta.to(device=like.device, dtype=torch.float32), spatial_shape)


@dataclass
class PairedTransform:
    """A batch of affine matrices (B, D, D+1) in normalised coordinates (``affine_grid``'s
    convention: output coordinates -> input sampling coordinates), applied identically to
    every tensor it is called on."""

    theta: torch.Tensor
    spatial_shape: tuple[int, ...]

    def __call__(
        self, tensor: torch.Tensor, *, mode: str = "bilinear", padding_mode: str = "border"
    ) -> torch.Tensor:
        """Resample ``tensor`` (B, C, *spatial) with the transform; ``mode`` "bilinear"
        (trilinear in 3D) for images and probabilities, "nearest" for labels."""
        return warp(tensor, self.theta, mode=mode, padding_mode=padding_mode)


def warp(
    tensor: torch.Tensor,
    theta: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Resample a (B, C, *spatial) tensor with affine matrices ``theta`` (B, D, D+1).

    Integer tensors (labels) are resampled with nearest neighbour and keep their dtype.
    """
    if theta.shape[0] != tensor.shape[0]:
        raise ValueError(f"{theta.shape[0]} transforms for a batch of {tensor.shape[0]}")
    integer = not torch.is_floating_point(tensor)
    source = tensor.float() if integer else tensor
    grid = F.affine_grid(theta.to(source), list(source.shape), align_corners=False)
    out = F.grid_sample(
        source,
        grid,
        mode="nearest" if integer else mode,
        padding_mode=padding_mode,
        align_corners=False,
    )
    return out.round().to(tensor.dtype) if integer else out


def random_affine(
    augmentation: SpatialAugmentation,
    batch_size: int,
    spatial_shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random affine matrices (B, D, D+1) for ``affine_grid``, drawn on the CPU.

    Rotation, scale, flips and translation are drawn in voxel units about the image centre and
    converted to normalised coordinates, so a rotation is rigid even on non-square slices.
    """
    dims = len(spatial_shape)
    if dims not in (2, 3):
        raise ValueError(f"spatial transforms need 2 or 3 spatial dimensions, not {dims}")

    def uniform(*shape: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    max_angle = math.radians(augmentation.rotation_degrees)
    if dims == 2:
        rotation = _rotation_2d(uniform(batch_size, low=-max_angle, high=max_angle))
    else:
        angles = uniform(batch_size, 3, low=-max_angle, high=max_angle)
        rotation = _rotation_3d(angles)
    low, high = augmentation.scale_range
    scale = uniform(batch_size, low=low, high=high)
    # sampling an image zoomed by s means reading input coordinates divided by s
    linear = rotation / scale[:, None, None]
    flips = uniform(batch_size, dims, low=0.0, high=1.0) < augmentation.flip_probability
    linear = linear * torch.where(flips, -1.0, 1.0).to(linear)[:, None, :]
    shift = uniform(batch_size, dims, low=-1.0, high=1.0) * 2 * augmentation.max_translation

    # voxel -> normalised coordinates: u = p / half_size (affine_grid orders axes x=W, y=H, z=D)
    half = torch.tensor([size / 2 for size in reversed(spatial_shape)], dtype=torch.float64)
    normalised = linear * half[None, None, :] / half[None, :, None]
    return torch.cat([normalised, shift[:, :, None]], dim=2).float()


def identity_affine(batch_size: int, dims: int) -> torch.Tensor:
    """Identity matrices (B, D, D+1): the transform that changes nothing."""
    eye = torch.eye(dims, dims + 1)
    return eye.expand(batch_size, dims, dims + 1).clone()


def _rotation_2d(angle: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def _rotation_3d(angles: torch.Tensor) -> torch.Tensor:
    """Rotations about the three axes, composed (angles: (B, 3) in radians)."""
    matrices = []
    for axis in range(3):
        cos, sin = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        matrix = torch.eye(3, dtype=angles.dtype).repeat(angles.shape[0], 1, 1)
        i, j = [a for a in range(3) if a != axis]
        matrix[:, i, i], matrix[:, i, j] = cos, -sin
        matrix[:, j, i], matrix[:, j, j] = sin, cos
        matrices.append(matrix)
    return matrices[0] @ matrices[1] @ matrices[2]
