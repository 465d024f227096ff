"""The engine's pieces on their own: plan_run, TargetSet, Evaluator, CheckpointKeeper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_uda.adaptation.base import AdaptationContext
from napari_uda.adaptation.checkpoints import CheckpointKeeper
from napari_uda.adaptation.engine import adapt
from napari_uda.adaptation.evaluation import Evaluator
from napari_uda.adaptation.guard import CollapseGuard, GuardOptions, Signals, compute_signals
from napari_uda.adaptation.plan import AdaptationError, RunPlan, plan_run
from napari_uda.adaptation.targets import TargetSet
from napari_uda.core.metrics import dice_per_class
from napari_uda.core.models import ModelBundle, UNet2D, UNetBundleAdapter, UNetConfig
from napari_uda.core.volume import Volume
from napari_uda.settings import SettingsError


# -- plan_run ------------------------------------------------------------------------------------
def test_plan_resolves_settings_once_and_the_engine_follows_it(tiny_model, tiny_target):
    plan = plan_run(tiny_model, "tent", ["epochs=1", "batch_size=8"])
    assert isinstance(plan, RunPlan) and plan.method.name == "tent"
    assert (plan.settings.epochs, plan.settings.batch_size) == (1, 8)
    result = adapt(tiny_model, tiny_target, plan, ["epochs=5"], device="cpu")
    assert result.settings["epochs"] == 1  # the plan's settings, not the ignored argument
    assert result.extra["steps_done"] == result.extra["steps_per_epoch"]


def test_plan_refuses_with_one_line(tiny_model):
    config = UNetConfig(**{**tiny_model.bundle.architecture.to_dict(), "norm": "group"})
    group = UNetBundleAdapter(
        ModelBundle.from_model(
            UNet2D(config), tiny_model.class_names, tiny_model.bundle.preprocessing
        )
    )
    with pytest.raises(AdaptationError, match="adabn cannot adapt this model: needs BatchNorm"):
        plan_run(group, "adabn")
    with pytest.raises(KeyError, match="unknown method"):
        plan_run(tiny_model, "magic")
    with pytest.raises(SettingsError, match="below the minimum"):
        plan_run(tiny_model, "tent", ["epochs=0"])


# -- TargetSet -----------------------------------------------------------------------------------
def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, ...) labels -> (N, C, ...) one-hot float (what a perfect network would output)."""
    return torch.movedim(torch.nn.functional.one_hot(labels.clamp_min(0), classes), -1, 1).float()


def test_target_set_stacks_volumes_of_different_sizes_without_touching_them(
    tiny_model, make_synthetic_head
):
    small, small_mask = make_synthetic_head((40, 40, 20), seed=3)
    large, _ = make_synthetic_head((52, 44, 24), seed=4)
    prepared = [tiny_model.prepare(v) for v in (small, large)]
    shapes = [p.inputs.shape for p in prepared]
    copies = [p.inputs.clone() for p in prepared]
    targets = TargetSet(prepared)
    assert [p.inputs.shape for p in prepared] == shapes
    assert all(torch.equal(p.inputs, c) for p, c in zip(prepared, copies))
    assert targets.ranges == [(0, shapes[0][0]), (shapes[0][0], shapes[0][0] + shapes[1][0])]
    assert targets.inputs.shape[2:] == (max(s[2] for s in shapes), max(s[3] for s in shapes))
    first = targets.inputs[targets.first]
    assert torch.equal(first[:, :, : shapes[0][2], : shapes[0][3]], prepared[0].inputs)
    # padding is invalid and holds the volume's own minimum
    assert targets.valid_mask is not None
    assert int(targets.valid[targets.first].sum()) == int(prepared[0].valid_mask().sum())
    assert float(first[:, :, shapes[0][2] :].max()) == float(prepared[0].inputs.min())
    # labels map through the model's preparation and back onto the scan's grid exactly
    labels = targets.labels_on_inputs(small_mask, fill=0)
    assert labels.shape == targets.inputs[:, 0].shape
    back = targets.prediction(one_hot(labels[targets.first], 2)).labels
    np.testing.assert_array_equal(back, small_mask.data)
    with pytest.raises(
        AdaptationError, match=r"the mask \(shape \(3, 3, 3\)\) does not match the image's shape"
    ):
        targets.labels_on_inputs(np.zeros((3, 3, 3)), what="mask")


def test_target_set_refuses_inputs_that_do_not_fit_together(tiny_model, tiny_target):
    prepared = tiny_model.prepare(tiny_target)
    other = type(prepared)(**{**prepared.__dict__, "inputs": prepared.inputs[:, :, None]})
    with pytest.raises(AdaptationError, match="do not fit together"):
        TargetSet([prepared, other])
    with pytest.raises(AdaptationError, match="no target volume"):
        TargetSet([])


# -- Evaluator -----------------------------------------------------------------------------------
class CountingModel:
    """Wraps an adapter and counts its forward passes."""

    def __init__(self, adapter):
        self.adapter, self.calls = adapter, 0
        self.network, self.num_classes = adapter.network, adapter.num_classes

    def forward(self, inputs, **kwargs):
        self.calls += 1
        return self.adapter.forward(inputs, **kwargs)


def context_for(model, targets: TargetSet) -> AdaptationContext:
    initial = torch.softmax(torch.randn(targets.inputs.shape[0], 2, *targets.inputs.shape[2:]), 1)
    return AdaptationContext(
        model=model,
        source_model=model,
        target_inputs=targets.inputs,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        initial_probabilities=initial,
        valid_mask=targets.valid_mask,
    )


