"""TENT: entropy minimisation of the normalisation layers' affine parameters only."""

from __future__ import annotations

import torch

from napari_uda.adaptation.engine import adapt
from napari_uda.core.models import ModelBundle, UNet2D, UNetBundleAdapter, UNetConfig
from napari_uda.core.models.adapter import norm_affine_parameters


def changed_parameters(before, after) -> set[str]:
    return {
        name
        for name, parameter in before.network.named_parameters()
        if not torch.equal(parameter, dict(after.network.named_parameters())[name])
    }


def norm_parameter_names(model) -> set[str]:
    ids = {id(p) for p in norm_affine_parameters(model.network)}
    return {name for name, p in model.network.named_parameters() if id(p) in ids}


def test_only_normalisation_affine_parameters_change(tiny_model, tiny_target):
    result = adapt(tiny_model, tiny_target, "tent", {"epochs": 2, "batch_size": 8}, device="cpu")
    changed = changed_parameters(tiny_model, result.model)
    assert changed and changed <= norm_parameter_names(tiny_model)
    losses = [h["losses"]["entropy"] for h in result.history]
    assert min(losses[-2:]) < losses[0]  # entropy goes down


def test_works_with_group_norm(tiny_model, tiny_target):
    bundle = tiny_model.bundle
    config = UNetConfig(**{**bundle.architecture.to_dict(), "norm": "group", "groups": 2})
    torch.manual_seed(0)
    model = UNetBundleAdapter(
        ModelBundle.from_model(UNet2D(config), bundle.class_names, bundle.preprocessing)
    )
    result = adapt(model, tiny_target, "tent", {"epochs": 1, "batch_size": 8}, device="cpu")
    changed = changed_parameters(model, result.model)
    assert changed and changed <= norm_parameter_names(model)
    assert any("encoders.0.1" in name for name in changed)  # a GroupNorm layer


def test_tent_raises_dice_on_the_demo_scanner_shift(adapt_demo):
    result, before, after = adapt_demo("tent", {"epochs": 3})
    assert after > before + 0.1, (before, after)
    assert result.extra["collapse"] is None
