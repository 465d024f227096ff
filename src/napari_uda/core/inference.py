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
    if num_classes < 2:  # one class: nothing to be uncertain about
        if isinstance(probabilities, torch.Tensor):
            return torch.zeros_like(probabilities).sum(axis)
        return np.zeros_like(probabilities, dtype=np.float32).sum(axis)
    if isinstance(probabilities, torch.Tensor):
        p = probabilities.clamp_min(1e-8)
        return -(p * p.log()).sum(axis) / math.log(num_classes)
    p = np.clip(probabilities, 1e-8, 1.0)
    return (-(p * np.log(p)).sum(axis) / math.log(num_classes)).astype(np.float32)


def class_labels(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The arg-max class along ``dim`` (first maximum on ties, as ``argmax``).

    ``Tensor.max(dim).indices`` gives the same labels as ``Tensor.argmax(dim)``, 5-10x faster
    on the CPU for a class axis that is not the last one (PyTorch's arg-max takes a slow path
    there: about a second for 90 slices of 96 x 112 on one core)."""
    return probabilities.max(dim).indices


def predict_batches(
    adapter: ModelAdapter,
    inputs: torch.Tensor,
    *,
    device: torch.device | str = "auto",
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Softmax probabilities (N, C, ...) on the CPU for network inputs (N, ...).

    The network runs in eval mode on ``device`` (default ``"auto"``: CUDA, MPS or CPU, with
    float16 mixed precision on CUDA) in batches of ``batch_size`` (default 32; the result does
    not depend on it), under :func:`torch.inference_mode` (no autograd bookkeeping at all);
    afterwards it is back in its previous mode on its previous device. The result is an
    ordinary tensor (made outside inference mode), so methods may use it in losses.
    ``progress(done, total)`` is called after each batch; ``should_stop()`` returning True
    raises :class:`InterruptedError` before the next batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    device = resolve_device(device)
    network = adapter.network
    was_training = network.training
    first_parameter = next(iter(network.parameters()), None)
    original = first_parameter.device if first_parameter is not None else torch.device("cpu")
    network.eval().to(device)
    outputs = []
    total = int(inputs.shape[0])
    try:
        for start in range(0, total, batch_size):
            if should_stop is not None and should_stop():
                raise InterruptedError("prediction stopped")
            batch = inputs[start : start + batch_size].to(device)
            with torch.inference_mode(), autocast(device):
                logits = adapter.forward(batch).logits
                outputs.append(torch.softmax(logits.float(), dim=1).cpu())
            if progress is not None:
                progress(min(start + batch_size, total), total)
    finally:
        network.train(was_training).to(original)
    if not outputs:
        raise ValueError("nothing to predict: the input holds no slices")
    return torch.cat(outputs)  # outside inference mode: an ordinary tensor


def predict_prepared(adapter: ModelAdapter, prepared: PreparedVolume, **kwargs) -> Prediction:
    """Predict on a prepared volume and map the result back to the source grid."""
    probabilities = predict_batches(adapter, prepared.inputs, **kwargs)
    return Prediction.from_probabilities(prepared.to_source_grid(probabilities), prepared.source)


def predict_volume(adapter: ModelAdapter, volume: Volume, **kwargs) -> Prediction:
    """Preprocess ``volume`` as the model expects, predict, and map back onto its grid."""
    return predict_prepared(adapter, adapter.prepare(volume), **kwargs)
