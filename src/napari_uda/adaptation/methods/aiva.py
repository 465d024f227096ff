"""AIVA: unsupervised site adaptation by intra-site variability alignment.

Each site's slices are not one blob in feature space but several sub-populations (slice level,
anatomy in view, contrast). AIVA aligns them sub-population by sub-population:

1. Bottleneck features of source and target slices, global-average-pooled per slice
   (``adapter.forward(x, features=True).bottleneck``).
2. A common low-dimensional embedding of both sites, then k-means per site (k = 12).
3. The Hungarian algorithm (:func:`scipy.optimize.linear_sum_assignment`) matches every target
   cluster to one source cluster (nearest centres, one-to-one).
4. An alignment loss pulls the mean feature of each target cluster in a batch towards the mean
   feature of its matched source cluster (mean squared distance in the bottleneck space); its
   weight lambda is the reciprocal of the alignment loss on the first target batches, so the
   term starts at about 1, the size of the segmentation loss.
5. A segmentation loss (soft Dice + cross-entropy) on labelled source slices keeps the task.

Embedding: the paper embeds with PCA and t-SNE. t-SNE is slow, stochastic and cannot place new
points in an existing map, so here the embedding is PCA alone (``embedding_dims`` components
fitted on both sites' features once, at the start): the source centres stay fixed and the target
can be re-clustered after every epoch in the same space. scikit-learn is not needed: PCA is an SVD
and k-means is :func:`scipy.cluster.vq.kmeans2` (k-means++ initialisation, seeded).

Source data: source features come from the bundle's stored statistics when present (tensor
``aiva_source_features``, made with :func:`compute_source_statistics` at training time, so no
source image is needed), otherwise from the source pack through the frozen source model. The
segmentation loss needs the source pack; with statistics only, the method aligns features alone.

On a BatchNorm network, part of the gain comes from the BatchNorm statistics following the
target while training (what AdaBN does alone) rather than from the cluster alignment;
``alignment_scale = 0`` separates the two (docs/benchmarks.md has the measured numbers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2
from scipy.optimize import linear_sum_assignment

from ...core.models.adapter import BOTTLENECK, SOURCE_PACK, SOURCE_STATISTICS, ModelAdapter
from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, register
from ..losses import soft_dice_loss

#: Key of the stored source features in a bundle's ``source_tensors``.
SOURCE_FEATURES_KEY = "aiva_source_features"


@dataclass
class AIVASettings(CommonSettings):
    """AIVA settings."""

    clusters: int = setting(12, "k-means clusters per site (paper: 12).", min=1, max=100)
    embedding_dims: int = setting(
        10, "PCA components of the common embedding used for clustering.", min=1, max=256
    )
    lambda_batches: int = setting(
        3,
        "Target batches whose mean alignment loss sets lambda (its reciprocal).",
        min=1,
        max=100,
    )
    alignment_scale: float = setting(
        1.0,
        "Extra factor on lambda (1: the alignment term starts at about 1).",
        min=0.0,
        max=100.0,
    )
    recluster_every_epoch: bool = setting(
        True, "Re-cluster the target features with the current model after every epoch."
    )


def pooled_bottleneck(adapter: ModelAdapter, images: torch.Tensor) -> torch.Tensor:
    """(B, D) bottleneck features of ``images``, averaged over the spatial axes."""
    bottleneck = adapter.forward(images, features=True).bottleneck
    if bottleneck is None:
        raise ValueError("this model does not expose its bottleneck features")
    return bottleneck.flatten(2).mean(-1)


@torch.no_grad()
def bottleneck_features(
    adapter: ModelAdapter, images: torch.Tensor, *, batch_size: int = 32, device=None
) -> torch.Tensor:
    """Pooled bottleneck features (N, D) of network inputs (N, C, ...), in eval mode, on CPU."""
    network = adapter.network
    was_training = network.training
    device = device or next(network.parameters()).device
    network.eval()
    try:
        chunks = [
            pooled_bottleneck(adapter, images[start : start + batch_size].to(device)).cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    finally:
        network.train(was_training)
    return torch.cat(chunks).float()


def compute_source_statistics(
    adapter: ModelAdapter, images: torch.Tensor, *, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """What AIVA needs from the source, for a bundle's ``source_tensors``.

    Call it at the end of source training with the (preprocessed) source slices (N, C, H, W)::

        bundle.source_tensors.update(compute_source_statistics(adapter, slices))

    Returns ``{"aiva_source_features": (N, D) float32}``: the pooled bottleneck features of every
    source slice under the trained model (a few hundred numbers per slice; no image content).
    """
    return {SOURCE_FEATURES_KEY: bottleneck_features(adapter, images, batch_size=batch_size)}


@dataclass
class Clustering:
    """k-means of one site in the common embedding."""

    centres: np.ndarray  # (k, E) in the embedding
    labels: np.ndarray  # (N,) cluster of each slice


def pca_basis(features: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and the top ``dims`` principal axes (D, dims) of ``features`` (N, D)."""
    mean = features.mean(0)
    _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
    return mean, vt[: min(dims, vt.shape[0])].T


