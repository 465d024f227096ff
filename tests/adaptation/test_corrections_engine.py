"""Corrections through the engine: they raise Dice on real shifts (the demo bundle, a 3D
TorchScript model), every method combines with them or says why not, the kept checkpoint and
the corrected voxels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from napari_uda.adaptation.base import available_methods
from napari_uda.adaptation.engine import AdaptationError, adapt
from napari_uda.adaptation.rounds import keep_corrections
from napari_uda.core.corrections import NOT_CORRECTED, corrections_from_slices
from napari_uda.core.metrics import dice_per_class

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core"))
from scripted_factory import base_spec, save_model, synthetic_head, train_tiny


def _dice(labels, truth) -> float:
    return dice_per_class(np.asarray(labels, np.int64), np.asarray(truth, np.int64), 2)[1]


def _axial(volume) -> int:
    return int(np.argmax(np.abs(volume.affine[2, :3])))


def test_corrections_raise_dice_on_the_demo_shift(
    demo_model, demo_target_slab, demo_reference_slab
):
    truth = np.asarray(demo_reference_slab.data).astype(np.int16)
    axis = _axial(demo_target_slab)
    corrected = [8, 16, 24]
    corrections = corrections_from_slices(truth, axis, corrected)
    settings = {"epochs": 2, "steps_per_epoch": 5}
    result = adapt(
        demo_model,
        demo_target_slab,
        "corrections",
        settings,
        reference=demo_reference_slab,
        corrections=corrections,
        device="cpu",
    )
    before, after = result.reference_dice_before[0], result.reference_dice_after[0]
    assert after > before + 0.1, (before, after)
    # the gain spreads beyond the corrected slices: untouched slices improve too
    others = [i for i in range(truth.shape[axis]) if i not in corrected]
    untouched = np.take(result.prediction.labels, others, axis=axis)
    unadapted = np.take(result.initial_prediction.labels, others, axis=axis)
    reference = np.take(truth, others, axis=axis)
    assert _dice(untouched, reference) > _dice(unadapted, reference) + 0.1
    final = keep_corrections(result.prediction.labels, corrections)
    assert np.array_equal(
        np.take(final, corrected, axis=axis), np.take(truth, corrected, axis=axis)
    )
    assert result.extra["corrections"]["corrected_items"] == 3


def test_with_corrections_the_gate_advises_and_says_the_corrections_outrank_it(
    demo_model, demo_target_slab, demo_reference_slab
):
    from napari_uda.adaptation.gate import GateOptions

    truth = np.asarray(demo_reference_slab.data).astype(np.int16)
    corrections = corrections_from_slices(truth, _axial(demo_target_slab), [8, 16])
    strict = GateOptions(min_agreement_gain=1.0)  # no run can pass: the gate would roll back
    result = adapt(
        demo_model,
        demo_target_slab,
        "corrections",
        {"epochs": 1, "steps_per_epoch": 2},
        corrections=corrections,
        device="cpu",
        gate=strict,
    )
    decision = result.gate
    assert decision.keep == "adapted" and not decision.rolled_back
    assert decision.reasons[0].startswith("your corrections outrank the label-free gate")
    assert result.extra["gate"]["reasons"][0] == decision.reasons[0]
    assert any(r.startswith("not more consistent") for r in decision.reasons[1:])


def test_corrections_raise_dice_for_a_3d_torchscript_model(tmp_path):
    from napari_uda.core.models import load_model

    spec = base_spec(3, patch_size=[16, 16, 16], overlap=0.25)
    model = load_model(save_model(train_tiny(3, spec), spec, tmp_path))
    image, mask = synthetic_head(7, brain=1.0, scalp=0.2)
    truth = np.asarray(mask.data).astype(np.int16)
    corrections = corrections_from_slices(truth, 2, [6, 12, 18])
    result = adapt(model, image, "corrections", {"epochs": 2, "steps_per_epoch": 8},
                   reference=mask, corrections=corrections, device="cpu")  # fmt: skip
    before, after = result.reference_dice_before[0], result.reference_dice_after[0]
    assert after > before + 0.02, (before, after)


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_every_method_combines_with_corrections_or_says_why(
    name, tiny_model, tiny_target, tiny_reference
):
    method = available_methods()[name]
    if method.unmet_needs(tiny_model.capabilities):
        pytest.skip(f"{name} does not apply to the tiny model")
    truth = np.asarray(tiny_reference.data).astype(np.int16)
    corrections = corrections_from_slices(truth, 2, [5, 14])
    settings = {"epochs": 1}
    if method.unmet_needs(tiny_model.capabilities):
        return
    if method.corrections_unsupported:
        with pytest.raises(AdaptationError, match="cannot use corrections"):
            adapt(tiny_model, tiny_target, name, settings, corrections=corrections, device="cpu")
        return
    result = adapt(tiny_model, tiny_target, name, settings, corrections=corrections,
                   device="cpu", options=None)  # fmt: skip
    losses = result.history[-1]["losses"]
    assert "corrections_ce" in losses and np.isfinite(losses["total"])
    assert result.extra["corrections"]["corrected_items"] >= 2


def test_the_corrections_method_needs_corrections(tiny_model, tiny_target):
    with pytest.raises(AdaptationError, match="needs corrections"):
        adapt(tiny_model, tiny_target, "corrections", device="cpu")


def test_no_corrected_voxel_is_an_error(tiny_model, tiny_target):
    empty = np.full(tiny_target.shape, NOT_CORRECTED, dtype=np.int16)
    with pytest.raises(AdaptationError, match="no corrected voxel"):
        adapt(tiny_model, tiny_target, "tent", corrections=empty, device="cpu")


def test_corrections_reach_the_context_compact_and_unchanged(tiny_model, tiny_target):
    """The engine keeps the mapped corrections as int16 (2 bytes a voxel of the inputs), with
    every class and the not-corrected value as the target's preparation maps them."""
    import torch

    from napari_uda.adaptation.engine import _map_corrections
    from napari_uda.adaptation.targets import TargetSet

    targets = TargetSet.prepare(tiny_model, tiny_target)
    labels = np.full(tiny_target.shape, NOT_CORRECTED, dtype=np.int64)
    labels[:, :, 5] = 0
    labels[10:20, 10:20, 5] = 1
    mapped, summary = _map_corrections(targets, labels, tiny_model.num_classes)
    expected = targets.labels_on_inputs(labels, fill=NOT_CORRECTED)
    assert mapped.dtype == torch.int16 and torch.equal(mapped.long(), expected)
    assert summary["voxels"] == int((labels >= 0).sum())