def test_evaluator_reuses_a_pass_made_after_the_same_step(tiny_model, tiny_target):
    targets = TargetSet.prepare(tiny_model, tiny_target)
    counting = CountingModel(tiny_model.clone())
    context = context_for(counting, targets)
    evaluator = Evaluator(context, targets)
    assert evaluator.start.change_since_start == 0.0 and evaluator.latest is evaluator.start
    context.steps_done = 1
    probabilities, signals = evaluator.evaluate()  # a real pass
    passes = counting.calls
    assert passes > 0 and evaluator.latest is signals
    evaluator.preview(evaluated=True)  # the evaluation of this step: no pass
    again, _ = evaluator.evaluate()
    assert counting.calls == passes and again is probabilities
    context.steps_done = 2
    context.remember_prediction(probabilities * 1)  # a method's own pass after step 2
    evaluator.evaluate()
    assert counting.calls == passes
    preview = evaluator.preview(evaluated=False)  # between evaluations: the first volume only
    assert counting.calls > passes and preview.labels.shape == tiny_target.shape


@pytest.mark.parametrize(
    "shape", [(7, 3, 20, 25), (1, 2, 24, 20, 18)], ids=["2d-slices", "3d-volume"]
)
def test_signals_summed_in_pieces_equal_the_whole_array_at_once(shape):
    """compute_signals sums over pieces of voxels (rows of 2D slices, parts of one 3D input):
    every signal equals the same quantity computed over all valid voxels at once, whatever
    the piece size, with padding left out and reference labels that are no class ignored."""
    generator = torch.Generator().manual_seed(0)
    classes = shape[1]
    probabilities = torch.softmax(3 * torch.randn(shape, generator=generator), 1)
    initial = torch.randint(0, classes, shape[:1] + shape[2:], generator=generator)
    valid = torch.rand(shape[:1] + shape[2:], generator=generator) > 0.2
    rows = max(1, shape[0] // 2)  # the reference covers the first volume's rows only
    reference = torch.randint(0, classes + 1, (rows, *shape[2:]), generator=generator)
    labels = probabilities.argmax(1)
    p = probabilities.clamp_min(1e-8)
    entropy = (-(p * p.log()).sum(1) / np.log(classes))[valid]
    fraction = torch.bincount(labels[valid], minlength=classes).double() / valid.sum()
    dice_start = dice_per_class(labels[valid].numpy(), initial[valid].numpy(), classes)[1:]
    counted = valid[:rows] & (reference < classes)
    dice_reference = dice_per_class(
        labels[:rows][counted].numpy(), reference[counted].numpy(), classes
    )[1:]
    for chunk in (37, 1000, 1 << 20):
        signals = compute_signals(probabilities, initial.to(torch.uint8), valid, reference, chunk)
        assert signals.mean_entropy == pytest.approx(float(entropy.double().mean()), rel=1e-6)
        assert signals.foreground_fraction == pytest.approx(fraction.tolist(), abs=1e-12)
        changed = float((labels != initial)[valid].double().mean())
        assert signals.change_since_start == pytest.approx(changed, abs=1e-12)
        assert signals.dice_with_start == pytest.approx(float(np.mean(dice_start)), abs=1e-12)
        assert signals.reference_dice == pytest.approx(dice_reference, abs=1e-12)


# -- CheckpointKeeper ----------------------------------------------------------------------------
def keeper_for(policy: str, network: torch.nn.Module) -> CheckpointKeeper:
    start = Signals(0.3, [0.85, 0.15], 0.0, 1.0)
    options = GuardOptions(checkpoint_policy=policy, stop_on_collapse=False)
    guard = CollapseGuard(start, None, options, ["background", "brain"], steps_per_epoch=1)
    return CheckpointKeeper(network, torch.zeros(1, 2, 4, 4), guard, options)


def test_keeper_keeps_the_onset_of_a_drift_after_a_collapse():
    network = torch.nn.Linear(1, 1)
    keeper = keeper_for("last_healthy", network)
    fractions = [0.15, 0.15, 0.16, 0.02]  # healthy, healthy, drifting (within tolerance), vanished
    for step, fraction in enumerate(fractions, start=1):
        with torch.no_grad():
            network.weight.fill_(step)
        signals = Signals(0.3, [1 - fraction, fraction], 0.0, 0.9)
        reasons = keeper.review(step, step, torch.full((1, 2, 4, 4), float(step)), signals)
    assert reasons and keeper.collapse["step"] == 4
    kept, why = keeper.final()
    assert kept.step == 2 and float(kept.state["weight"]) == 2.0  # before the drift began
    assert why.startswith("collapse detected at step 4") and "(step 2)" in why
    assert keeper.collapse_message(reasons).endswith("keeping step 2")


def test_keeper_with_lowest_entropy_policy_keeps_the_most_confident_healthy_evaluation():
    network = torch.nn.Linear(1, 1)
    keeper = keeper_for("lowest_entropy", network)
    for step, entropy in enumerate([0.25, 0.1, 0.2], start=1):
        keeper.review(step, 1, torch.zeros(1, 2, 4, 4), Signals(entropy, [0.85, 0.15], 0.0, 1.0))
    kept, why = keeper.final()
    assert kept.step == 2 and why == "lowest mean entropy among healthy evaluations"
    untouched = keeper_for("last_healthy", network)
    assert untouched.final()[1] == "the unadapted model"


def test_a_volume_on_another_grid_is_refused_as_reference(tiny_model, tiny_target):
    wrong = Volume(np.zeros((*tiny_target.shape[:2], 3), np.uint8), tiny_target.affine)
    with pytest.raises(AdaptationError, match=r"the reference mask \(shape"):
        adapt(tiny_model, tiny_target, "tent", {"epochs": 1}, reference=wrong, device="cpu")
