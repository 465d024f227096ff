"""AIVA: clustering, Hungarian matching, alignment loss, lambda, source statistics, and a real
domain shift."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_uda.adaptation.base import AdaptationContext
from napari_uda.adaptation.engine import AdaptationError, adapt
from napari_uda.adaptation.methods.aiva import (
    AIVA,
    SOURCE_FEATURES_KEY,
    AIVASettings,
    alignment_loss,
    compute_source_statistics,
    kmeans,
    match_clusters,
)
from napari_uda.core.models import UNetBundleAdapter


def test_hungarian_matching_recovers_a_known_permutation():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(12, 5)) * 10
    permutation = rng.permutation(12)
    target = source[permutation] + rng.normal(size=(12, 5)) * 0.5
    matches = match_clusters(target, source)
    assert np.array_equal(matches, permutation)
    # one-to-one even where the nearest centre would be shared
    crowded = np.array([[0.0], [0.1], [10.0]])
    assert sorted(match_clusters(crowded, np.array([[0.0], [5.0], [10.0]]))) == [0, 1, 2]


def test_kmeans_finds_separated_groups_and_caps_k():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([c + rng.normal(size=(20, 2)) * 0.3 for c in centres])
    clustering = kmeans(points, 3, seed=0)
    truth = np.repeat(np.arange(3), 20)
    for group in range(3):  # each true group is one cluster
        assert len(np.unique(clustering.labels[truth == group])) == 1
    assert len(np.unique(clustering.labels)) == 3
    assert len(kmeans(points[:5], 12, seed=0).centres) <= 5


def test_alignment_loss_pulls_cluster_means_to_their_anchors():
    anchors = torch.tensor([[0.0, 0.0], [4.0, 4.0]])
    features = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [4.0, 4.0], [9.0, 9.0]])
    clusters = torch.tensor([0, 0, 1, -1])  # cluster means sit on their anchors; -1 ignored
    assert float(alignment_loss(features, clusters, anchors)) == pytest.approx(0.0)
    shifted = features + torch.tensor([1.0, 3.0])
    assert float(alignment_loss(shifted, clusters, anchors)) == pytest.approx(5.0)


def _context(adapter, inputs) -> AdaptationContext:
    frozen = adapter.clone()
    return AdaptationContext(
        model=adapter,
        source_model=frozen,
        target_inputs=inputs,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        initial_probabilities=torch.full((inputs.shape[0], 2, *inputs.shape[2:]), 0.5),
        source_pack=adapter.source_pack(),
    )


def test_lambda_makes_the_first_alignment_term_about_one(tiny_model):
    inputs = tiny_model.source_pack().images * 0.7 + 0.2  # a shifted copy as the target
    adapter = tiny_model.clone()
    method = AIVA(AIVASettings(clusters=3, batch_size=2), _context(adapter, inputs))
    method.setup()
    features = compute_source_statistics(adapter, inputs)[SOURCE_FEATURES_KEY]
    first = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(0))
    initial = np.mean(
        [
            float(alignment_loss(features[i], method.target_anchor_index[i], method.source_anchors))
            for i in first.split(2)[:3]
        ]
    )
    assert method.lambda_ * initial == pytest.approx(1.0, rel=1e-4)
    output = method.step(torch.arange(inputs.shape[0]), step=1)
    assert {"alignment", "source_segmentation"} <= set(output.losses)


def test_stored_source_statistics_replace_source_images(tiny_model, tiny_target):
    adapter = tiny_model.clone()
    pack = adapter.source_pack()
    statistics = compute_source_statistics(adapter, pack.images)
    channels = adapter.network.config.base_channels * 2**adapter.network.config.depth
    assert statistics[SOURCE_FEATURES_KEY].shape == (len(pack), channels)

    without_pack = dataclasses.replace(adapter.bundle, source_pack=None, source_statistics={})
    with pytest.raises(AdaptationError, match="source"):
        adapt(UNetBundleAdapter(without_pack), tiny_target, "aiva", {"epochs": 1}, device="cpu")

    stats_only = dataclasses.replace(without_pack, source_tensors=statistics)
    result = adapt(
        UNetBundleAdapter(stats_only),
        tiny_target,
        "aiva",
        {"epochs": 1, "clusters": 3},
        device="cpu",
    )
    assert result.extra["steps_done"] >= 1
    assert "source_segmentation" not in result.history[0]["losses"]


def test_aiva_improves_dice_on_the_demo_scanner_shift(adapt_demo):
    _result, before, after = adapt_demo("aiva", {"epochs": 3, "batch_size": 8})
    assert after > before + 0.1, (before, after)
