"""ST and CBST: self-training with confident pseudo-labels (Zou et al. 2018).

Zou, Yu, Kumar, Wang. "Unsupervised domain adaptation for semantic segmentation via
class-balanced self-training". ECCV 2018. The model labels the target with no gradient; the
network is then fine-tuned with cross-entropy on the confident voxels only, all others ignored,
together with cross-entropy on labelled source slices (the bundle's source pack, when it has
one), as in the paper's joint source + target objective.

* ``st``: a voxel is kept when its highest class probability is at least ``threshold``.
* ``cbst``: class-balanced thresholds. For each class, the ``portion`` most confident of the
  voxels predicted as that class are kept, so a small structure is not swamped by background;
  the portion starts at 20 % and grows by 5 % per round (epoch) up to 50 %, as in the paper.

BatchNorm: the target's statistics are estimated once, with no gradient, before the first
pseudo-labels (as AdaBN; ``target_statistics``) and then stay fixed while the weights are tuned
(evaluation-mode BatchNorm; source slices are normalised the same way). Dropout is off.
Padding voxels are never labelled.

Why these defaults. On one scan, pseudo-labels refreshed by the model being trained feed its
drift back into its own labels (CBST's class-balanced selection then shrinks a structure round
after round), and BatchNorm fed each small training batch's statistics wanders with the batch.
So by default every round selects its pseudo-labels from the first prediction (the source
weights with the target's statistics: the paper's first round; ``refresh_every`` restores
refreshing), with the paper's threshold (``st``: 0.9) or portion schedule (``cbst``: 20 %, +5 %
per round, at most 50 %), fixed target BatchNorm statistics, Adam at 3e-5 (the paper
fine-tunes with a small rate) and the source pack, which anchors the task. Self-training on one
scan mainly sharpens what the first pseudo-labels say: expect small gains over AdaBN
(docs/benchmarks.md has the measured numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ...settings import setting
from ..base import (
    AdaptationMethod,
    CommonSettings,
    StepOutput,
    fraction_setting,
    learning_rate_setting,
    register,
)
from ..losses import pseudo_label_cross_entropy
from ..target_statistics import TargetStatistics

IGNORE = -1


@dataclass
class SelfTrainingSettings(CommonSettings):
    """Self-training (Adam, lr 3e-5)."""

    epochs: int = setting(
        5, "Rounds of self-training (pseudo-labels selected anew each, see refresh_every).", min=1
    )
    batch_size: int = setting(16, "Slices per optimiser step.", min=1, max=512)
    learning_rate: float = learning_rate_setting(3e-5)
    parameters: Literal["all", "norm"] = setting(
        "all", "Parameters to fine-tune: all (as in the paper) or only normalisation layers."
    )
    target_statistics: bool = setting(
        True,
        "Estimate the target's BatchNorm statistics once (no gradient, as AdaBN) before the "
        "first pseudo-labels and keep them while tuning; False keeps the source statistics.",
    )
    refresh_every: int = setting(
        0,
        "Recompute the pseudo-labels with the current model every N epochs (a new round); 0: "
        "never, every round selects from the first pseudo-labels (the source weights with the "
        "target's BatchNorm statistics).",
        min=0,
        max=1000,
    )
    source_weight: float = setting(
        1.0,
        "Weight of the cross-entropy on labelled source-pack slices, trained together with "
        "the target pseudo-labels as in the paper (0, or a model without a source pack: "
        "target only).",
        min=0.0,
        max=100.0,
    )


@register
class SelfTraining(AdaptationMethod):
    name = "st"
    title = "Self-training (ST)"
    uses_source_data = True
    summary = (
        "Fine-tunes on its own confident predictions (pseudo-labels above a confidence "
        "threshold), with labelled source slices when the bundle has them."
    )
    reference = (
        "Zou Y, Yu Z, Kumar BVK, Wang J. Unsupervised domain adaptation for semantic "
        "segmentation via class-balanced self-training. ECCV 2018."
    )

    @dataclass
    class Settings(SelfTrainingSettings):
        """ST: one confidence threshold for all classes."""

        threshold: float = fraction_setting(
            0.9, "Keep voxels whose highest class probability is at least this."
        )

    def setup(self) -> None:
        context, settings = self.context, self.settings
        network = context.model.network.to(context.device)
        self.make_adam(self.select_trainable(settings.parameters))
        self.rounds: list[dict] = []
        self.use_source = settings.source_weight > 0 and context.source_pack is not None
        if settings.target_statistics:  # AdaBN once, then fixed while the weights are tuned
            statistics = TargetStatistics(network)
            statistics.start()
            statistics.estimate(context, max(settings.batch_size, context.inference_batch_size))
            statistics.finish()
        network.eval()  # dropout off; BatchNorm normalises with the stored statistics
        first = (
            context.predict_target(cached=False)
            if settings.target_statistics
            else context.initial_probabilities
        )
        self.probabilities = first
        self.refresh(first, round_index=0)

    def select(self, confidence, labels, valid, round_index: int) -> tuple[torch.Tensor, dict]:
        """Boolean mask of the voxels to keep, and facts about the choice."""
        return valid & (confidence >= self.settings.threshold), {
            "threshold": self.settings.threshold
        }

    def refresh(self, probabilities: torch.Tensor, round_index: int) -> None:
        """Pseudo-labels from (N, C, ...) probabilities (no gradient)."""
        confidence, labels = probabilities.max(dim=1)
        mask = self.context.valid_mask
        valid = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask[:, 0]
        keep, facts = self.select(confidence, labels, valid, round_index)
        self.pseudo_labels = torch.where(keep, labels, torch.full_like(labels, IGNORE))
        counts = torch.bincount(labels[keep].flatten(), minlength=probabilities.shape[1])
        facts["labelled_fraction"] = float(keep.sum()) / max(int(valid.sum()), 1)
        facts["labelled_per_class"] = [int(c) for c in counts]
        self.rounds.append(facts)

    def end_epoch(self, epoch: int) -> None:
        every = self.settings.refresh_every
        if every and epoch % every == 0:
            self.probabilities = self.context.predict_target()  # the engine's evaluation
        self.refresh(self.probabilities, round_index=epoch)

    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        new_epoch = (step - 1) % self.steps_per_epoch() == 0
        inputs, _ = self.context.batch(batch_index)
        targets = self.pseudo_labels[batch_index].to(self.context.device)
        with self.context.autocast():
            logits = self.context.model.forward(inputs).logits
            target_loss = pseudo_label_cross_entropy(logits, targets, ignore_index=IGNORE)
            source, source_losses = self.source_loss(self._source_terms, self.use_source)
            loss = target_loss + self.settings.source_weight * source
        self.optimise(loss)
        message = ""
        if new_epoch:
            facts = self.rounds[-1]
            message = f"pseudo-labels on {facts['labelled_fraction']:.1%} of voxels"
        return StepOutput(
            {"total": loss.item(), "cross_entropy": target_loss.item(), **source_losses},
            message=message,
        )

    def _source_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Cross-entropy with the labels of source slices (normalised like the target)."""
        logits = self.context.model.forward(images).logits
        return {"source_cross_entropy": F.cross_entropy(logits.float(), labels)}

    def report(self) -> dict:
        return {
            "pseudo_label_rounds": self.rounds,
            "self_training_source_pack_used": self.use_source,
        }


