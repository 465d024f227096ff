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
from torch import nn

from ...core.models.adapter import BATCHNORM, norm_layers
from ...core.models.scripted import CumulativeBatchNorm
from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, register
from ..losses import entropy_loss


def batchnorm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Eager BatchNorm layers (TorchScript ones: :func:`track_scripted_batchnorm`)."""
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def track_scripted_batchnorm(network: nn.Module) -> CumulativeBatchNorm | None:
    """Start cumulative re-estimation of a TorchScript network's BatchNorm statistics (the
    network is a ``LogitsNetwork``); None for other networks or without scripted BatchNorm."""
    track = getattr(network, "track_batchnorm", None)
    return track() if callable(track) else None


def untrack_scripted_batchnorm(network: nn.Module) -> None:
    untrack = getattr(network, "untrack_batchnorm", None)
    if callable(untrack):
        untrack()


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
    TorchScript BatchNorm (scripted, not traced) is handled alike through
    :func:`track_scripted_batchnorm`.
    """

    def __init__(self, network: nn.Module):
        self.network = network
        self.momenta: dict[nn.Module, float | None] = {}
        self.scripted: CumulativeBatchNorm | None = None

    def start(self) -> None:
        self.network.eval()
        for layer in norm_layers(self.network):
            layer.train()
        self.scripted = track_scripted_batchnorm(self.network)
        for layer in self.scripted.layers if self.scripted else []:
            layer.train()
        self.restart()

    @property
    def layer_count(self) -> int:
        return len(batchnorm_layers(self.network)) + (len(self.scripted) if self.scripted else 0)

    def restart(self) -> None:
        self.momenta = {**restart_batchnorm_statistics(self.network), **self.momenta}
        if self.scripted is not None:
            self.scripted.restart()

    @torch.no_grad()
    def estimate(self, context, batch_size: int) -> None:
        """Re-estimate the running statistics over all target slices (no gradient)."""
        self.restart()
        for index in context.target_batches(batch_size):
            inputs, _ = context.batch(index)
            context.model.forward(inputs)

    def finish(self) -> None:
        restore_batchnorm_momentum(self.momenta)
        untrack_scripted_batchnorm(self.network)
        self.scripted = None
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
