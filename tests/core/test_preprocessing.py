"""Preprocessing: normalisation, resampling, slicing, padding and the exact way back."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from volume_factory import ANISOTROPIC, ORIENTATIONS, affine_for, box_mask, head_like

from napari_uda.core.metrics import dice_per_class
from napari_uda.core.preprocessing import (
    PreprocessingConfig,
    normalize_intensity,
    prepare_volume,
    resample_channels,
)
from napari_uda.core.volume import Volume

SHAPE = (14, 16, 12)


def one_hot_slices(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def stored_as(volume_ras: Volume, axcodes) -> Volume:
    """The same physical scan stored with other axis order and directions (nibabel does it)."""
    image = nib.Nifti1Image(volume_ras.data, volume_ras.affine)
    reoriented = image.as_reoriented(
        nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(axcodes)
        )
    )
    return Volume(np.asarray(reoriented.dataobj), reoriented.affine)


@pytest.mark.parametrize("axcodes", ORIENTATIONS[1:])
def test_any_storage_order_gives_the_same_network_input(axcodes):
    image, _ = head_like(SHAPE)
    ras = Volume(image, affine_for(("R", "A", "S")))
    other = stored_as(ras, axcodes)
    assert other.axcodes == axcodes
    config = PreprocessingConfig(target_spacing=(1.5, 1.5, 1.5), pad_multiple=8)

    torch.testing.assert_close(
        prepare_volume(other, config).inputs, prepare_volume(ras, config).inputs
    )


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
@pytest.mark.parametrize("target_spacing", [None, (2.0, 2.0, 2.0), (1.0, 1.0, 1.5)])
@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_labels_go_to_the_model_grid_and_back_exactly(axcodes, target_spacing, slice_axis):
    image, mask = head_like(SHAPE)
    volume = Volume(image, affine_for(axcodes, ANISOTROPIC))
    config = PreprocessingConfig(
        target_spacing=target_spacing, slice_axis=slice_axis, pad_multiple=8
    )
    prepared = prepare_volume(volume, config)

    slices = prepared.labels_to_inputs(volume.with_data(mask))
    assert slices.shape == (prepared.num_slices, *prepared.inputs.shape[-2:])
    # a perfect "prediction" (one-hot of the mask) on the model grid ...
    probabilities = one_hot_slices(slices)

    # ... comes back onto the source grid voxel for voxel, with nearest or linear resampling
    nearest = prepared.to_source_grid(probabilities, nearest=True)
    linear = prepared.to_source_grid(probabilities)
    assert nearest.shape == linear.shape == (2, *SHAPE)
    np.testing.assert_array_equal(nearest.argmax(0), mask)
    np.testing.assert_array_equal(linear.argmax(0), mask)
    np.testing.assert_allclose(linear.sum(0), 1.0, atol=1e-5)


def test_a_coarser_model_grid_still_overlays_the_source():
    mask = box_mask((28, 30, 20), start=(4, 5, 3), stop=(24, 25, 17))
    image = (100.0 + 300.0 * mask).astype(np.float32)
    volume = Volume(image, affine_for(("L", "S", "A"), (1.0, 1.0, 1.2)))
    prepared = prepare_volume(volume, PreprocessingConfig(target_spacing=(2.0, 2.0, 2.0)))
    assert prepared.model_shape == (14, 12, 15)  # canonical (L->R, A, S) axes: 28, 20*1.2/2, 30/2
    back = prepared.to_source_grid(one_hot_slices(prepared.labels_to_inputs(mask))).argmax(0)
    # a 2 mm voxel holds two 1 mm ones, so edges may move by up to one source voxel
    assert dice_per_class(back, mask, 2)[1] > 0.9
    assert np.abs(back.astype(int) - mask).sum() < 0.15 * mask.sum()


@pytest.mark.parametrize("axcodes", [*ORIENTATIONS, ("P", "I", "L")])
def test_model_affine_puts_the_anatomy_where_it_is(axcodes):
    volume_affine = affine_for(axcodes, ANISOTROPIC)
    centre = np.array([6.0, 9.0, 5.0])
    grid = np.indices(SHAPE).astype(float)
    spacing = np.asarray(ANISOTROPIC)[:, None, None, None]
    blob = np.exp(-(((grid - centre[:, None, None, None]) * spacing) ** 2).sum(0) / 40.0)
    volume = Volume(blob.astype(np.float32), volume_affine)
    config = PreprocessingConfig(normalization="none", target_spacing=(1.0, 1.5, 1.0))
    prepared = prepare_volume(volume, config)

    model = prepared.slices_to_model_grid(prepared.inputs)[0].numpy()
    model_centre = (np.indices(model.shape) * model).sum(axis=(1, 2, 3)) / model.sum()
    world = prepared.model_affine @ np.append(model_centre, 1.0)
    np.testing.assert_allclose(world[:3], (volume_affine @ np.append(centre, 1.0))[:3], atol=0.05)
    assert prepared.model_spacing == pytest.approx((1.0, 1.5, 1.0), rel=0.1)
    assert nib.aff2axcodes(prepared.model_affine) == ("R", "A", "S")


def test_slices_are_padded_to_the_multiple_and_cropped_back():
    image, _ = head_like(SHAPE)
    volume = Volume(image, affine_for(("R", "A", "S"), (1.0, 1.0, 1.0)))
    prepared = prepare_volume(volume, PreprocessingConfig(target_spacing=None, pad_multiple=16))
    assert prepared.inputs.shape == (12, 1, 16, 16)
    assert prepared.padded_hw == (14, 16)
    assert prepared.inputs.dtype == torch.float32
    # padding holds the background value, not zeros
    assert torch.all(prepared.inputs[:, :, 14:, :] == prepared.inputs.min())

    model = prepared.slices_to_model_grid(prepared.inputs)
    assert tuple(model.shape) == (1, *SHAPE)
    background = float(prepared.inputs.min())
    torch.testing.assert_close(prepared.model_grid_to_slices(model, background), prepared.inputs)
    assert torch.all(prepared.model_grid_to_slices(model)[:, :, 14:, :] == 0)


@pytest.mark.parametrize(("slice_axis", "expected"), [(0, (14, 16, 12)), (1, (16, 14, 12))])
def test_slice_axis_chooses_the_slicing_direction(slice_axis, expected):
    volume = Volume(head_like(SHAPE)[0], affine_for(("R", "A", "S"), (1.0, 1.0, 1.0)))
    config = PreprocessingConfig(target_spacing=None, slice_axis=slice_axis, pad_multiple=1)
    prepared = prepare_volume(volume, config)
    assert prepared.num_slices == expected[0]
    assert tuple(prepared.inputs.shape[-2:]) == expected[1:]


def test_normalisations():
    rng = np.random.default_rng(0)
    data = np.zeros((10, 10, 10), np.float32)
    data[2:8, 2:8, 2:8] = rng.normal(500.0, 50.0, (6, 6, 6))
    data[5, 5, 5] = 1e6  # an outlier the percentile clip removes

    zscore = normalize_intensity(data, PreprocessingConfig())
    foreground = zscore[2:8, 2:8, 2:8]
    assert foreground.mean() == pytest.approx(0.0, abs=1e-3)
    assert foreground.std() == pytest.approx(1.0, rel=1e-3)
    assert zscore.max() < 5.0

    minmax = normalize_intensity(data, PreprocessingConfig(normalization="minmax"))
    assert minmax.min() == 0.0 and minmax.max() == pytest.approx(1.0)

    plain = normalize_intensity(data, PreprocessingConfig(normalization="none"))
    np.testing.assert_array_equal(plain, data)

    constant = normalize_intensity(np.full((3, 3, 3), 7.0), PreprocessingConfig())
    assert np.isfinite(constant).all()


def test_nearest_resampling_keeps_voxel_centres():
    labels = torch.zeros(1, 1, 1, 4)
    labels[..., 1] = 1
    # 4 -> 6 -> 4 along one axis (factor 1.5): PyTorch's shifted "nearest" would move the label
    up = resample_channels(labels, (1, 1, 6), nearest=True)
    np.testing.assert_array_equal(up[0, 0, 0].numpy(), [0, 1, 1, 0, 0, 0])
    back = resample_channels(up, (1, 1, 4), nearest=True)
    torch.testing.assert_close(back, labels)


def test_config_round_trips_and_rejects_nonsense():
    config = PreprocessingConfig(
        normalization="minmax", clip_percentiles=(1, 99), target_spacing=(1, 1, 2), slice_axis=0
    )
    again = PreprocessingConfig.from_dict(config.to_dict())
    assert again == PreprocessingConfig.from_dict(
        {**config.to_dict(), "target_spacing": [1, 1, 2], "clip_percentiles": [1, 99]}
    )
    assert again.target_spacing == (1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="normalization"):
        PreprocessingConfig(normalization="zscor")
    with pytest.raises(ValueError, match="slice_axis"):
        PreprocessingConfig(slice_axis=3)
    with pytest.raises(ValueError, match="pad_multiple"):
        PreprocessingConfig(pad_multiple=0)
    with pytest.raises(ValueError, match="target_spacing"):
        PreprocessingConfig(target_spacing=(1.0, 0.0, 1.0))


def test_labels_must_match_the_image_grid():
    volume = Volume(head_like(SHAPE)[0], affine_for(("R", "A", "S")))
    prepared = prepare_volume(volume, PreprocessingConfig(target_spacing=None))
    with pytest.raises(ValueError, match="do not match"):
        prepared.labels_to_inputs(box_mask((4, 4, 4), (0, 0, 0), (2, 2, 2)))
