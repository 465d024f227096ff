"""The corrections loss, the anchor region and the correction step (without the engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_uda.adaptation.base import AdaptationContext
from napari_uda.adaptation.corrections import (
    NOT_CORRECTED,
    CorrectionSettings,
    CorrectionStep,
    anchor_region,
    corrected_fit,
    corrected_voxel_loss,
    split_correction_settings,
)
from napari_uda.adaptation.targets import TargetSet
from napari_uda.core.inference import predict_batches


def test_loss_counts_corrected_voxels_only():
    labels = torch.full((1, 4, 4), NOT_CORRECTED)
    labels[0, 0] = torch.tensor([0, 1, 1, 0])
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    terms = corrected_voxel_loss(logits, labels)
    sum(terms.values()).backward()
    assert torch.allclose(terms["corrections_ce"], torch.tensor(np.log(2.0), dtype=torch.float32))
    assert logits.grad[:, :, 1:].abs().sum() == 0  # uncorrected rows get no gradient
    assert logits.grad[:, :, 0].abs().sum() > 0


def test_loss_without_corrected_voxel_is_zero_with_a_gradient():
    logits = torch.randn(2, 2, 3, 3, requires_grad=True)
    terms = corrected_voxel_loss(logits, torch.full((2, 3, 3), NOT_CORRECTED))
    total = sum(terms.values())
    assert float(total.detach()) == 0.0
    total.backward()  # does not fail


def test_corrected_voxel_loss_on_gathered_voxels_equals_the_masked_whole_input():
    """The loss gathers the corrected voxels: values and gradients equal cross-entropy with
    ignore_index and the masked soft Dice over the whole input."""
    from napari_uda.adaptation.losses import soft_dice_loss

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 5, generator=generator).requires_grad_(True)
    labels = torch.randint(0, 3, (2, 6, 5), generator=generator)
    labels[torch.rand(2, 6, 5, generator=generator) > 0.3] = NOT_CORRECTED
    terms = corrected_voxel_loss(logits, labels)
    sum(terms.values()).backward()
    gradient = logits.grad.clone()
    logits.grad = None
    corrected = labels != NOT_CORRECTED
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=NOT_CORRECTED)
    dice = soft_dice_loss(torch.softmax(logits, 1), labels, corrected)
    (ce + dice).backward()
    torch.testing.assert_close(terms["corrections_ce"], ce)
    torch.testing.assert_close(terms["corrections_dice"], dice)
    torch.testing.assert_close(gradient, logits.grad)


def test_fit_is_dice_on_corrected_voxels():
    labels = torch.full((1, 2, 4), NOT_CORRECTED)
    labels[0, 0] = torch.tensor([0, 0, 1, 1])
    logits = torch.zeros(1, 2, 2, 4)
    logits[0, 1, 0, 2:] = 5.0  # right on the corrected row
    logits[0, 1, 1, :] = 5.0  # wrong elsewhere, not counted
    assert corrected_fit(logits, labels) == pytest.approx(1.0)
    assert corrected_fit(logits, torch.full((1, 2, 4), NOT_CORRECTED)) is None


def test_anchor_region_is_confident_and_far_from_corrections():
    corrections = torch.full((9, 5, 5), NOT_CORRECTED)
    corrections[4] = 1
    probabilities = torch.full((9, 2, 5, 5), 0.5)
    probabilities[:, 0] = 0.95
    probabilities[:, 1] = 0.05
    probabilities[0, :, 0, 0] = 0.5  # unsure voxel
    region = anchor_region(corrections, probabilities, confidence=0.9, margin=2)
    assert not region[2:7].any()  # within two slices of the corrected slice
    assert region[7:].all() and region[1].all()
    assert not region[0, 0, 0] and region[0, 1, 1]


def test_split_correction_settings():
    mine, rest = split_correction_settings({"corrections_weight": 2.0, "epochs": 3})
    assert mine.corrections_weight == 2.0 and rest == {"epochs": 3}
    assert isinstance(mine, CorrectionSettings)


def _context(model, volume, corrections):
    targets = TargetSet.prepare(model, volume)
    inputs, valid = targets.inputs, targets.valid_mask
    frozen = model.clone()
    frozen.network.eval()
    initial = predict_batches(frozen, inputs, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    context = AdaptationContext(
        model=model.clone(),
        source_model=frozen,
        target_inputs=inputs,
        device=torch.device("cpu"),
        generator=generator,
        initial_probabilities=initial,
        valid_mask=valid,
    )
    # as the engine maps them: padding added by the preparation is never corrected
    context.corrections = targets.labels_on_inputs(corrections, fill=NOT_CORRECTED)
    return context


def test_step_fits_the_corrections_and_restores_modes(tiny_model, tiny_target, tiny_reference):
    truth = np.asarray(tiny_reference.data).astype(np.int16)
    corrections = np.full(truth.shape, NOT_CORRECTED, dtype=np.int16)
    corrections[..., 10] = truth[..., 10]
    context = _context(tiny_model, tiny_target, corrections)
    network = context.model.network
    network.train()
    flags = [p.requires_grad for p in network.parameters()]
    settings = CorrectionSettings(corrections_learning_rate=3e-3)
    step = CorrectionStep(context, settings)
    losses = [step.step(torch.arange(4), 8)["corrections_ce"] for _ in range(15)]
    assert losses[-1] < losses[0]
    assert step.last_fit is not None and step.last_fit > 0.8
    assert network.training and [p.requires_grad for p in network.parameters()] == flags
    assert step.report()["corrections"]["corrected_items"] >= 1


def test_step_refuses_corrections_with_no_corrected_voxel(tiny_model, tiny_target):
    empty = np.full(tiny_target.shape, NOT_CORRECTED, dtype=np.int16)
    context = _context(tiny_model, tiny_target, empty)
    with pytest.raises(ValueError, match="no corrected voxel"):
        CorrectionStep(context, CorrectionSettings())


def test_rows_is_a_view_for_consecutive_rows_and_a_copy_otherwise():
    from napari_uda.adaptation.corrections import rows

    volume = torch.arange(24).reshape(4, 6)
    view = rows(volume, torch.tensor([1, 2]))
    assert torch.equal(view, volume[1:3]) and view.data_ptr() == volume[1].data_ptr()
    picked = rows(volume, torch.tensor([3, 0]))
    assert torch.equal(picked, volume[[3, 0]]) and picked.data_ptr() != volume.data_ptr()
    assert rows(volume, torch.tensor([], dtype=torch.long)).shape == (0, 6)


def test_class_precision_counts_the_starting_labels_on_corrected_voxels():
    from napari_uda.adaptation.corrections import class_precision

    probabilities = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.1, 0.8, 0.4, 0.9]]).reshape(1, 2, 2, 2)
    corrections = torch.tensor([[[0, 0], [NOT_CORRECTED, 1]]])  # labels 0, 1, -, 1 predicted
    assert class_precision(corrections, probabilities) == [1.0, 0.5]
    assert class_precision(torch.full((1, 2, 2), NOT_CORRECTED), probabilities) == [None, None]
