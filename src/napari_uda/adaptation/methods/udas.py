"""UDAS: self-training of early features (Sheikh & Schultz, MIDL 2022).

The U-Net has a second, *early* segmentation head on the features of its first resolution level
(trained on the source with the rest of the network frozen; see :mod:`napari_uda.core.models.unet`).
On the target, the network's *final* prediction serves as a soft pseudo-label for the early head
(cross-entropy with the final softmax probabilities), and only the early layers that both heads
share (the first encoder block, ``adapter.parameter_groups()["early"]``) are updated: the early
head itself and every later layer stay frozen. Because the refined early features feed the rest
of the network, the final prediction improves while the higher-level layers, which hold the
richer knowledge, are kept intact; keeping the pseudo-labels soft limits the harm of their errors.

Pseudo-labels: the *current* final prediction, computed in the same forward pass as the early
prediction, so it changes as the early features change. As in the reference code, the soft
pseudo-labels are not detached: the cross-entropy's gradient reaches the early layers through
both heads, so the early features move towards a confident final prediction that the early head
agrees with. Detaching them (a fixed-target reading, ``detach_pseudo_labels``) loses that pull
towards agreement, and on the demo it lowered the Dice where the default raised it.

Stopping rule (paper): before adaptation and after every epoch the Dice between the early head's
and the final labels over all target slices is computed; the run stops when it changes by less
than 0.005 from one epoch to the next. This label-free agreement Dice is the live "Dice" curve
(each step reports the latest whole-target value).

The network runs in evaluation mode (no dropout, stored BatchNorm statistics) except the
BatchNorm layers of the early block, which normalise with the target batch's statistics while
refining and so carry target running statistics afterwards (``early_batch_statistics``; the
reference code trains in training mode). Nothing outside the early block changes, not even
BatchNorm statistics. With the stored statistics kept in the early block, the early/final
agreement collapsed on the demo and the engine's guard stopped the run.

The early head matters: the reference code's head is three 3x3 convolutions (the default of
``UNetConfig.early_head_layers``); a single 1x1 convolution sees only the early block's 5x5
neighbourhood. The shipped demo bundle predates that option and has a 1x1 head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.device import autocast
from ...core.metrics import mean_foreground_dice
from ...core.models.adapter import EARLY_HEAD
from ...settings import setting
from ..base import (
    AdaptationMethod,
    CommonSettings,
    StepOutput,
    fraction_setting,
    learning_rate_setting,
    preserved_modes,
    register,
)
from ..losses import soft_cross_entropy


@dataclass
class UDASSettings(CommonSettings):
    """UDAS settings."""

    epochs: int = setting(
        30,
        "Most passes over the target slices (the stopping rule usually ends earlier).",
        min=1,
        max=1000,
    )
    learning_rate: float = learning_rate_setting(
        1e-3,
        "Adam learning rate of the early layers (slower rates change the agreement by less "
        "than the tolerance per epoch on one scan and stop too early).",
    )
    tolerance: float = fraction_setting(
        0.005,
        "Stop when the early/final Dice changes by less than this between epochs (paper: 0.005).",
    )
    early_batch_statistics: bool = setting(
        True,
        "Normalise the early block with the target batch's statistics while refining (its "
        "BatchNorm running statistics follow the target); False keeps the stored ones.",
    )
    detach_pseudo_labels: bool = setting(
        False,
        "Treat the final prediction as a fixed target (no gradient through it); the reference "
        "code lets the gradient through both heads.",
    )
    min_epochs: int = setting(
        2, "Epochs to run before the stopping rule may end the run.", min=1, max=1000
    )


@register
class UDAS(AdaptationMethod):
    name = "udas"
    title = "UDAS (self-training of early features)"
    summary = (
        "The early segmentation head learns from the final prediction; only the early layers "
        "shared by both heads update; stops when early/final Dice settles."
    )
    reference = (
        "Sheikh, Schultz. Unsupervised domain adaptation for medical image segmentation via "
        "self-training of early features. MIDL 2022, PMLR 172:1096-1107."
    )
    Settings = UDASSettings
    requires = frozenset({EARLY_HEAD})
    uses_source_data = False

    settings: UDASSettings

    def setup(self) -> None:
        context = self.context
        network = context.model.network.to(context.device).eval()
        early = self.select_trainable("early")
        self.make_adam(early)
        if self.settings.early_batch_statistics:
            early_ids = {id(parameter) for parameter in early}
            for module in network.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
                    id(parameter) in early_ids for parameter in module.parameters()
                ):
                    module.train()
        #: early/final Dice over the whole target: before adaptation, then after every epoch.
        self.agreements: list[float] = [self.target_agreement()]

    def _heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.context.model.forward(images, features=True)
        return outputs.early_logits, outputs.logits

    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        context = self.context
        images, mask = context.batch(batch_index)
        with context.autocast():
            early_logits, final_logits = self._heads(images)
            if self.settings.detach_pseudo_labels:
                final_logits = final_logits.detach()
            pseudo_labels = torch.softmax(final_logits.float(), 1)
            loss = soft_cross_entropy(early_logits, pseudo_labels, mask)
        self.optimise(loss)
        if step % self.steps_per_epoch() == 0:  # the epoch's last step: measure the agreement
            self.agreements.append(self.target_agreement(step))
        value = float(loss.detach())
        return StepOutput({"total": value, "early_cross_entropy": value}, self.agreements[-1])

    @torch.no_grad()
    def target_agreement(self, step: int | None = None) -> float:
        """Dice between the early head's and the final labels over all target slices (in
        evaluation mode). After ``step``, the final probabilities of the same pass are handed
        to the engine, whose evaluation then needs no pass of its own."""
        context = self.context
        early, final, probabilities = [], [], []
        batch_size = context.inference_batch_size
        with preserved_modes(context.model.network) as network:
            network.eval()
            for start in range(0, context.num_target, batch_size):
                index = torch.arange(start, min(start + batch_size, context.num_target))
                images, mask = context.batch(index)
                with autocast(context.device):  # as core.inference.predict_batches
                    early_logits, final_logits = self._heads(images)
                keep = slice(None) if mask is None else mask[:, 0]
                early.append(early_logits.argmax(1)[keep].cpu())
                final.append(final_logits.argmax(1)[keep].cpu())
                probabilities.append(torch.softmax(final_logits.float(), dim=1).cpu())
        if step is not None:
            context.remember_prediction(torch.cat(probabilities), step)
        num_classes = context.model.num_classes
        return mean_foreground_dice(torch.cat(early), torch.cat(final), num_classes)

    def finished(self, epoch: int, agreement: float | None) -> str | None:
        if epoch < self.settings.min_epochs or len(self.agreements) < 2:
            return None
        change = abs(self.agreements[-1] - self.agreements[-2])
        if change < self.settings.tolerance:
            return (
                f"early/final Dice {self.agreements[-1]:.4f} changed by {change:.4f} "
                f"(< {self.settings.tolerance}) in epoch {epoch}"
            )
        return None

    def report(self) -> dict:
        return {"early_final_dice_per_epoch": list(self.agreements)}
