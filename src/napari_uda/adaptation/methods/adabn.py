"""AdaBN: re-estimate BatchNorm statistics on the target (Li et al. 2016).

Li, Wang, Shi, Liu, Hou. "Revisiting batch normalization for practical domain adaptation"
(ICLR workshop 2017, arXiv:1603.04779). The weights stay as trained; only the BatchNorm layers'
running mean and variance are replaced by statistics of the target domain, computed with no
gradient as the cumulative average over batches of target slices. There is no loss: the
reported ``total`` is the mean entropy of each batch's prediction (a monitor only).

TorchScript models: BatchNorm saved with ``torch.jit.script`` is re-estimated the same way
(:class:`~napari_uda.core.models.scripted.CumulativeBatchNorm` recovers each batch's statistics,
since TorchScript fixes the momentum); a traced model's BatchNorm cannot be (its mode was fixed
when it was traced) and the model does not offer the ``batchnorm`` capability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.models.adapter import BATCHNORM
from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, register
from ..losses import entropy_loss
from ..target_statistics import (
    restart_batchnorm_statistics,
    restore_batchnorm_momentum,
    track_scripted_batchnorm,
    untrack_scripted_batchnorm,
)


@register
class AdaBN(AdaptationMethod):
    name = "adabn"
    title = "AdaBN"
    summary = (
        "Re-estimates the BatchNorm statistics on the target scan; no training, no labels "
        "(needs BatchNorm)."
    )
    reference = (
        "Li Y, Wang N, Shi J, Liu J, Hou X. Revisiting batch normalization for practical "
        "domain adaptation. ICLR Workshop 2017 (arXiv:1603.04779)."
    )
    requires = frozenset({BATCHNORM})

    @dataclass
    class Settings(CommonSettings):
        """AdaBN: one pass over the target slices is the paper's procedure."""

        epochs: int = setting(
            1, "Passes over the target slices (the statistics are averaged over all).", min=1
        )
        batch_size: int = setting(
            16, "Slices per forward pass (the statistics of each batch are averaged).", min=2
        )
        learning_rate: float = setting(
            0.0, "Not used: AdaBN has no optimiser.", min=0.0, hidden=True
        )

    def setup(self) -> None:
        network = self.context.model.network.to(self.context.device)
        network.requires_grad_(False)
        network.eval()
        self.momenta = restart_batchnorm_statistics(network)
        self.scripted = track_scripted_batchnorm(network)
        scripted_layers = self.scripted.layers if self.scripted else []
        if self.scripted is not None:
            self.scripted.restart()
        self.layers = len(self.momenta) + len(scripted_layers)
        for layer in [*self.momenta, *scripted_layers]:
            layer.train()  # training mode: forward passes update the running statistics

    @torch.no_grad()
    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        inputs, mask = self.context.batch(batch_index)
        logits = self.context.model.forward(inputs).logits
        entropy = float(entropy_loss(logits, mask, normalized=True))
        message = f"re-estimating {self.layers} BatchNorm layers" if step == 1 else ""
        return StepOutput({"total": entropy}, message=message)

    def finish(self) -> None:
        restore_batchnorm_momentum(self.momenta)
        untrack_scripted_batchnorm(self.context.model.network)
        self.context.model.network.eval()

    def report(self) -> dict:
        return {"batchnorm_layers_reestimated": self.layers}
