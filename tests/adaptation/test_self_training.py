"""ST and CBST: confident pseudo-labels once per epoch, cross-entropy on them only."""

from __future__ import annotations

import pytest
import torch

from napari_uda.adaptation.base import AdaptationContext
from napari_uda.adaptation.methods.self_training import (
    IGNORE,
    ClassBalancedSelfTraining,
    SelfTraining,
)


def make_context(probabilities: torch.Tensor, valid: torch.Tensor, model) -> AdaptationContext:
    return AdaptationContext(
        model=model,
        source_model=model,
        target_inputs=torch.zeros(probabilities.shape[0], 1, *probabilities.shape[2:]),
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        initial_probabilities=probabilities,
        valid_mask=valid,
    )


@pytest.fixture
def probabilities():
    """Two slices of 6x6 voxels: a confident-background region, a less confident foreground."""
    generator = torch.Generator().manual_seed(0)
    foreground = torch.rand(2, 1, 6, 6, generator=generator)
    foreground[:, :, :, :3] *= 0.3  # left half clearly background
    return torch.cat([1 - foreground, foreground], dim=1)


def test_st_keeps_voxels_above_the_threshold_and_never_padding(tiny_model, probabilities):
    """Pseudo-labels from given probabilities (the source statistics, so no forward pass)."""
    valid = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    valid[:, :, -1] = False  # a padded row
    method = SelfTraining(
        SelfTraining.Settings(threshold=0.8, target_statistics=False),
        make_context(probabilities, valid, tiny_model.clone()),
    )
    method.setup()
    confidence, labels = probabilities.max(1)
    expected = torch.where((confidence >= 0.8) & valid[:, 0], labels, IGNORE)
    torch.testing.assert_close(method.pseudo_labels, expected)
    assert (method.pseudo_labels[:, -1] == IGNORE).all()
    assert method.rounds[0]["labelled_fraction"] == pytest.approx(
        float((expected != IGNORE).sum()) / float(valid.sum())
    )


def test_cbst_keeps_the_most_confident_portion_of_each_class(tiny_model, probabilities):
    valid = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    settings = ClassBalancedSelfTraining.Settings(initial_portion=0.5, target_statistics=False)
    method = ClassBalancedSelfTraining(settings, make_context(probabilities, valid, tiny_model))
    method.setup()
    confidence, labels = probabilities.max(1)
    for c in (0, 1):
        of_class = labels == c
        kept = (method.pseudo_labels == c) & of_class
        assert int(kept.sum()) == round(0.5 * int(of_class.sum()))
        # every kept voxel is at least as confident as every dropped one of the same class
        dropped = of_class & ~kept
        if dropped.any():
            assert confidence[kept].min() >= confidence[dropped].max()
    # the portion grows 5 % per round up to the maximum
    assert [method.portion(r) for r in range(3)] == pytest.approx([0.5, 0.5, 0.5])
    default = ClassBalancedSelfTraining(ClassBalancedSelfTraining.Settings(), method.context)
    assert [default.portion(r) for r in (0, 1, 6, 10)] == pytest.approx([0.2, 0.25, 0.5, 0.5])


def test_rounds_select_from_the_first_labels_unless_refreshed(tiny_model, tiny_target):
    from napari_uda.adaptation.engine import adapt

    result = adapt(tiny_model, tiny_target, "cbst", {"epochs": 3, "batch_size": 8}, device="cpu")
    rounds = result.extra["pseudo_label_rounds"]
    assert [r["portion"] for r in rounds] == pytest.approx([0.2, 0.25, 0.3, 0.35])
    assert rounds[-1]["labelled_fraction"] > rounds[0]["labelled_fraction"]
    # ST with fixed labels: the same voxels every round; refreshed: from each evaluation
    settings = {"epochs": 3, "batch_size": 8, "learning_rate": 1e-3}
    fixed = adapt(tiny_model, tiny_target, "st", settings, device="cpu")
    counts = [r["labelled_per_class"] for r in fixed.extra["pseudo_label_rounds"]]
    assert all(c == counts[0] for c in counts)
    refreshed = adapt(tiny_model, tiny_target, "st", {**settings, "refresh_every": 1}, device="cpu")
    counts = [r["labelled_per_class"] for r in refreshed.extra["pseudo_label_rounds"]]
    assert len(counts) == 4 and any(c != counts[0] for c in counts[1:])


@pytest.mark.parametrize("method", ["st", "cbst"])
def test_self_training_raises_dice_on_the_demo_scanner_shift(method, adapt_demo):
    _result, before, after = adapt_demo(method, {"epochs": 3})
    assert after > before + 0.1, (before, after)


def test_the_source_pack_is_trained_with_the_pseudo_labels(tiny_model, tiny_target):
    from napari_uda.adaptation.engine import adapt

    settings = {"epochs": 1, "batch_size": 8}
    result = adapt(tiny_model, tiny_target, "st", settings, device="cpu")
    assert result.extra["self_training_source_pack_used"]
    assert "source_cross_entropy" in result.history[-1]["losses"]
    alone = adapt(tiny_model, tiny_target, "st", {**settings, "source_weight": 0}, device="cpu")
    assert not alone.extra["self_training_source_pack_used"]
    assert "source_cross_entropy" not in alone.history[-1]["losses"]
