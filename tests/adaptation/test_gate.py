"""The keep-or-roll-back gate: label-free signals, the decision rules, and a finished run rolled
back (a model that paints the whole head) or kept (TENT raising Dice on the demo scanner)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_uda.adaptation.gate import (
    ChangeSignals,
    GateOptions,
    ModelSignals,
    apply_gate,
    decide,
    left_right_dim,
    mask_change,
    predict_and_gate,
)
from napari_uda.core.inference import predict_volume


def signals(agreement: float, confidence: float = 0.9) -> ModelSignals:
    return ModelSignals(agreement, agreement, confidence, agreement * confidence, 0.3, [0.8, 0.2])


def volumes(before: float, after: float) -> list[dict]:
    return [{"source": {"brain": before}, "adapted": {"brain": after}}]


# -- the rules, on given signals -------------------------------------------------------------------
def test_a_volume_leaving_its_expected_range_rolls_back():
    decision = decide(signals(0.95), signals(0.97), volumes(1200, 1900), {"brain": (1000, 1800)})
    assert decision.rolled_back and "outside the expected range" in decision.reasons[0]
    assert decision.warnings == []  # the kept (source) mask is plausible
    assert decision.summary.startswith("kept the unadapted model: adaptation did not look better")


def test_a_volume_entering_its_expected_range_is_kept_even_when_it_changes_much():
    decision = decide(signals(0.95), signals(0.95), volumes(400, 1300), {"brain": (1000, 1800)})
    assert not decision.rolled_back and "into the expected range" in decision.reasons[-1]
    assert any("changed brain from 400 to 1300 ml" in w for w in decision.warnings)


def test_a_large_volume_change_rolls_back_without_a_range():
    decision = decide(signals(0.95), signals(0.99), volumes(307, 2261))
    assert decision.rolled_back and "brain 307 -> 2261 ml" in decision.reasons[0]


def test_lower_agreement_rolls_back_and_the_adapted_model_must_look_better():
    worse = decide(signals(0.95), signals(0.85), volumes(1200, 1250))
    assert worse.rolled_back and "less consistent" in worse.reasons[0]
    same = decide(signals(0.95), signals(0.952), volumes(1200, 1250))
    assert same.rolled_back and same.reasons[0].startswith("not more consistent")
    assert not decide(signals(0.95), signals(0.96), volumes(1200, 1250)).rolled_back
    not_worse = GateOptions(min_agreement_gain=0.0)  # the lenient rule: not worse is enough
    lenient = decide(signals(0.95), signals(0.948), volumes(1200, 1250), None, not_worse)
    assert not lenient.rolled_back


def test_both_outside_the_range_keeps_by_the_other_rules_and_warns():
    decision = decide(signals(0.95), signals(0.97), volumes(500, 600), {"brain": (1000, 1800)})
    assert not decision.rolled_back
    assert decision.warnings == [
        "implausible volume in the kept mask: brain: 600 ml is below the expected 1000-1800 ml"
    ]


def test_with_the_gate_off_the_adapted_model_stays_and_the_decision_says_so():
    decision = decide(
        signals(0.9), signals(0.9), volumes(307, 2261), options=GateOptions(gate=False)
    )
    assert not decision.rolled_back and decision.reasons[0].startswith("gate off")
    assert any("+636%" in w or "+636 %" in w for w in decision.warnings)


def test_a_model_unsure_of_the_scan_is_flagged():
    decision = decide(signals(0.85), signals(0.86), volumes(1200, 1210))
    assert not decision.rolled_back
    assert decision.warnings == [
        "the kept model is unsure of this scan: its mask agrees with itself under test-time "
        "augmentation only 0.86 (Dice); check the mask"
    ]


def moved(dropped: float = 0.0, agreement: float = 0.95) -> ChangeSignals:
    return ChangeSignals(agreement, agreement, dropped, 0.0, 1.0, 0.0)


def test_dropping_the_sure_foreground_rolls_back_and_a_moved_mask_is_flagged():
    dropped = decide(signals(0.95), signals(0.97), volumes(1200, 1150), change=moved(0.2))
    assert dropped.rolled_back
    assert dropped.reasons == ["dropped 20% of the foreground the unadapted model was sure of"]
    kept = decide(signals(0.95), signals(0.97), volumes(1200, 1150), change=moved(0.05, 0.7))
    assert not kept.rolled_back and kept.change.dropped == 0.05
    assert kept.warnings == [
        "adaptation moved the mask: it agrees only 0.70 (Dice) with the unadapted model's; "
        "check the mask"
    ]
    # shrinking an over-segmentation into its expected range is not held against the run
    fixed = decide(
        signals(0.95), signals(0.97), volumes(2400, 1500), {"brain": (1000, 1800)}, None, moved(0.3)
    )
    assert not fixed.rolled_back and "into the expected range" in fixed.reasons[-1]


def test_a_change_the_intensities_do_not_support_rolls_back_even_into_the_range():
    unsupported = ChangeSignals(0.8, 0.8, 0.0, 0.0, 1.0, 0.0, intensity_support=0.1)
    decision = decide(signals(0.95), signals(0.97), volumes(1200, 1210), change=unsupported)
    assert decision.rolled_back and len(decision.reasons) == 1
    assert decision.reasons[0].startswith("the scan's intensities do not support the change")
    # no exception for a volume brought into its range: a mask that slid is never kept
    into_range = decide(
        signals(0.95), signals(0.97), volumes(900, 1100), {"brain": (1000, 1800)}, None, unsupported
    )
    assert into_range.rolled_back
    supported = ChangeSignals(0.8, 0.8, 0.0, 0.0, 1.0, 0.0, intensity_support=0.5)
    assert not decide(
        signals(0.95), signals(0.97), volumes(1200, 1210), change=supported
    ).rolled_back
    off = GateOptions(min_intensity_support=-10.0)
    assert not decide(
        signals(0.95), signals(0.97), volumes(1200, 1210), None, off, unsupported
    ).rolled_back


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_volume_change"):
        GateOptions(max_volume_change=0)


# -- how the adapted mask differs from the source's ---------------------------------------------
def two_class(foreground: torch.Tensor) -> torch.Tensor:
    """(N, 2, ...) probabilities from a foreground probability map (N, ...)."""
    return torch.stack([1 - foreground, foreground], 1)


def test_mask_change_counts_the_sure_foreground_dropped_and_the_sure_background_added():
    source = torch.full((1, 10, 10), 0.02)
    source[:, :5] = 0.95  # rows 0-4: sure brain; rows 5-9: sure background
    adapted = source.clone()
    adapted[:, :2] = 0.3  # drops rows 0-1 (2 of the 5 sure rows)
    adapted[:, 5] = 0.8  # adds row 5 where the source was sure there is none
    change = mask_change(two_class(source), two_class(adapted))
    assert change.dropped == pytest.approx(0.4) and change.added == pytest.approx(0.2)
    assert change.agreement == pytest.approx(2 * 30 / (50 + 40))
    assert change.volume_ratio == pytest.approx(0.8)
    assert change.confident_agreement == pytest.approx(change.agreement)  # every voxel sure
    # one volume's (C, X, Y) probabilities give the same; padding is left out
    same = mask_change(two_class(source)[0], two_class(adapted)[0], class_axis=0)
    assert same == change
    valid = torch.ones(1, 10, 10, dtype=torch.bool)
    valid[:, 0] = False
    assert mask_change(two_class(source), two_class(adapted), valid).dropped == pytest.approx(0.25)
    unsure = mask_change(two_class(source), two_class(adapted), confident=0.99)
    assert unsure.dropped == 0.0 and unsure.added == 0.0  # nothing was sure enough


# -- signals on the real demo model ----------------------------------------------------------------
def test_left_right_dim_mirrors_the_head(demo_model, demo_target_slab):
    canonical = demo_target_slab.to_canonical()
    mirrored = canonical.with_data(np.ascontiguousarray(canonical.data[::-1]))
    prepared, prepared_mirror = demo_model.prepare(canonical), demo_model.prepare(mirrored)
    dim = left_right_dim(prepared)
    height, width = prepared.padded_hw
    torch.testing.assert_close(
        prepared.inputs[..., :height, :width].flip(dim),
        prepared_mirror.inputs[..., :height, :width],
    )


def shifted(model, brain_logit: float):
    """A copy of ``model`` whose brain logit is shifted by ``brain_logit`` everywhere."""
    changed = model.clone()
    with torch.no_grad():
        changed.network.head.bias[1] += brain_logit
    return changed


def test_a_model_that_drops_the_sure_brain_is_rolled_back(demo_model, demo_target_slab):
    shrinking = shifted(demo_model, -3.0)  # loses brain the demo model is sure of
    others_off = dict(consistency_tolerance=1.0, min_agreement_gain=0.0, min_intensity_support=-10)
    only_drop = GateOptions(**others_off)  # the rule alone
    gated = predict_and_gate(demo_model, shrinking, [demo_target_slab], options=only_drop)
    decision = gated.decision
    assert decision.rolled_back and decision.change.dropped > 0.1
    assert decision.reasons[0].startswith("dropped ") and len(decision.reasons) == 1
    assert gated.kept is gated.before
    assert (gated.after[0].labels > 0).sum() < (gated.before[0].labels > 0).sum()
    relaxed = GateOptions(**others_off, max_dropped=1.0)
    assert not predict_and_gate(
        demo_model, shrinking, [demo_target_slab], options=relaxed
    ).decision.rolled_back


def painting(model):
    """A copy of ``model`` whose brain logit is raised by 3 everywhere: it paints the head."""
    return shifted(model, 3.0)


def test_the_gate_rolls_back_a_run_that_painted_the_whole_head(
    adapt_demo, demo_model, demo_target_slab
):
    result, before, _ = adapt_demo("tent", {"epochs": 1})
    result.model = painting(result.model)  # the run went wrong: the head became "brain"
    result.prediction = predict_volume(result.model, demo_target_slab, device="cpu")
    result.predictions = [result.prediction]
    result.reference_dice_after = [0.0]
    painted = float((result.prediction.labels > 0).mean())
    assert painted > 4 * float((result.initial_prediction.labels > 0).mean())

    decision = apply_gate(result, demo_model, [demo_target_slab])
    assert decision.rolled_back and "volume changed too much" in decision.summary
    assert result.prediction is result.initial_prediction
    assert result.reference_dice_after == [before]
    assert result.checkpoint.step == 0 and "unadapted" in result.checkpoint.reason
    for name, value in demo_model.network.state_dict().items():
        torch.testing.assert_close(result.model.network.state_dict()[name], value)
    assert result.extra["gate"]["keep"] == "source" and result.gate is decision


def test_the_engine_gates_a_run_that_raised_dice_and_keeps_it(
    demo_model, demo_target_slab, demo_reference_slab
):
    from napari_uda.adaptation.engine import adapt

    result = adapt(
        demo_model,
        demo_target_slab,
        "tent",
        {"epochs": 3},
        reference=demo_reference_slab,
        device="cpu",
        gate=GateOptions(),
        expected_volumes={"brain": (1.0, 2.0)},  # no brain is this small: flagged, not decisive
    )
    before, after = result.reference_dice_before[0], result.reference_dice_after[0]
    assert after > before + 0.1, (before, after)  # TENT fixes the demo scanner shift
    decision = result.gate
    assert decision.keep == "adapted", decision.summary
    assert decision.change.intensity_support > GateOptions().min_intensity_support
    assert result.extra["gate"]["keep"] == "adapted" and decision.seconds > 0
    assert decision.adapted.tta_agreement is not None and decision.adapted.dropout_agreement
    assert decision.expected_ml == {"brain": [1.0, 2.0]}
    assert any("implausible volume in the kept mask: brain" in w for w in decision.warnings)


def test_the_user_can_overrule_a_roll_back_and_gets_the_adapted_result_exactly(
    adapt_demo, demo_model, demo_target_slab
):
    from napari_uda.adaptation.gate import overrule_gate

    result, before, _ = adapt_demo("tent", {"epochs": 1})
    with pytest.raises(ValueError, match="no rolled-back result"):
        overrule_gate(result)  # not gated: nothing to overrule
    result.model = painting(result.model)
    result.prediction = predict_volume(result.model, demo_target_slab, device="cpu")
    result.predictions = [result.prediction]
    result.reference_dice_after = [0.0]
    adapted_model, adapted_prediction = result.model, result.prediction
    adapted_state = {k: v.clone() for k, v in adapted_model.network.state_dict().items()}
    adapted_checkpoint = result.checkpoint

    decision = apply_gate(result, demo_model, [demo_target_slab])
    assert decision.rolled_back and result.rolled_back.model is adapted_model
    # the loud lines of the painted mask, kept for an overrule (the kept mask has its own)
    assert any("adaptation changed brain" in line for line in decision.adapted_warnings)
    assert not any("adaptation changed brain" in line for line in decision.warnings)

    overruled = overrule_gate(result)
    assert result.gate is overruled and overruled.overruled and not overruled.rolled_back
    assert result.rolled_back is None  # nothing kept twice
    assert result.model is adapted_model and result.checkpoint == adapted_checkpoint
    for name, value in result.model.network.state_dict().items():
        torch.testing.assert_close(value, adapted_state[name])
    assert result.prediction is adapted_prediction and result.predictions == [adapted_prediction]
    assert result.reference_dice_after == [0.0] and result.reference_dice_before == [before]
    assert overruled.summary.startswith("the user kept the adapted model against the gate's")
    assert "volume changed too much" in overruled.summary  # the gate's reasons stay
    assert overruled.warnings == decision.adapted_warnings
    record = result.extra["gate"]
    assert record["overruled"] and record["keep"] == "adapted" and not record["rolled_back"]
    assert record["summary"] == overruled.summary
    with pytest.raises(ValueError, match="no rolled-back result"):
        overrule_gate(result)  # once only
