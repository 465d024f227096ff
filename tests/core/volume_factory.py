"""Helpers imported by the core tests: affines in any orientation and small synthetic scans."""

from __future__ import annotations

import nibabel as nib
import numpy as np

#: Orientations the issue asks for.
ORIENTATIONS = [("R", "A", "S"), ("L", "A", "S"), ("L", "S", "A")]
ANISOTROPIC = (2.0, 2.0, 3.0)


def affine_for(
    axcodes: tuple[str, str, str],
    spacing: tuple[float, float, float] = ANISOTROPIC,
    origin: tuple[float, float, float] = (-20.0, 14.0, 31.0),
) -> np.ndarray:
    """A voxel-to-world matrix whose array axes point along ``axcodes`` with ``spacing`` mm."""
    orientation = nib.orientations.axcodes2ornt(axcodes)
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, (world_axis, direction) in enumerate(orientation):
        affine[int(world_axis), axis] = direction * spacing[axis]
    affine[:3, 3] = origin
    return affine


def box_mask(shape: tuple[int, int, int], start=(3, 4, 2), stop=(11, 14, 9)) -> np.ndarray:
    """A uint8 mask holding one box, placed off-centre so flips and swaps show."""
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = 1
    return mask


def head_like(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float32 image (bright box on a dim noisy background) and its uint8 mask."""
    rng = np.random.default_rng(seed)
    mask = box_mask(shape)
    image = 100.0 + 10.0 * rng.standard_normal(shape) + 300.0 * mask
    return image.astype(np.float32), mask
