"""AdaBN: re-estimate BatchNorm statistics on the target (Li et al. 2016).

Li, Wang, Shi, Liu, Hou. "Revisiting batch normalization for practical domain adaptation"
(ICLR workshop 2017, arXiv:1603.04779). The weights stay as trained; only the BatchNorm layers'
running mean and variance are replaced by statistics of the target domain, computed with no
gradient as the cumulative average over batches of target slices. There is no loss: the
reported ``total`` is the mean entropy of each batch's prediction (a monitor only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.models.adapter import BATCHNORM, norm_layers
from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, register
from ..losses import entropy_loss


def batchnorm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def restart_batchnorm_statistics(network: nn.Module) -> dict[nn.Module, float | None]:
    """Forget the running statistics and switch to a cumulative average (momentum None) so the
    next forward passes in training mode estimate them afresh. Returns each layer's previous
    momentum (see :func:`restore_batchnorm_momentum`)."""
    previous = {}
    for layer in batchnorm_layers(network):
        previous[layer] = layer.momentum
        layer.reset_running_stats()
        layer.momentum = None
    return previous


def restore_batchnorm_momentum(momenta: dict[nn.Module, float | None]) -> None:
    """Give BatchNorm layers back the momentum they had before the restart."""
    for layer, momentum in momenta.items():
        layer.momentum = momentum


class TargetStatistics:
    """Normalise with the target's statistics while a method adapts weights.

    :meth:`start`: dropout off, normalisation layers in training mode (BatchNorm normalises each
    batch with its own statistics, as TENT does), running statistics restarted as a cumulative
    average; :meth:`restart` at each epoch re-estimates them over that epoch's batches, so the
    engine's evaluation (eval mode) and the adapted model use target statistics that follow the
    changing weights; :meth:`estimate` fills them with one no-grad pass (AdaBN);
    :meth:`finish` gives the layers their momentum back. A model without BatchNorm is unaffected.
    """

    def __init__(self, network: nn.Module):
        self.network = network
        self.momenta: dict[nn.Module, float | None] = {}

    def start(self) -> None:
        self.network.eval()
        for layer in norm_layers(self.network):
            layer.train()
        self.restart()

    def restart(self) -> None:
        self.momenta = {**restart_batchnorm_statistics(self.network), **self.momenta}

    @torch.no_grad()
    def estimate(self, context, batch_size: int) -> None:
        """Re-estimate the running statistics over all target slices (no gradient)."""
        self.restart()
        for index in context.target_batches(batch_size):
            inputs, _ = context.batch(index)
            context.model.forward(inputs)

    def finish(self) -> None:
        restore_batchnorm_momentum(self.momenta)
        self.network.eval()


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
        learning_rate: float = setting(0.0, "Not used: AdaBN has no optimiser.", min=0.0)

    def setup(self) -> None:
        network = self.context.model.network.to(self.context.device)
        network.requires_grad_(False)
        network.eval()
        self.momenta = restart_batchnorm_statistics(network)
        self.layers = len(self.momenta)
        for layer in self.momenta:
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
        self.context.model.network.eval()

    def report(self) -> dict:
        return {"batchnorm_layers_reestimated": self.layers}