@register
class ClassBalancedSelfTraining(SelfTraining):
    name = "cbst"
    title = "Class-balanced self-training (CBST)"
    summary = (
        "Self-training with class-balanced pseudo-labels: the most confident portion of each "
        "class, a portion that grows every epoch."
    )

    @dataclass
    class Settings(SelfTrainingSettings):
        """CBST: portion schedule of the paper (20 %, +5 % per round, at most 50 %)."""

        initial_portion: float = fraction_setting(
            0.2, "Portion of each class's voxels kept in the first round."
        )
        portion_step: float = fraction_setting(0.05, "Added to the portion after every round.")
        max_portion: float = fraction_setting(0.5, "Largest portion.")

    def portion(self, round_index: int) -> float:
        settings = self.settings
        return min(
            settings.initial_portion + round_index * settings.portion_step, settings.max_portion
        )

    def select(self, confidence, labels, valid, round_index: int) -> tuple[torch.Tensor, dict]:
        portion = self.portion(round_index)
        keep = torch.zeros_like(valid)
        thresholds = []
        for c in range(self.context.model.num_classes):
            of_class = valid & (labels == c)
            scores = confidence[of_class]
            count = round(scores.numel() * portion)
            if count == 0:
                thresholds.append(None)
                continue
            # the count-th largest confidence of the class is its threshold
            threshold = float(torch.kthvalue(scores, scores.numel() - count + 1).values)
            thresholds.append(threshold)
            keep |= of_class & (confidence >= threshold)
        return keep, {"portion": portion, "thresholds": thresholds}
