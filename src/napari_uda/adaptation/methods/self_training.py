"""ST and CBST: self-training with confident pseudo-labels (Zou et al. 2018).

Zou, Yu, Kumar, Wang. "Unsupervised domain adaptation for semantic segmentation via
class-balanced self-training". ECCV 2018. Each epoch, the current model labels the target with
no gradient (the engine's evaluation pass is reused, so this costs nothing extra); the network
is then fine-tuned with cross-entropy on the confident voxels only, all others ignored.

* ``st``: a voxel is kept when its highest class probability is at least ``threshold``.
* ``cbst``: class-balanced thresholds. For each class, the ``portion`` most confident of the
  voxels predicted as that class are kept, so a small structure is not swamped by background;
  the portion starts at 20 % and grows by 5 % per epoch up to 50 %, as in the paper.

BatchNorm normalises with the target's statistics (training-mode BatchNorm, as when fine-tuning
in the paper): they are re-estimated on the target before the first pseudo-labels and during
every epoch (``target_statistics``). Dropout is off. Padding voxels are never labelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, register
from ..losses import pseudo_label_cross_entropy
from .adabn import TargetStatistics

IGNORE = -1


@dataclass
class SelfTrainingSettings(CommonSettings):
    """Self-training (Adam, lr 1e-4)."""

    epochs: int = setting(5, "Rounds of self-training (pseudo-labels refreshed each).", min=1)
    batch_size: int = setting(16, "Slices per optimiser step.", min=1, max=512)
    learning_rate: float = setting(1e-4, "Adam learning rate.", min=1e-7, max=1.0)
    parameters: Literal["all", "norm"] = setting(
        "all", "Parameters to fine-tune: all (as in the paper) or only normalisation layers."
    )
    target_statistics: bool = setting(
        True,
        "Normalise with the target's BatchNorm statistics: re-estimated before the first "
        "pseudo-labels and during every epoch (training-mode BatchNorm); False keeps the "
        "source statistics.",
    )


@register
class SelfTraining(AdaptationMethod):
    name = "st"
    title = "Self-training (ST)"
    summary = (
        "Fine-tunes on its own confident predictions (pseudo-labels above a confidence "
        "threshold, refreshed every epoch)."
    )
    reference = (
        "Zou Y, Yu Z, Kumar BVK, Wang J. Unsupervised domain adaptation for semantic "
        "segmentation via class-balanced self-training. ECCV 2018."
    )

    @dataclass
    class Settings(SelfTrainingSettings):
        """ST: one confidence threshold for all classes."""

        threshold: float = setting(
            0.9, "Keep voxels whose highest class probability is at least this.", min=0.0, max=1.0
        )

    def setup(self) -> None:
        context, settings = self.context, self.settings
        network = context.model.network.to(context.device)
        self.make_adam(self.select_trainable(settings.parameters))
        network.eval()  # dropout off
        self.rounds: list[dict] = []
        self.steps_in_epoch = self.steps_per_epoch()
        self.statistics = TargetStatistics(network) if settings.target_statistics else None
        if self.statistics is None:
            self.refresh(context.initial_probabilities, round_index=0)
            return
        self.statistics.start()
        self.statistics.estimate(context, max(settings.batch_size, context.inference_batch_size))
        self.refresh(context.predict_target(cached=False), round_index=0)

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
        self.refresh(self.context.predict_target(), round_index=epoch)

    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        new_epoch = (step - 1) % self.steps_in_epoch == 0
        if self.statistics is not None and new_epoch:
            self.statistics.restart()
        inputs, _ = self.context.batch(batch_index)
        targets = self.pseudo_labels[batch_index].to(self.context.device)
        with self.context.autocast():
            logits = self.context.model.forward(inputs).logits
        loss = pseudo_label_cross_entropy(logits, targets, ignore_index=IGNORE)
        self.optimise(loss)
        message = ""
        if new_epoch:
            facts = self.rounds[-1]
            message = f"pseudo-labels on {facts['labelled_fraction']:.1%} of voxels"
        value = loss.item()
        return StepOutput({"total": value, "cross_entropy": value}, message=message)

    def finish(self) -> None:
        if self.statistics is not None:
            self.statistics.finish()

    def report(self) -> dict:
        return {"pseudo_label_rounds": self.rounds}


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

        initial_portion: float = setting(
            0.2, "Portion of each class's voxels kept in the first round.", min=0.0, max=1.0
        )
        portion_step: float = setting(
            0.05, "Added to the portion after every round.", min=0.0, max=1.0
        )
        max_portion: float = setting(0.5, "Largest portion.", min=0.0, max=1.0)

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
