"""Target statistics for normalisation layers: what AdaBN does alone, and what TENT, AdaEnt and
self-training do while they adapt weights (:class:`TargetStatistics`).

BatchNorm layers keep running statistics of their training data; on a new scanner those are
wrong. These helpers restart them as a cumulative average so the next forward passes in
training mode estimate them on the target, and give the layers their momentum back afterwards.
TorchScript BatchNorm (scripted, not traced) is handled alike through the network's
``track_batchnorm`` (:class:`~napari_uda.core.models.scripted.CumulativeBatchNorm`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.models.adapter import norm_layers
from ..core.models.scripted import CumulativeBatchNorm


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
