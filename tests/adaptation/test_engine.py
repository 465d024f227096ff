"""The adaptation engine: copies, stop, determinism, evaluation, previews, collapse guard."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from napari_uda.adaptation.base import AdaptationMethod, CommonSettings, StepOutput, get_method
from napari_uda.adaptation.engine import (
    AdaptationError,
    EngineOptions,
    adapt,
    resolve_settings,
    run_adaptation,
)
from napari_uda.adaptation.events import AdaptationEvent
from napari_uda.adaptation.guard import CollapseGuard, Signals, collapse_reasons
from napari_uda.adaptation.target_statistics import restart_batchnorm_statistics
from napari_uda.core.inference import predict_volume
from napari_uda.core.models import ModelBundle, UNet2D, UNetBundleAdapter, UNetConfig
from napari_uda.core.volume import Volume
from napari_uda.settings import SettingsError, setting

FAST = {"epochs": 2, "batch_size": 8}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class ForceBackground(AdaptationMethod):
    """A deliberately destructive method: cross-entropy towards background everywhere, with a
    large learning rate, so the foreground vanishes within a few steps."""

    name = "force_background"
    title = "Force background (test only)"

    @dataclass
    class Settings(CommonSettings):
        epochs: int = setting(3, "Passes.", min=1)
        batch_size: int = setting(8, "Slices per step.", min=1)
        learning_rate: float = setting(0.05, "Adam learning rate.", min=0.0)
        gentle_steps: int = setting(2, "Steps that change nothing before the damage.", min=0)

    def setup(self):
        self.make_adam(self.select_trainable("all"))
        self.context.model.network.eval()

    def step(self, batch_index, step):
        inputs, _ = self.context.batch(batch_index)
        logits = self.context.model.forward(inputs).logits
        target = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.long)
        loss = torch.nn.functional.cross_entropy(logits, target)
        if step > self.settings.gentle_steps:
            self.optimise(loss)
        return StepOutput({"total": loss.item()})


def test_user_model_is_never_modified(tiny_model, tiny_target):
    before = weights(tiny_model)
    result = adapt(tiny_model, tiny_target, "tent", FAST, device="cpu")
    assert same_weights(before, weights(tiny_model))
    assert result.model is not tiny_model
    assert not same_weights(before, weights(result.model))  # the copy did adapt
    assert all(p.requires_grad for p in tiny_model.network.parameters())


def test_same_seed_gives_identical_runs_and_another_seed_does_not(tiny_model, tiny_target):
    first = adapt(tiny_model, tiny_target, "st", FAST, seed=3, device="cpu")
    second = adapt(tiny_model, tiny_target, "st", FAST, seed=3, device="cpu")
    other = adapt(tiny_model, tiny_target, "st", FAST, seed=4, device="cpu")
    assert same_weights(weights(first.model), weights(second.model))
    assert [h["losses"] for h in first.history] == [h["losses"] for h in second.history]
    np.testing.assert_array_equal(first.prediction.probabilities, second.prediction.probabilities)
    assert [h["losses"] for h in first.history] != [h["losses"] for h in other.history]


def test_stop_is_honoured_before_the_next_step(tiny_model, tiny_target):
    seen: list[AdaptationEvent] = []
    run = run_adaptation(
        tiny_model,
        tiny_target,
        "tent",
        FAST,
        device="cpu",
        should_stop=lambda: len(seen) >= 4,  # step 0 (the unadapted model) and 3 steps
    )
    with pytest.raises(StopIteration) as finished:
        while True:
            seen.append(next(run))
    result = finished.value.value
    assert (
        [e.step for e in seen] == [0, 1, 2, 3]
        and result.stopped
        and result.stop_reason == "stopped by user"
    )
    assert len(result.history) == 3 and result.extra["steps_done"] == 3
    assert result.checkpoint.step == 3  # the final weights were evaluated and kept
    # consistent: the result's prediction is what the returned model predicts
    again = predict_volume(result.model, tiny_target, device="cpu")
    np.testing.assert_allclose(again.probabilities, result.prediction.probabilities, atol=1e-5)


def test_stop_before_the_first_step_returns_the_unadapted_model(tiny_model, tiny_target):
    result = adapt(tiny_model, tiny_target, "tent", FAST, device="cpu", should_stop=lambda: True)
    assert result.stopped and result.history == [] and result.checkpoint.step == 0
    assert same_weights(weights(tiny_model), weights(result.model))
    np.testing.assert_array_equal(result.prediction.labels, result.initial_prediction.labels)


def test_events_carry_signals_reference_dice_and_previews(tiny_model, tiny_target, tiny_reference):
    events = []
    result = adapt(
        tiny_model,
        tiny_target,
        "tent",
        ["epochs=2", "batch_size=8"],
        reference=tiny_reference,
        device="cpu",
        preview_every=2,
        on_event=events.append,
    )
    initial, *events = events
    assert initial.step == 0 and initial.losses == {} and initial.evaluated
    assert initial.change_since_start == 0 and initial.reference_dice is not None
    np.testing.assert_array_equal(initial.preview.labels, result.initial_prediction.labels)
    steps_per_epoch = result.extra["steps_per_epoch"]
    assert [e.step for e in events] == list(range(1, 2 * steps_per_epoch + 1))
    assert [e.evaluated for e in events] == [e.step % steps_per_epoch == 0 for e in events]
    last = events[-1]
    assert 0 <= last.mean_entropy <= 1 and 0 <= last.change_since_start <= 1
    assert sum(last.foreground_fraction) == pytest.approx(1.0)
    assert 0 <= last.agreement_dice <= 1
    assert len(last.reference_dice) == 1 and 0 <= last.reference_dice[0] <= 1
    assert "total" in last.losses and last.elapsed_seconds > 0
    previews = [e for e in events if e.preview is not None]
    assert [e.step for e in previews] == [e.step for e in events if e.step % 2 == 0]
    assert previews[0].preview.labels.shape == tiny_target.shape
    assert result.reference_dice_before is not None and result.reference_dice_after is not None
    assert result.history == [e.to_record() for e in events]


def test_evaluate_every_n_steps(tiny_model, tiny_target):
    events = []
    options = EngineOptions(evaluate_every=2)
    adapt(
        tiny_model, tiny_target, "tent", FAST, device="cpu", options=options, on_event=events.append
    )
    events = events[1:]  # without step 0
    total = len(events)
    assert [e.step for e in events if e.evaluated] == [
        s for s in range(1, total + 1) if s % 2 == 0 or s == total
    ]


def test_collapse_guard_keeps_an_earlier_checkpoint(tiny_model, tiny_target):
    events = []
    options = EngineOptions(evaluate_every=1, stop_on_collapse=False)
    result = adapt(
        tiny_model,
        tiny_target,
        ForceBackground,
        device="cpu",
        options=options,
        on_event=events.append,
    )
    events = events[1:]  # without step 0
    start_fraction = result.extra["initial_signals"]["foreground_fraction"][1]
    assert start_fraction > 0.05
    collapsed = [e for e in events if "collapse detected" in e.message]
    assert collapsed, "the vanishing foreground was not detected"
    first = collapsed[0].step
    assert collapsed[0].foreground_fraction[1] < 0.2 * start_fraction
    assert result.checkpoint.step < first and "collapse detected" in result.checkpoint.reason
    assert result.extra["collapse"]["step"] == first
    assert len(events) == result.extra["steps_done"]  # ran to the end: stop_on_collapse False
    kept_fraction = result.extra["kept_signals"]["foreground_fraction"][1]
    assert kept_fraction > 0.5 * start_fraction
    assert (result.prediction.labels == 1).mean() > 0.5 * (
        result.initial_prediction.labels == 1
    ).mean()


def test_collapse_stops_the_run_by_default(tiny_model, tiny_target):
    options = EngineOptions(evaluate_every=1)
    result = adapt(tiny_model, tiny_target, ForceBackground, device="cpu", options=options)
    assert result.stop_reason.startswith("collapse detected")
    assert result.extra["steps_done"] < result.extra["steps_per_epoch"] * 3
    assert not result.stopped  # not a user stop


def test_collapse_reasons_from_signals():
    start = Signals(0.3, [0.85, 0.15], 0.0, 1.0)
    options = EngineOptions()
    names = ["background", "brain"]
    assert collapse_reasons(Signals(0.2, [0.8, 0.2], 0.05, 0.9), start, None, options, names) == []
    assert (
        "vanished"
        in collapse_reasons(Signals(0.1, [0.99, 0.01], 0.1, 0.1), start, None, options, names)[0]
    )
    assert (
        "exploded"
        in collapse_reasons(Signals(0.1, [0.3, 0.7], 0.5, 0.3), start, None, options, names)[0]
    )
    # the prior widens the healthy range: 0.4 is within 3x a prior of 0.2
    assert (
        collapse_reasons(Signals(0.1, [0.6, 0.4], 0.2, 0.5), start, [0.8, 0.2], options, names)
        == []
    )
    entropy = collapse_reasons(Signals(0.001, [0.85, 0.15], 0.3, 0.1), start, None, options, names)
    assert "entropy collapsed" in entropy[0]
    falling = collapse_reasons(
        Signals(0.2, [0.85, 0.15], 0.1, 0.9), start, None, options, names, 0.3, 0.9
    )
    assert "agreement" in falling[0]


def test_drift_is_measured_against_the_start_the_prior_and_the_first_epoch():
    start = Signals(0.3, [0.85, 0.15], 0.0, 1.0)
    options = EngineOptions()  # drift_tolerance 0.1
    names = ["background", "brain"]
    prior, early = [0.8, 0.2], [[0.82, 0.18]]
    grown = Signals(0.2, [0.76, 0.24], 0.1, 0.8)  # 20 % above the top of [0.15, 0.2]
    reasons = collapse_reasons(grown, start, prior, options, names, early_fractions=early)
    assert len(reasons) == 1 and "brain drifted to 24.00%" in reasons[0]
    # no drift test during the first epoch (early_fractions None), nor when switched off
    assert collapse_reasons(grown, start, prior, options, names) == []
    off = EngineOptions(drift_tolerance=0.0)
    assert collapse_reasons(grown, start, prior, off, names, early_fractions=early) == []
    # inside the tolerance, or inside the range (the first epoch widened it), is healthy
    near = Signals(0.2, [0.79, 0.21], 0.1, 0.8)  # 5 % above
    assert collapse_reasons(near, start, prior, options, names, early_fractions=early) == []
    wide = [[0.74, 0.26]]
    assert collapse_reasons(grown, start, prior, options, names, early_fractions=wide) == []
    # shrinking below the bottom of the range counts too (still far above the vanish ratio)
    shrunk = Signals(0.2, [0.88, 0.12], 0.1, 0.8)
    reasons = collapse_reasons(shrunk, start, prior, options, names, early_fractions=early)
    assert "drifted" in reasons[0]


def guard_with_agreements(curve: list[float], steps_per_epoch: int = 1, every: int = 1):
    """The guard's reasons at each evaluation (every ``every`` steps) of a run whose method
    reports ``curve[k]`` at every step of epoch k + 1."""
    start = Signals(0.3, [0.85, 0.15], 0.0, 1.0)
    guard = CollapseGuard(start, None, EngineOptions(), ["background", "brain"], steps_per_epoch)
    healthy = Signals(0.3, [0.85, 0.15], 0.0, 1.0)
    steps = [(e, v) for e, v in enumerate(curve, start=1) for _ in range(steps_per_epoch)]
    reasons = []
    for first in range(0, len(steps), every):
        window = steps[first : first + every]
        reasons.append(guard.check(healthy, window[-1][0], [v for _, v in window]))
    return reasons


def test_agreement_rule_smooths_and_compares_with_its_early_level():
    # a healthy UDAS run on the demo (early/final Dice after each epoch): it dips below half its
    # start before it rises; evaluated once per epoch or after every step, it is never stopped
    udas = [0.51, 0.47, 0.35, 0.22, 0.43, 0.69, 0.78, 0.78]
    assert all(not reasons for reasons in guard_with_agreements(udas))
    assert all(not reasons for reasons in guard_with_agreements(udas, 6, every=6))
    assert all(not reasons for reasons in guard_with_agreements(udas, 6, every=1))
    # a single bad epoch is smoothed away
    assert all(not reasons for reasons in guard_with_agreements([0.9, 0.88, 0.3, 0.9, 0.89]))
    # a steady fall is caught once the smoothed value is below half the early level
    for steps_per_epoch, every in ((1, 1), (6, 6), (6, 1)):
        falling = guard_with_agreements([0.9, 0.7, 0.5, 0.35, 0.2, 0.1], steps_per_epoch, every)
        flagged = [i for i, reasons in enumerate(falling) if reasons]
        assert flagged and "smoothed agreement" in falling[flagged[0]][0]
        first_step = (flagged[0] + 1) * every
        assert 4 * steps_per_epoch < first_step <= 5 * steps_per_epoch  # in epoch 5


class SlowDrift(AdaptationMethod):
    """A slow collapse: every step raises the foreground logit a little (no step is dramatic,
    the foreground fraction creeps up evaluation after evaluation)."""

    name = "slow_drift"
    title = "Slow drift (test only)"

    @dataclass
    class Settings(CommonSettings):
        epochs: int = setting(40, "Passes.", min=1)
        batch_size: int = setting(10, "Slices per step.", min=1)
        delta: float = setting(0.05, "Added to the foreground logit per step.", min=0.0)

    def setup(self):
        self.context.model.network.eval()

    def step(self, batch_index, step):
        with torch.no_grad():
            self.context.model.network.head.bias[1] += self.settings.delta
        return StepOutput({"total": 0.0})


def test_a_slow_drift_is_caught_and_the_drift_onset_is_kept(tiny_model, tiny_target):
    events = []
    result = adapt(tiny_model, tiny_target, SlowDrift, device="cpu", on_event=events.append)
    start = result.extra["initial_signals"]["foreground_fraction"][1]
    fractions = [e.foreground_fraction[1] for e in events[1:] if e.evaluated]
    # each evaluation moves the fraction by a few percent only: no single step is dramatic
    steps = np.diff([start, *fractions]) / np.array([start, *fractions[:-1]])
    assert steps.max() < 0.1
    collapse = result.extra["collapse"]
    assert collapse is not None and "drifted" in collapse["reasons"][0], collapse
    assert result.stop_reason.startswith("collapse detected")
    # caught long before the explosion rule (3x) would have fired
    assert fractions[-1] < 2 * start
    assert "before the drift began" in result.checkpoint.reason
    kept = result.extra["kept_signals"]["foreground_fraction"][1]
    assert start <= kept < fractions[-1]
    # the old rules alone (no drift test) let it run to the end
    off = adapt(
        tiny_model,
        tiny_target,
        SlowDrift,
        {"epochs": 10},
        device="cpu",
        options=EngineOptions(drift_tolerance=0.0),
    )
    assert off.extra["collapse"] is None and off.stop_reason == "completed"


def test_unmet_needs_are_explained(tiny_model, tiny_target):
    bundle = tiny_model.bundle
    config = UNetConfig(**{**bundle.architecture.to_dict(), "norm": "group", "groups": 2})
    group_model = UNetBundleAdapter(
        ModelBundle.from_model(UNet2D(config), bundle.class_names, bundle.preprocessing)
    )
    with pytest.raises(AdaptationError, match="adabn cannot adapt this model: needs BatchNorm"):
        adapt(group_model, tiny_target, "adabn", device="cpu")


def test_bad_settings_and_reference_are_rejected(tiny_model, tiny_target, tiny_reference):
    with pytest.raises(SettingsError, match="unknown setting"):
        adapt(tiny_model, tiny_target, "tent", ["nonsense=1"], device="cpu")
    with pytest.raises(SettingsError, match="below the minimum"):
        adapt(tiny_model, tiny_target, "tent", {"epochs": 0}, device="cpu")
    wrong = Volume(tiny_reference.data[:-2], tiny_reference.affine)
    with pytest.raises(AdaptationError, match="does not match"):
        adapt(tiny_model, tiny_target, "tent", FAST, reference=wrong, device="cpu")
    with pytest.raises(KeyError, match="unknown method"):
        adapt(tiny_model, tiny_target, "no-such-method", device="cpu")


def test_several_volumes_of_different_shapes(tiny_model, tiny_target, make_synthetic_head):
    other, _ = make_synthetic_head(shape=(36, 44, 16), brain=0.8, scalp=0.6, seed=5)
    result = adapt(tiny_model, [tiny_target, other], "tent", FAST, device="cpu")
    assert [p.labels.shape for p in result.predictions] == [tiny_target.shape, other.shape]
    assert result.prediction is result.predictions[0]
    assert len(result.initial_predictions) == 2


class ForceBackgroundAfterRestart(ForceBackground):
    """Restarts the BatchNorm statistics in setup (as AdaBN and TENT do), then collapses."""

    def setup(self):
        super().setup()
        restart_batchnorm_statistics(self.context.model.network)


def test_collapse_at_the_first_evaluation_restores_the_unadapted_model(tiny_model, tiny_target):
    options = EngineOptions(evaluate_every=1)
    settings = {"gentle_steps": 0, "learning_rate": 1.0}
    result = adapt(
        tiny_model,
        tiny_target,
        ForceBackgroundAfterRestart,
        settings,
        device="cpu",
        options=options,
    )
    assert result.extra["collapse"]["step"] == 1 and result.checkpoint.step == 0
    assert same_weights(weights(tiny_model), weights(result.model))  # buffers included
    np.testing.assert_array_equal(result.prediction.labels, result.initial_prediction.labels)


def test_model_recommended_settings_sit_beneath_the_users(tiny_model, tiny_target, monkeypatch):
    model = tiny_model.clone()
    monkeypatch.setattr(
        model, "recommended_settings", lambda name: {"epochs": 1, "learning_rate": 1e-4}
    )
    assert resolve_settings(get_method("tent"), None, model).epochs == 1
    chosen = resolve_settings(get_method("tent"), {"epochs": 3}, model)
    assert chosen.epochs == 3 and chosen.learning_rate == pytest.approx(1e-4)
    assert resolve_settings(get_method("tent"), None).epochs != 1  # paper default without model
    result = adapt(model, tiny_target, "tent", {"batch_size": 8}, device="cpu")
    assert (
        result.settings["epochs"] == 1
        and result.extra["steps_done"] == result.extra["steps_per_epoch"]
    )
    assert result.extra["model_recommended_settings"] == {"epochs": 1, "learning_rate": 1e-4}
