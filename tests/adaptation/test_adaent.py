"""AdaEnt: entropy + lambda * KL(prior || predicted class ratio); where the prior comes from."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from napari_uda.adaptation.engine import adapt
from napari_uda.core.models import UNetBundleAdapter

QUICK = {"epochs": 1, "batch_size": 8}


def without_statistics(model):
    return UNetBundleAdapter(dataclasses.replace(model.bundle, source_statistics={}))


@pytest.mark.parametrize(
    ("settings", "strip", "source"),
    [
        ({}, False, "bundle"),
        ({"class_ratios": (0.8, 0.2)}, False, "user"),
        ({"prior": "estimate"}, False, "estimate"),
        ({}, True, "estimate"),  # auto falls back to an estimate without source statistics
    ],
)
def test_prior_source_is_chosen_and_reported(tiny_model, tiny_target, settings, strip, source):
    model = without_statistics(tiny_model) if strip else tiny_model
    events = []
    result = adapt(model, tiny_target, "adaent", {**QUICK, **settings}, device="cpu",
                   on_event=events.append)  # fmt: skip
    assert result.extra["prior_source"] == source
    assert events[1].message.startswith(f"class-ratio prior from {source}")
    prior = result.extra["prior"]
    assert sum(prior) == pytest.approx(1.0)
    if source == "user":
        assert prior == pytest.approx([0.8, 0.2])
    if source == "bundle":
        stored = tiny_model.bundle.source_statistics["class_ratios"]
        assert prior == pytest.approx(stored, rel=1e-5)


def test_bad_priors_are_refused(tiny_model, tiny_target):
    with pytest.raises(ValueError, match="class_ratios needs 2"):
        adapt(tiny_model, tiny_target, "adaent", {**QUICK, "class_ratios": (1.0,)}, device="cpu")
    with pytest.raises(ValueError, match="no class_ratios"):
        adapt(without_statistics(tiny_model), tiny_target, "adaent", {**QUICK, "prior": "bundle"},
              device="cpu")  # fmt: skip


def test_kl_term_pulls_the_foreground_towards_the_prior(tiny_model, tiny_target):
    def foreground(ratios, weight):
        settings = {"epochs": 3, "batch_size": 8, "class_ratios": ratios, "kl_weight": weight}
        result = adapt(tiny_model, tiny_target, "adaent", settings, device="cpu")
        assert result.history[-1]["losses"]["kl_prior"] >= 0
        return (result.prediction.labels == 1).mean()

    small, large = foreground((0.97, 0.03), 5.0), foreground((0.6, 0.4), 5.0)
    assert small < large


@pytest.mark.parametrize("parameters", ["norm", "all"])
def test_parameter_choice(tiny_model, tiny_target, parameters):
    settings = {**QUICK, "parameters": parameters, "learning_rate": 1e-3}
    result = adapt(tiny_model, tiny_target, "adaent", settings, device="cpu")
    before = dict(tiny_model.network.named_parameters())
    after = dict(result.model.network.named_parameters())
    conv_changed = [not torch.equal(before[n], after[n]) for n in before if before[n].dim() == 4]
    assert any(conv_changed) == (parameters == "all")
    assert any(not torch.equal(before[n], after[n]) for n in before if before[n].dim() == 1)


def test_adaent_raises_dice_on_the_demo_scanner_shift(adapt_demo):
    result, before, after = adapt_demo("adaent", {"epochs": 3})
    assert after > before + 0.1, (before, after)
    assert result.extra["prior_source"] == "bundle"
