"""The intensity support of a mask change: the scan's own intensities say whether the voxels
adaptation added look like foreground and the ones it dropped look like background."""

from __future__ import annotations

import pytest
import torch

from napari_uda.adaptation.gate import GateOptions, mask_change
from napari_uda.adaptation.intensity import intensity_support, widened_box
from napari_uda.core.inference import class_labels, predict_batches


def square_scan(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, 40, 40) inputs: a bright 20 x 20 square on a dark background, with noise; and
    the square's true mask (1, 40, 40)."""
    generator = torch.Generator().manual_seed(seed)
    truth = torch.zeros(1, 40, 40, dtype=torch.bool)
    truth[:, 10:30, 10:30] = True
    image = truth.float() + 0.15 * torch.randn(1, 40, 40, generator=generator)
    return image[:, None], truth


def test_growing_into_the_bright_square_is_supported_and_sliding_out_of_it_is_not():
    inputs, truth = square_scan()
    under = torch.zeros_like(truth)
    under[:, 13:27, 13:27] = True  # the unadapted model under-segments the square
    grown = intensity_support(inputs, under, truth)
    assert grown is not None and grown > 1.0  # every added voxel is bright
    slid = torch.roll(truth, 8, dims=2)  # the same size, 8 voxels to the side
    moved = intensity_support(inputs, truth, slid)
    assert moved is not None and moved < -1.0  # adds dark voxels, drops bright ones
    assert intensity_support(inputs, truth, truth) is None  # nothing changed


def test_padding_and_channels_do_not_change_the_support():
    inputs, truth = square_scan()
    under = torch.zeros_like(truth)
    under[:, 13:27, 13:27] = True
    alone = intensity_support(inputs, under, truth)
    twice = intensity_support(torch.cat([inputs, inputs], 1), under, truth)
    assert twice == pytest.approx(alone)
    padded = torch.nn.functional.pad(inputs, (0, 8), value=-5.0)  # far end padding
    valid = torch.nn.functional.pad(torch.ones_like(truth), (0, 8)).bool()
    pad_mask = torch.nn.functional.pad(under, (0, 8)), torch.nn.functional.pad(truth, (0, 8))
    assert intensity_support(padded, *pad_mask, valid) == pytest.approx(alone, rel=0.05)


def test_widened_box_covers_the_mask_and_a_margin():
    mask = torch.zeros(1, 50, 50, dtype=torch.bool)
    mask[0, 10:20, 20:40] = True
    box = widened_box(mask, 0.1)
    rows, cols = box[0].any(1).nonzero()[:, 0], box[0].any(0).nonzero()[:, 0]
    # the margin is 10 % of (last - first), rounded down: rows 9 * 0.1 -> 0, columns 19 * 0.1 -> 1
    assert (int(rows.min()), int(rows.max())) == (10, 19)
    assert (int(cols.min()), int(cols.max())) == (19, 40)
    assert not widened_box(torch.zeros_like(mask), 0.1).any()


def test_a_mask_sliding_sideways_on_the_demo_scan_is_not_supported(demo_model, demo_target_slab):
    prepared = demo_model.prepare(demo_target_slab)
    source = predict_batches(demo_model, prepared.inputs, device="cpu")
    valid = prepared.valid_mask()[:, 0]
    slid = torch.roll(source, 10, dims=-1)  # the same brain, 10 pixels to the side
    change = mask_change(source, slid, valid, inputs=prepared.inputs)
    assert change.intensity_support is not None
    assert change.intensity_support < GateOptions().min_intensity_support
    # while growing the demo model's under-segmented brain into the brain is supported
    brain = class_labels(source) > 0
    grown = brain.clone()
    for shift in (-2, 2):
        for dim in (-1, -2):
            grown |= torch.roll(brain, shift, dims=dim)
    support = intensity_support(prepared.inputs, brain, grown, valid)
    assert support is not None and support > change.intensity_support
