"""The papers' 2D U-Net: shapes for every variant, early head, bottleneck tap, early parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_uda.core.models.unet import UNet2D, UNetConfig


def tiny(**changes) -> UNetConfig:
    values = {"base_channels": 4, "depth": 2, "groups": 2, "dropout": 0.0} | changes
    return UNetConfig(**values)


@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
@pytest.mark.parametrize(("depth", "base_channels"), [(1, 4), (2, 4), (3, 2), (2, 6)])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_output_shapes(norm, depth, base_channels, num_classes):
    config = tiny(norm=norm, depth=depth, base_channels=base_channels, num_classes=num_classes)
    model = UNet2D(config).eval()
    side = 2**depth * 3
    inputs = torch.randn(2, 1, side, 2 * side)

    with torch.no_grad():
        outputs = model.forward_features(inputs)
        logits = model(inputs)

    assert logits.shape == (2, num_classes, side, 2 * side)
    torch.testing.assert_close(outputs.logits, logits)
    assert outputs.early_logits.shape == (2, num_classes, side, 2 * side)
    bottleneck_channels = base_channels * 2**depth
    assert outputs.bottleneck.shape == (2, bottleneck_channels, 3, 6)
    assert len(model.encoders) == depth and len(model.decoders) == depth


def test_norm_layers_follow_the_config():
    kinds = {"batch": nn.BatchNorm2d, "group": nn.GroupNorm, "instance": nn.InstanceNorm2d}
    for norm, kind in kinds.items():
        model = UNet2D(tiny(norm=norm))
        norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
        norms += [m for m in model.modules() if isinstance(m, nn.InstanceNorm2d)]
        assert norms and all(isinstance(m, kind) for m in norms), norm
        assert all(m.weight is not None for m in norms), "affine, so TENT can adapt them"
    with pytest.raises(ValueError, match="norm must be one of batch, group, instance"):
        UNet2D(tiny(norm="layer"))


def test_group_norm_never_has_more_groups_than_channels():
    model = UNet2D(tiny(norm="group", groups=8, base_channels=4))
    first = next(m for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert first.num_groups == 4 and first.num_channels == 4


def test_dropout_is_configurable_and_off_in_eval_mode():
    with_dropout = UNet2D(tiny(dropout=0.5))
    assert any(isinstance(m, nn.Dropout2d) and m.p == 0.5 for m in with_dropout.modules())
    assert not any(isinstance(m, nn.Dropout2d) for m in UNet2D(tiny(dropout=0.0)).modules())
    inputs = torch.randn(1, 1, 8, 8)
    with_dropout.eval()
    with torch.no_grad():
        torch.testing.assert_close(with_dropout(inputs), with_dropout(inputs))


def test_without_early_head():
    model = UNet2D(tiny(early_head=False))
    assert model.early_head is None
    assert model.forward_features(torch.randn(1, 1, 8, 8)).early_logits is None


def test_early_parameters_are_exactly_the_first_encoder_block():
    model = UNet2D(tiny(norm="group"))
    early = model.early_parameters()
    expected = list(model.encoders[0].parameters())
    assert len(early) == len(expected) > 0
    assert all(a is b for a, b in zip(early, expected))
    all_ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in early} < all_ids


def test_early_head_sees_only_the_first_block():
    """UDAS updates the first block from the early head: nothing deeper may feed it."""
    model = UNet2D(tiny(norm="group"))
    outputs = model.forward_features(torch.randn(2, 1, 8, 8))
    outputs.early_logits.sum().backward()
    with_gradient = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_gradient
    assert all(name.startswith(("encoders.0.", "early_head.")) for name in with_gradient)
    assert {name for name, _ in model.encoders[0].named_parameters(prefix="encoders.0")} <= (
        with_gradient
    )


def test_bottleneck_feeds_the_final_head():
    model = UNet2D(tiny(norm="group"))
    outputs = model.forward_features(torch.randn(1, 1, 8, 8))
    (gradient,) = torch.autograd.grad(outputs.logits.sum(), outputs.bottleneck)
    assert gradient.abs().sum() > 0


def test_config_round_trip():
    config = tiny(norm="instance", num_classes=3, early_head=False)
    assert UNetConfig.from_dict(config.to_dict()) == config
    assert UNet2D().config == UNetConfig()


def test_forward_skips_the_early_head_and_equals_forward_features():
    torch.manual_seed(0)
    model = UNet2D(UNetConfig(base_channels=8, depth=2)).eval()
    x = torch.randn(2, 1, 16, 16)
    calls = []
    model.early_head.register_forward_hook(lambda *args: calls.append(1))
    logits = model(x)
    assert not calls
    full = model.forward_features(x)
    assert calls and full.early_logits is not None
    assert torch.equal(logits, full.logits)
    assert model.forward_features(x, early=False).early_logits is None