def kmeans(points: np.ndarray, k: int, seed: int) -> Clustering:
    """k-means++ (scipy), ``k`` capped at the number of points; empty clusters are dropped."""
    k = max(1, min(k, len(points)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "One of the clusters is empty": handled below
        centres, labels = kmeans2(points, k, minit="++", seed=np.random.default_rng(seed))
    used = np.unique(labels)
    remap = np.full(k, -1)
    remap[used] = np.arange(len(used))
    return Clustering(centres[used], remap[labels])


def match_clusters(target_centres: np.ndarray, source_centres: np.ndarray) -> np.ndarray:
    """For each target centre, the index of its source centre under the one-to-one matching
    of least total distance (Hungarian algorithm); -1 where there are fewer source centres."""
    cost = np.linalg.norm(target_centres[:, None, :] - source_centres[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    matches = np.full(len(target_centres), -1)
    matches[rows] = cols
    return matches


def alignment_loss(
    features: torch.Tensor, clusters: torch.Tensor, anchors: torch.Tensor
) -> torch.Tensor:
    """Mean over the clusters present in the batch of the mean squared distance between the
    cluster's mean feature and its anchor. ``clusters`` (B,) indexes ``anchors`` (K, D);
    entries < 0 are ignored."""
    losses = []
    for cluster in torch.unique(clusters):
        if cluster < 0:
            continue
        members = features[clusters == cluster]
        losses.append(F.mse_loss(members.mean(0), anchors[cluster]))
    if not losses:
        return features.sum() * 0.0
    return torch.stack(losses).mean()


@register
class AIVA(AdaptationMethod):
    name = "aiva"
    title = "AIVA (intra-site variability alignment)"
    summary = (
        "Bottleneck features of each site are clustered; matched target clusters are pulled "
        "to their source centres, with a segmentation loss on source slices."
    )
    reference = (
        "Goodman, Kasten Serlin, Greenspan, Goldberger. Unsupervised site adaptation by "
        "intra-site variability alignment. MICCAI workshops (DART), 2022."
    )
    Settings = AIVASettings
    requires = frozenset({BOTTLENECK})
    requires_any = frozenset({SOURCE_PACK, SOURCE_STATISTICS})
    uses_source_data = True

    settings: AIVASettings

    def setup(self) -> None:
        settings, context = self.settings, self.context
        self.network = context.model.network.to(context.device)
        self.make_adam(self.select_trainable("all"))
        self.seed = int(torch.randint(2**31 - 1, (1,), generator=context.generator))

        source_features = self._source_features()
        target_features = self._target_features()
        joint = np.concatenate([source_features, target_features])
        self.pca_mean, self.pca_axes = pca_basis(joint, settings.embedding_dims)
        source_clusters = kmeans(self._embed(source_features), settings.clusters, self.seed)
        self.source_centres = source_clusters.centres
        self.source_anchors = torch.stack(
            [
                torch.from_numpy(source_features[source_clusters.labels == c].mean(0))
                for c in range(len(source_clusters.centres))
            ]
        ).to(context.device)
        self._cluster_target(target_features)
        self.lambda_ = settings.alignment_scale / max(
            self._initial_alignment(target_features), 1e-8
        )

    # -- source and target features -------------------------------------------------------------
    def _source_features(self) -> np.ndarray:
        context = self.context
        stored = context.model.source_tensors().get(SOURCE_FEATURES_KEY)
        if stored is not None:
            self.source_features_from = "bundle statistics"
            return stored.float().cpu().numpy()
        if context.source_pack is None or len(context.source_pack) == 0:
            raise ValueError(
                "AIVA needs source features: a source pack or stored "
                f"'{SOURCE_FEATURES_KEY}' statistics in the bundle"
            )
        self.source_features_from = "source pack"
        return bottleneck_features(
            context.source_model, context.source_pack.images, device=context.device
        ).numpy()

    def _target_features(self) -> np.ndarray:
        context = self.context
        return bottleneck_features(
            context.model, context.target_inputs, device=context.device
        ).numpy()

    def _embed(self, features: np.ndarray) -> np.ndarray:
        return (features - self.pca_mean) @ self.pca_axes

    def _cluster_target(self, target_features: np.ndarray) -> None:
        """Cluster the target, match clusters to source clusters, store each slice's anchor."""
        clusters = kmeans(self._embed(target_features), self.settings.clusters, self.seed)
        matches = match_clusters(clusters.centres, self.source_centres)
        self.target_anchor_index = torch.from_numpy(matches[clusters.labels]).long()
        self.target_clusters = clusters

    @torch.no_grad()
    def _initial_alignment(self, target_features: np.ndarray) -> float:
        """Mean alignment loss of the first target batches with the unadapted model."""
        context = self.context
        batches = context.target_batches(self.settings.batch_size)
        values = []
        for _, index in zip(range(self.settings.lambda_batches), batches):
            features = torch.from_numpy(target_features[index.numpy()])
            anchors = self.target_anchor_index[index]
            values.append(float(alignment_loss(features, anchors, self.source_anchors.cpu())))
        return float(np.mean(values))

    # -- training -------------------------------------------------------------------------------
    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        context = self.context
        self.network.train()
        images, _ = context.batch(batch_index)
        anchors = self.target_anchor_index[batch_index].to(context.device)
        with context.autocast():
            features = pooled_bottleneck(context.model, images).float()
            alignment = alignment_loss(features, anchors, self.source_anchors)
            segmentation, source_losses = self.source_loss(self._source_terms)
            total = self.lambda_ * alignment + segmentation
            losses = {
                "alignment": float(alignment.detach()),
                "lambda": self.lambda_,
                **source_losses,
            }
        self.optimise(total)
        return StepOutput({"total": float(total.detach()), **losses})

    def _source_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Soft Dice + cross-entropy on labelled source slices."""
        logits = self.context.model.forward(images).logits.float()
        segmentation = soft_dice_loss(torch.softmax(logits, 1), labels)
        return {"source_segmentation": segmentation + F.cross_entropy(logits, labels)}

    def end_epoch(self, epoch: int) -> None:
        if self.settings.recluster_every_epoch:
            self._cluster_target(self._target_features())

    def report(self) -> dict:
        return {
            "aiva_source_features_from": self.source_features_from,
            "aiva_lambda": self.lambda_,
            "aiva_source_clusters": len(self.source_centres),
            "aiva_target_clusters": len(self.target_clusters.centres),
        }
