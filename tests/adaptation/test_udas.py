"""UDAS: only the early layers learn, the convergence rule, and a real domain shift."""

from __future__ import annotations

import numpy as np
import torch

from napari_uda.adaptation.base import AdaptationContext
from napari_uda.adaptation.engine import adapt
from napari_uda.adaptation.methods.udas import UDAS, UDASSettings
from napari_uda.core.inference import predict_volume
from napari_uda.core.models import UNetBundleAdapter, UNetConfig
from napari_uda.core.models.bundle import ModelBundle
from napari_uda.core.models.unet import UNet2D
from napari_uda.core.preprocessing import PreprocessingConfig


def untrained_adapter(seed: int = 0) -> UNetBundleAdapter:
    torch.manual_seed(seed)
    network = UNet2D(UNetConfig(base_channels=4, depth=2, dropout=0.1, early_head=True))
    bundle = ModelBundle.from_model(network, ["background", "brain"], PreprocessingConfig())
    return UNetBundleAdapter(bundle, name="untrained")


def context_for(adapter: UNetBundleAdapter, inputs: torch.Tensor) -> AdaptationContext:
    frozen = adapter.clone()
    with torch.no_grad():
        initial = torch.softmax(frozen.network.eval()(inputs), 1)
    return AdaptationContext(
        model=adapter,
        source_model=frozen,
        target_inputs=inputs,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        initial_probabilities=initial,
    )


def test_only_the_early_block_changes_in_a_step():
    adapter = untrained_adapter()
    inputs = torch.randn(8, 1, 16, 16)
    method = UDAS(UDASSettings(batch_size=8, learning_rate=1e-2), context_for(adapter, inputs))
    method.setup()
    before = {k: v.clone() for k, v in adapter.network.state_dict().items()}
    method.step(torch.arange(8), step=1)
    after = adapter.network.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the early layers did not learn"
    assert all(k.startswith("encoders.0.") for k in changed), sorted(changed)
    early_weights = {k for k in before if k.startswith("encoders.0.") and k.endswith("weight")}
    assert early_weights & changed
    # the early head, the later layers and every BatchNorm statistic stay bit-identical
    untouched = [k for k in before if k not in changed]
    assert any(k.startswith("early_head.") for k in untouched)
    assert any(k.endswith("running_mean") for k in untouched)
    assert all(
        not p.requires_grad
        for n, p in adapter.network.named_parameters()
        if not n.startswith("encoders.0.")
    )


def test_early_block_keeps_its_statistics_when_asked():
    adapter = untrained_adapter()
    inputs = torch.randn(8, 1, 16, 16)
    settings = UDASSettings(batch_size=8, early_batch_statistics=False)
    method = UDAS(settings, context_for(adapter, inputs))
    method.setup()
    before = {k: v.clone() for k, v in adapter.network.state_dict().items()}
    method.step(torch.arange(8), step=1)
    after = adapter.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" in k)
    assert not torch.equal(before["encoders.0.0.weight"], after["encoders.0.0.weight"])


def test_the_early_head_is_the_papers_and_old_bundles_keep_theirs():
    paper = UNet2D(UNetConfig(base_channels=4, depth=2))
    convolutions = [m for m in paper.early_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convolutions] == [(3, 3)] * 3
    assert [c.out_channels for c in convolutions] == [12, 8, 2]
    legacy = UNetConfig.from_dict({"base_channels": 4, "depth": 2})  # saved before the option
    assert isinstance(UNet2D(legacy).early_head, torch.nn.Conv2d)


def test_convergence_rule_stops_when_agreement_settles():
    adapter = untrained_adapter()
    method = UDAS(UDASSettings(min_epochs=2), context_for(adapter, torch.randn(4, 1, 16, 16)))
    method.setup()
    method.agreements = [0.70, 0.80]
    assert method.finished(1, None) is None  # min_epochs not reached
    assert method.finished(2, None) is None  # changed by 0.1
    method.agreements.append(0.804)
    reason = method.finished(3, None)
    assert reason is not None and "0.0040" in reason
    method.agreements.append(0.81)
    assert method.finished(4, None) is None  # changed by 0.006 >= 0.005


def test_engine_ends_a_run_by_the_rule_and_reports_the_agreement_curve(tiny_model, tiny_target):
    settled = adapt(
        tiny_model,
        tiny_target,
        "udas",
        {"epochs": 5, "batch_size": 10, "tolerance": 1.0, "min_epochs": 1},
        device="cpu",
    )
    assert settled.stop_reason.startswith("converged")
    assert settled.extra["steps_done"] == 2  # one epoch of 20 slices
    curve = settled.extra["early_final_dice_per_epoch"]
    assert len(curve) == 2 and all(0.0 <= d <= 1.0 for d in curve)
    assert settled.history[-1]["agreement_dice"] == curve[-1]

    full = adapt(
        tiny_model,
        tiny_target,
        "udas",
        {"epochs": 3, "batch_size": 10, "tolerance": 0.0},
        device="cpu",
    )
    assert full.stop_reason == "completed" and full.extra["steps_done"] == 6


def test_udas_improves_dice_on_the_demo_scanner_shift(adapt_demo):
    result, before, after = adapt_demo("udas", {"epochs": 5, "batch_size": 8})
    assert after > before + 0.1, (before, after)
    # the early/final Dice dips before it rises: the collapse guard must not stop this run
    assert result.extra["collapse"] is None, result.extra["collapse"]


def test_the_engine_reuses_the_agreement_pass_for_its_evaluation(tiny_model, tiny_target):
    """UDAS predicts the whole target at the end of each epoch anyway; the engine's evaluation
    after that step takes those probabilities instead of a pass of its own."""
    import napari_uda.adaptation.base as base

    calls = []
    original = base.predict_batches

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    settings = {"epochs": 3, "batch_size": 10, "tolerance": 0.0}
    base.predict_batches = counting
    try:
        udas = adapt(tiny_model, tiny_target, "udas", settings, device="cpu")
        udas_calls = len(calls)
        tent = adapt(tiny_model, tiny_target, "tent", {"epochs": 3, "batch_size": 10}, device="cpu")
    finally:
        base.predict_batches = original
    assert udas_calls == 0 and len(calls) == 3  # TENT: one evaluation pass per epoch
    assert udas.extra["steps_done"] == 6 and tent.extra["steps_done"] == 6
    # and the result is what the adapted model predicts
    again = predict_volume(udas.model, tiny_target, device="cpu")
    np.testing.assert_allclose(again.probabilities, udas.prediction.probabilities, atol=1e-5)
