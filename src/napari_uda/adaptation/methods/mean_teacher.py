"""Mean Teacher self-ensembling for segmentation (Perone et al., NeuroImage 2019).

A *student* (the model being adapted) and a *teacher* whose weights are an exponential moving
average (EMA) of the student's: ``teacher <- alpha * teacher + (1 - alpha) * student`` after every
optimiser step, with ``alpha`` = 0.99 while the consistency weight ramps up and 0.999 afterwards
(the paper raises alpha later in training). On each target batch the student sees a randomly
transformed slice ``g(x)`` and the teacher the original ``x``; the teacher's probabilities are
transformed with the *same* ``g`` (:mod:`napari_uda.core.augment`) and the student is pulled
towards them by a consistency loss (MSE by default; cross-entropy and Dice selectable, which the
paper found less stable). The consistency weight follows the sigmoid ramp-up
``w(t) = weight * exp(-5 (1 - t)^2)`` for ``t`` = progress through the ramp-up in [0, 1].
When the bundle has a source pack, a Dice task loss on its labelled slices is added (the paper's
setting); without one, or with ``source_free``, the method adapts on the target alone (one-shot).

Paper defaults (``neuropoly/domainadaptation`` experiment files): consistency weight 20, MSE,
ramp-up over 100 of 350 epochs (here a fraction of the run, 0.3), EMA 0.99 then 0.999, Adam.
The teacher, like in the paper, runs in training mode (dropout, batch statistics) with no
gradient; the adapted model returned is the student.

Learning rate: 1e-4 (the common default). The paper's 6e-4, with warm-up and cosine decay,
trained a network from scratch; here a trained model is fine-tuned (6e-4 gave the same demo
result).

Agreement (the live label-free Dice): Dice between the student's and the teacher's labels on
each batch.

On one scan with a BatchNorm network, much of the gain comes from the BatchNorm statistics
following the target while the student trains (what AdaBN does alone) rather than from the
consistency term, which the paper ran for hundreds of epochs over many target images;
``consistency_weight = 0`` separates the two (measured numbers: docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ...core.augment import PairedTransform, SpatialAugmentation
from ...core.inference import class_labels
from ...core.metrics import mean_foreground_dice
from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, fraction_setting, register
from ..losses import consistency_loss, soft_dice_loss

#: User-facing consistency names -> kinds of :func:`..losses.consistency_loss`.
CONSISTENCY_LOSSES = {"mse": "mse", "cross_entropy": "ce", "dice": "dice"}


@dataclass
class MeanTeacherSettings(CommonSettings):
    """Mean Teacher settings (paper defaults where the paper gives one)."""

    consistency_loss: str = setting(
        "mse",
        "Consistency between student and teacher: mse (paper default), cross_entropy or dice.",
        choices=tuple(CONSISTENCY_LOSSES),
    )
    consistency_weight: float = setting(
        20.0, "Weight of the consistency loss after ramp-up (paper: 20).", min=0.0, max=1000.0
    )
    rampup_fraction: float = fraction_setting(
        0.3,
        "Fraction of the run over which the consistency weight follows exp(-5(1-t)^2) "
        "(paper: 100 of 350 epochs).",
    )
    ema_alpha: float = fraction_setting(
        0.99, "EMA decay of the teacher during the ramp-up (paper: 0.99)."
    )
    ema_alpha_late: float = fraction_setting(
        0.999, "EMA decay of the teacher after the ramp-up (paper: 0.999)."
    )
    rotation_degrees: float = setting(
        15.0, "Random rotation of the student's input, +- degrees.", min=0.0, max=180.0
    )
    max_translation: float = setting(
        0.1, "Random shift of the student's input, +- fraction of the slice.", min=0.0, max=0.5
    )
    scale_low: float = setting(0.9, "Smallest random zoom factor.", min=0.5, max=1.0)
    scale_high: float = setting(1.1, "Largest random zoom factor.", min=1.0, max=2.0)
    flip_probability: float = fraction_setting(0.0, "Probability of mirroring each slice axis.")
    source_free: bool = setting(
        False,
        "Adapt on the target alone (one-shot), ignoring the source pack; automatic when the "
        "model has no source pack.",
    )


def sigmoid_rampup(progress: float) -> float:
    """``exp(-5 (1 - t)^2)`` for ``t`` clipped to [0, 1] (Laine & Aila; Perone et al.)."""
    phase = 1.0 - min(max(progress, 0.0), 1.0)
    return math.exp(-5.0 * phase * phase)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """``teacher <- alpha * teacher + (1 - alpha) * student`` for every parameter."""
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
        teacher_param.mul_(alpha).add_(student_param.detach(), alpha=1.0 - alpha)


@register
class MeanTeacher(AdaptationMethod):
    name = "mean_teacher"
    title = "Mean Teacher"
    summary = (
        "Self-ensembling: the student matches an EMA teacher's prediction under the same "
        "random spatial transform; Dice on source slices when a source pack is present."
    )
    reference = (
        "Perone, Ballester, Barros, Cohen-Adad. Unsupervised domain adaptation for medical "
        "imaging segmentation with self-ensembling. NeuroImage 194, 2019."
    )
    Settings = MeanTeacherSettings
    requires = frozenset()
    uses_source_data = True

    settings: MeanTeacherSettings

    def setup(self) -> None:
        settings, context = self.settings, self.context
        self.student = context.model.network.to(context.device).train()
        self.make_adam(self.select_trainable("all"))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.augmentation = SpatialAugmentation(
            rotation_degrees=settings.rotation_degrees,
            max_translation=settings.max_translation,
            scale_range=(settings.scale_low, settings.scale_high),
            flip_probability=settings.flip_probability,
        )
        self.use_source = not settings.source_free and context.source_pack is not None
        self.rampup_steps = settings.rampup_fraction * self.total_steps()

    def _transform(self, images: torch.Tensor) -> PairedTransform:
        """A random transform per slice, drawn from the run's seeded generator."""
        transform = self.augmentation.sample(images.cpu(), generator=self.context.generator)
        transform.theta = transform.theta.to(images.device)
        return transform

    def consistency_weight(self, step: int) -> float:
        """The ramped-up consistency weight at (1-based) ``step``."""
        progress = step / self.rampup_steps if self.rampup_steps > 0 else 1.0
        return self.settings.consistency_weight * sigmoid_rampup(progress)

    def ema_alpha(self, step: int) -> float:
        """0.99 during the ramp-up, 0.999 afterwards (paper defaults)."""
        settings = self.settings
        return settings.ema_alpha if step <= self.rampup_steps else settings.ema_alpha_late

    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        settings, context = self.settings, self.context
        images, mask = context.batch(batch_index)
        transform = self._transform(images)
        if mask is not None:
            mask = transform(mask, mode="nearest", padding_mode="zeros")
        with context.autocast():
            with torch.no_grad():
                teacher_probs = transform(torch.softmax(self.teacher(images).float(), 1))
            student_logits = self.student(transform(images))
            kind = CONSISTENCY_LOSSES[settings.consistency_loss]
            consistency = consistency_loss(student_logits, teacher_probs, kind, mask)
            weight = self.consistency_weight(step)
            task, task_losses = self.source_loss(self._source_terms, self.use_source)
            total = weight * consistency + task
            losses = {
                "consistency": float(consistency.detach()),
                "consistency_weight": weight,
                **task_losses,
            }
        self.optimise(total)
        ema_update(self.teacher, self.student, self.ema_alpha(step))

        agreement = mean_foreground_dice(
            class_labels(student_logits.detach()),
            class_labels(teacher_probs),
            teacher_probs.shape[1],
        )
        return StepOutput({"total": float(total.detach()), **losses}, agreement=agreement)

    def _source_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """The Dice task loss on labelled source slices."""
        probabilities = torch.softmax(self.student(images).float(), 1)
        return {"source_dice_loss": soft_dice_loss(probabilities, labels)}

    def report(self) -> dict:
        return {"mean_teacher_mode": "source pack + target" if self.use_source else "target only"}
