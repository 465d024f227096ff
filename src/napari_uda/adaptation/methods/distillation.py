"""Knowledge distillation with temperature (Orbes-Arteaga et al., MICCAI DART 2019).

The frozen *teacher* is the source model; the *student* is the model being adapted. On target
slices (and on source-pack slices when the bundle has them) the student is trained to match the
teacher's temperature-softened probabilities ``softmax(z_teacher / T)`` with the KL divergence
between the softened distributions, scaled by ``T^2`` so that gradients keep their size as ``T``
changes (Hinton et al.). On source-pack slices the student also learns from the true labels
(cross-entropy), as in the paper's semi-supervised setting, where the labelled data are what
moves the student away from the teacher.

The teacher's BatchNorm statistics: the literal teacher (the source model with its stored
source statistics) sees the new scanner's intensities through the source normalisation, and its
soft labels carry exactly the errors adaptation should remove; distilling them makes the student
worse. By default the teacher therefore normalises each batch with that batch's own BatchNorm
statistics (``teacher_batch_statistics``; its weights stay frozen and its stored statistics
untouched), which removes most of the intensity shift from its answers. Models without
BatchNorm are unaffected.

What it gains without source data, honestly: the student starts as a copy of the teacher, so
distillation on plain target slices has little to learn. What changes the student is (a) the
random spatial transform of its input (on by default): it must predict the teacher's
clean-slice answer, transformed the same way, from a transformed slice, which regularises it
like Mean Teacher with a fixed teacher; (b) BatchNorm statistics, in the teacher as above and in
the student, which follow the target while it trains; and (c) with a source pack, the labelled
source slices. Expect a result near that of re-estimating BatchNorm statistics (AdaBN), and the
self-training methods to do better in a one-shot, source-free setting: it is mainly a
conservative baseline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.augment import SpatialAugmentation
from ...core.inference import class_labels
from ...core.metrics import mean_foreground_dice
from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, register


@dataclass
class DistillationSettings(CommonSettings):
    """Knowledge-distillation settings."""

    temperature: float = setting(
        2.0, "Softmax temperature of teacher and student (paper: 2).", min=1.0, max=20.0
    )
    source_weight: float = setting(
        1.0,
        "Weight of the source-pack terms (cross-entropy with labels + distillation); 0 ignores "
        "the source pack.",
        min=0.0,
        max=100.0,
    )
    teacher_batch_statistics: bool = setting(
        True,
        "The teacher normalises each batch with the batch's own BatchNorm statistics; False "
        "uses its stored source statistics (the literal source model).",
    )
    augment: bool = setting(
        True,
        "Randomly transform the student's input (the teacher's answer is transformed "
        "the same way).",
    )
    rotation_degrees: float = setting(
        15.0, "Random rotation of the student's input, +- degrees.", min=0.0, max=180.0
    )
    max_translation: float = setting(
        0.1, "Random shift of the student's input, +- fraction of the slice.", min=0.0, max=0.5
    )


def soften(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(z / T)`` from ``softmax(z)``: ``p ** (1 / T)`` renormalised over classes."""
    log_p = torch.log(probabilities.clamp_min(1e-12)) / temperature
    return torch.softmax(log_p, dim=1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_soft: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)``, averaged over the (masked) voxels.

    ``teacher_soft`` holds the teacher's probabilities already softened at ``T``.
    """
    log_student = torch.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = torch.log(teacher_soft.float().clamp_min(1e-12))
    kl = (teacher_soft * (log_teacher - log_student)).sum(1)
    if mask is not None:
        kl = kl[mask.reshape(kl.shape).bool()] if bool(mask.any()) else kl * 0.0
    return kl.mean() * temperature**2


@register
class KnowledgeDistillation(AdaptationMethod):
    name = "distillation"
    title = "Knowledge distillation"
    summary = (
        "The model learns the frozen source model's temperature-softened probabilities on "
        "augmented target slices (and on source-pack slices, with their labels)."
    )
    reference = (
        "Orbes-Arteaga, Cardoso, Sorensen, Igel, Ourselin, Modat, Nielsen, Pai. Knowledge "
        "distillation for semi-supervised domain adaptation. MICCAI workshops (DART), 2019."
    )
    Settings = DistillationSettings
    requires = frozenset()
    uses_source_data = True

    settings: DistillationSettings

    def setup(self) -> None:
        settings, context = self.settings, self.context
        self.student = context.model.network.to(context.device).train()
        self.make_adam(self.select_trainable("all"))
        # a private copy: the teacher's stored statistics must stay the source model's
        self.teacher = copy.deepcopy(context.source_model.network).to(context.device).eval()
        self.teacher.requires_grad_(False)
        if settings.teacher_batch_statistics:
            for module in self.teacher.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
                    module.momentum = 0.0  # batch statistics, stored statistics unchanged
        self.augmentation = SpatialAugmentation(
            rotation_degrees=settings.rotation_degrees,
            max_translation=settings.max_translation,
        )
        self.use_source = settings.source_weight > 0 and context.source_pack is not None

    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        settings, context = self.settings, self.context
        temperature = settings.temperature
        images, mask = context.batch(batch_index)
        if settings.teacher_batch_statistics:
            with torch.no_grad(), context.autocast():
                teacher_probs = torch.softmax(self.teacher(images).float(), 1)
        else:  # the source model's answer, computed once by the engine
            teacher_probs = context.initial_probabilities[batch_index].to(context.device)
        if settings.augment:
            transform = self.augmentation.sample(images.cpu(), generator=context.generator)
            transform.theta = transform.theta.to(context.device)
            images, teacher_probs = transform(images), transform(teacher_probs)
            if mask is not None:
                mask = transform(mask, mode="nearest", padding_mode="zeros")
        with context.autocast():
            student_logits = self.student(images)
            target_loss = distillation_loss(
                student_logits, soften(teacher_probs, temperature), temperature, mask
            )
            source, source_losses = self.source_loss(self._source_terms, self.use_source)
            total = target_loss + settings.source_weight * source
            losses = {"target_distillation": float(target_loss.detach()), **source_losses}
        self.optimise(total)
        agreement = mean_foreground_dice(
            class_labels(student_logits.detach()),
            class_labels(teacher_probs),
            teacher_probs.shape[1],
        )
        return StepOutput({"total": float(total.detach()), **losses}, agreement=agreement)

    def _source_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Cross-entropy with the labels and distillation from the teacher on source slices."""
        temperature = self.settings.temperature
        logits = self.student(images)
        with torch.no_grad():
            teacher = torch.softmax(self.teacher(images).float() / temperature, 1)
        return {
            "source_cross_entropy": F.cross_entropy(logits.float(), labels),
            "source_distillation": distillation_loss(logits, teacher, temperature),
        }

    def report(self) -> dict:
        return {"distillation_source_pack_used": self.use_source}
