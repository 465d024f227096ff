"""AdaBN: BatchNorm statistics re-estimated on the target, nothing else changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_uda.adaptation.engine import AdaptationError, adapt
from napari_uda.adaptation.target_statistics import batchnorm_layers
from napari_uda.core.models import ModelBundle, UNet2D, UNetBundleAdapter, UNetConfig
from napari_uda.core.models.torchscript import TorchScriptAdapter, TorchScriptSpec


def test_only_batchnorm_statistics_change_and_match_the_target(tiny_model, tiny_target):
    prepared = tiny_model.prepare(tiny_target)
    # one batch holding every slice: the running mean is exactly the target's mean
    result = adapt(
        tiny_model, tiny_target, "adabn", {"batch_size": prepared.num_slices}, device="cpu"
    )
    before = tiny_model.network.state_dict()
    after = result.model.network.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert changed and all(k.endswith(statistics) for k in changed)
    assert all(layer.momentum == 0.1 for layer in batchnorm_layers(result.model.network))
    first_conv = result.model.network.encoders[0][0]
    with torch.no_grad():
        features = first_conv(prepared.inputs)
    expected = features.mean(dim=(0, 2, 3))
    torch.testing.assert_close(after["encoders.0.1.running_mean"], expected, rtol=1e-4, atol=1e-5)
    assert result.extra["batchnorm_layers_reestimated"] > 0


def test_model_without_batchnorm_is_refused_with_a_clear_reason(tiny_model, tiny_target):
    bundle = tiny_model.bundle
    config = UNetConfig(**{**bundle.architecture.to_dict(), "norm": "instance"})
    model = UNetBundleAdapter(
        ModelBundle.from_model(UNet2D(config), bundle.class_names, bundle.preprocessing)
    )
    with pytest.raises(AdaptationError) as error:
        adapt(model, tiny_target, "adabn", device="cpu")
    assert "needs BatchNorm layers" in str(error.value) and "has none" in str(error.value)


def test_adabn_raises_dice_on_the_demo_scanner_shift(adapt_demo):
    _result, before, after = adapt_demo("adabn")
    assert after > before + 0.1, (before, after)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_scripted_batchnorm_gets_the_same_statistics_as_eager(tiny_target, momentum):
    """TorchScript fixes BatchNorm's momentum; AdaBN still ends with the statistics eager
    BatchNorm (momentum None: the average over all batches) gets from the same batches."""
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),
    ).eval()
    spec = TorchScriptSpec.from_dict(
        {"spatial_dims": 2, "class_names": ["background", "brain"], "normalization": "zscore"}
    )
    eager = TorchScriptAdapter(network, spec)
    scripted = TorchScriptAdapter(torch.jit.script(network), spec)
    settings = {"batch_size": 5}  # several batches of slices: an average, not one batch
    results = [adapt(m, tiny_target, "adabn", settings, device="cpu") for m in (eager, scripted)]
    eager_buffers = dict(results[0].model.network.scripted.named_buffers())
    for name, value in results[1].model.network.scripted.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(value, eager_buffers[name], rtol=1e-4, atol=1e-5)
    assert results[1].extra["batchnorm_layers_reestimated"] == 2
