"""Batched prediction: probabilities, labels and a voxel-wise entropy map on the scan's grid."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .device import autocast, resolve_device
from .models.adapter import ModelAdapter
from .preprocessing import PreparedVolume
from .volume import Volume


@dataclass
class Prediction:
    """A model's answer on one volume, on the grid of the source scan.

    Attributes:
        probabilities: float32 (C, X, Y, Z) class probabilities.
        labels: uint8 (X, Y, Z) arg-max class per voxel.
        entropy: float32 (X, Y, Z) Shannon entropy divided by log(C), so 0 (certain) .. 1.
        source: the volume predicted on (its affine and header are reused on output).
    """

    probabilities: np.ndarray
    labels: np.ndarray
    entropy: np.ndarray
    source: Volume

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray, source: Volume) -> Prediction:
        probabilities = np.asarray(probabilities, dtype=np.float32)
        return cls(
            probabilities,
            probabilities.argmax(0).astype(np.uint8),
            normalized_entropy(probabilities, axis=0),
            source,
        )

    def label_volume(self) -> Volume:
        return self.source.with_data(self.labels)

    def entropy_volume(self) -> Volume:
        return self.source.with_data(self.entropy.astype(np.float32))


def normalized_entropy(probabilities, axis: int = 0):
    """Shannon entropy along ``axis`` divided by log(C): 0 for certain, 1 for uniform.

    Works on numpy arrays and torch tensors alike.
    """
    num_classes = probabilities.shape[axis]
    if isinstance(probabilities, torch.Tensor):
        p = probabilities.clamp_min(1e-8)
        return -(p * p.log()).sum(axis) / math.log(num_classes)
    p = np.clip(probabilities, 1e-8, 1.0)
    return (-(p * np.log(p)).sum(axis) / math.log(num_classes)).astype(np.float32)


@torch.no_grad()
def predict_batches(
    adapter: ModelAdapter,
    inputs: torch.Tensor,
    *,
    device: torch.device | str = "auto",
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Softmax probabilities (N, C, ...) for network inputs (N, ...), in eval mode, on CPU."""
    device = resolve_device(device) if isinstance(device, str) else device
    network = adapter.network
    was_training = network.training
    original = next(network.parameters()).device
    network.eval().to(device)
    outputs = []
    try:
        for start in range(0, inputs.shape[0], batch_size):
            if should_stop is not None and should_stop():
                raise InterruptedError("prediction stopped")
            batch = inputs[start : start + batch_size].to(device)
            with autocast(device):
                logits = adapter.forward(batch).logits
            outputs.append(torch.softmax(logits.float(), dim=1).cpu())
            if progress is not None:
                progress(min(start + batch_size, inputs.shape[0]), inputs.shape[0])
    finally:
        network.train(was_training).to(original)
    return torch.cat(outputs)


def predict_prepared(adapter: ModelAdapter, prepared: PreparedVolume, **kwargs) -> Prediction:
    """Predict on a prepared volume and map the result back to the source grid."""
    probabilities = predict_batches(adapter, prepared.inputs, **kwargs)
    return Prediction.from_probabilities(prepared.to_source_grid(probabilities), prepared.source)


def predict_volume(adapter: ModelAdapter, volume: Volume, **kwargs) -> Prediction:
    """Preprocess ``volume`` as the model expects, predict, and map back onto its grid."""
    return predict_prepared(adapter, adapter.prepare(volume), **kwargs)
