"""Paired spatial transforms: the same transform hits the student's input and the teacher's
prediction, in 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from napari_uda.core.augment import (
    SpatialAugmentation,
    identity_affine,
    random_affine,
    warp,
)

STRONG = SpatialAugmentation(
    rotation_degrees=30, max_translation=0.15, scale_range=(0.8, 1.2), flip_probability=0.5
)


def _pixelwise_linear(channels_in: int, channels_out: int, dims: int) -> torch.nn.Module:
    conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(channels_in, channels_out, 1)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    return conv.requires_grad_(False)


@pytest.mark.parametrize("shape", [(4, 2, 24, 40), (3, 2, 12, 16, 20)])
def test_transform_commutes_with_an_equivariant_function(shape):
    """transform(f(x)) == f(transform(x)) for a pixel-wise f, with the same matrices."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=generator)
    f = _pixelwise_linear(shape[1], 3, len(shape) - 2)
    transform = STRONG.sample(images, generator=generator)

    aligned = (transform(f(images)) - f(transform(images))).abs().max()
    assert aligned < 1e-4

    other = STRONG.sample(images, generator=generator)  # a different draw does not align
    misaligned = (other(f(images)) - f(transform(images))).abs().mean()
    assert misaligned > 0.1


def test_nearest_mode_commutes_with_any_pixelwise_function():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 32, 32, generator=generator)
    transform = STRONG.sample(images, generator=generator)
    f = torch.sigmoid
    left = transform(f(images), mode="nearest")
    right = f(transform(images, mode="nearest"))
    assert torch.allclose(left, right)


def test_identity_changes_nothing():
    images = torch.randn(2, 3, 16, 24)
    assert torch.allclose(warp(images, identity_affine(2, 2)), images, atol=1e-5)
    volumes = torch.randn(1, 1, 8, 12, 16)
    assert torch.allclose(warp(volumes, identity_affine(1, 3)), volumes, atol=1e-5)


@pytest.mark.parametrize("spatial_shape", [(32, 64), (16, 32, 48)])
def test_rotations_are_rigid_on_non_square_grids(spatial_shape):
    rotate_only = SpatialAugmentation(rotation_degrees=45, max_translation=0, scale_range=(1, 1))
    theta = random_affine(rotate_only, 8, spatial_shape, generator=torch.Generator().manual_seed(2))
    dims = len(spatial_shape)
    half = torch.tensor([n / 2 for n in reversed(spatial_shape)])
    in_voxels = half[:, None] * theta[:, :, :dims] / half[None, :]
    eye = torch.eye(dims).expand_as(in_voxels)
    assert torch.allclose(in_voxels @ in_voxels.transpose(1, 2), eye, atol=1e-5)
    assert not torch.allclose(in_voxels, eye, atol=1e-2)  # it did rotate


def test_a_disk_stays_round_on_a_wide_slice():
    height, width = 48, 96
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disk = (((y - 24.0) ** 2 + (x - 40.0) ** 2) < 100).float()[None, None].repeat(6, 1, 1, 1)
    rotate_only = SpatialAugmentation(rotation_degrees=60, max_translation=0, scale_range=(1, 1))
    moved = rotate_only.sample(disk, generator=torch.Generator().manual_seed(3))(disk)
    for mask in moved[:, 0]:
        weights = mask / mask.sum()
        cy, cx = (weights * y).sum(), (weights * x).sum()
        var_y = (weights * (y - cy) ** 2).sum()
        var_x = (weights * (x - cx) ** 2).sum()
        assert abs(float(mask.sum()) - float(disk[0, 0].sum())) < 0.05 * float(disk[0, 0].sum())
        assert abs(float(var_y / var_x) - 1.0) < 0.1


def test_translation_moves_content_by_the_drawn_fraction():
    image = torch.zeros(1, 1, 40, 40)
    image[..., 18:22, 18:22] = 1.0
    shift_only = SpatialAugmentation(rotation_degrees=0, max_translation=0.25, scale_range=(1, 1))
    transform = shift_only.sample(image, generator=torch.Generator().manual_seed(4))
    moved = transform(image)[0, 0]
    y, x = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    cx = float((moved * x).sum() / moved.sum())
    cy = float((moved * y).sum() / moved.sum())
    tx, ty = transform.theta[0, :, 2].tolist()  # normalised; output p samples input p + t
    assert cx == pytest.approx(19.5 - tx * 20, abs=0.3)
    assert cy == pytest.approx(19.5 - ty * 20, abs=0.3)


def test_flips_and_labels():
    flip_all = SpatialAugmentation(
        rotation_degrees=0, max_translation=0, scale_range=(1, 1), flip_probability=1.0
    )
    labels = torch.randint(0, 3, (2, 1, 10, 14))
    transform = flip_all.sample(labels)
    flipped = transform(labels)
    assert flipped.dtype == labels.dtype
    assert torch.equal(flipped, labels.flip(-1).flip(-2))


def test_the_same_seed_draws_the_same_transform():
    images = torch.zeros(3, 1, 16, 16)
    first = STRONG.sample(images, generator=torch.Generator().manual_seed(5)).theta
    again = STRONG.sample(images, generator=torch.Generator().manual_seed(5)).theta
    assert torch.equal(first, again)
