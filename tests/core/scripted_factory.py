"""Helpers for the TorchScript tests: a synthetic head, tiny 2D/3D conv nets trained on it in a
few seconds, saved as TorchScript with a JSON spec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from volume_factory import affine_for

from napari_uda.core.models.torchscript import TorchScriptAdapter, TorchScriptSpec
from napari_uda.core.volume import Volume

SHAPE = (36, 40, 30)
SPACING = (1.5, 1.5, 2.0)
AXCODES = ("L", "S", "A")  # not RAS: the spec's orientation handling must undo it


def synthetic_head(
    seed: int = 0, *, brain: float = 1.0, scalp: float = 0.45, noise: float = 0.06
) -> tuple[Volume, Volume]:
    """A head-like image (bright ellipsoid 'brain' inside a dimmer 'scalp' shell) and its mask.

    ``brain`` and ``scalp`` set the two tissue intensities; a scanner shift changes them.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"), axis=-1)
    centre = rng.uniform(-0.08, 0.08, 3)
    radii = np.array([0.62, 0.7, 0.6]) * rng.uniform(0.92, 1.08, 3)
    inner = (((grid - centre) / radii) ** 2).sum(-1)
    outer = (((grid - centre) / (radii + 0.22)) ** 2).sum(-1)
    mask = (inner <= 1).astype(np.uint8)
    image = np.where(outer <= 1, scalp, 0.02) + (brain - scalp) * mask
    texture = 0.04 * np.sin(7 * grid[..., 0]) * np.cos(5 * grid[..., 1])
    image = image + (texture + noise * rng.standard_normal(SHAPE)) * (outer <= 1)
    affine = affine_for(AXCODES, SPACING)
    return Volume(image.astype(np.float32), affine), Volume(mask, affine)


class TinyNet(nn.Module):
    """conv-BN-ReLU (``stem``), conv-BN-ReLU (``body``), 1x1 conv (``head``); 2D or 3D."""

    def __init__(self, spatial_dims: int = 2, channels: int = 8, norm: str = "batch"):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        if norm == "batch":
            make_norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        else:  # instance norm without affine parameters, like deepbet
            make_norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        self.stem = nn.Sequential(conv(1, channels, 3, padding=1), make_norm(channels), nn.ReLU())
        self.body = nn.Sequential(
            conv(channels, channels, 3, padding=1), make_norm(channels), nn.ReLU()
        )
        self.head = conv(channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def base_spec(spatial_dims: int, **changes) -> dict:
    spec = {
        "spatial_dims": spatial_dims,
        "class_names": ["background", "brain"],
        "orientation": "RAS",
        "normalization": "zscore",
        "first_blocks": ["stem."],
    }
    if spatial_dims == 2:
        spec["slice_axis"] = 2
    spec.update(changes)
    return spec


def train_tiny(
    spatial_dims: int, spec: dict, *, steps: int = 50, seed: int = 0, norm: str = "batch"
) -> nn.Module:
    """A :class:`TinyNet` trained on two synthetic source heads prepared as ``spec`` says."""
    torch.manual_seed(seed)
    network = TinyNet(spatial_dims, norm=norm)
    adapter = TorchScriptAdapter(network, TorchScriptSpec.from_dict(spec))
    inputs, labels = [], []
    for case in (seed, seed + 1):
        image, mask = synthetic_head(case)
        prepared = adapter.prepare(image)
        inputs.append(prepared.inputs)
        labels.append(prepared.labels_to_inputs(mask))
    inputs, labels = torch.cat(inputs), torch.cat(labels)
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-2)
    network.train()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randperm(len(inputs), generator=generator)[:16]
        loss = nn.functional.cross_entropy(network(inputs[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


def save_model(network: nn.Module, spec: dict, folder: Path, *, trace: bool = False) -> Path:
    """``model.pt`` (scripted, or traced) and ``model.json`` in ``folder``; the .pt path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    if trace:
        shape = (1, 1, 16, 16) if spec["spatial_dims"] == 2 else (1, 1, 16, 16, 16)
        scripted = torch.jit.trace(network.eval(), torch.randn(shape))
    else:
        scripted = torch.jit.script(network.eval())
    torch.jit.save(scripted, str(path))
    (folder / "model.json").write_text(json.dumps(spec))
    return path


def dice(labels: np.ndarray, truth: np.ndarray) -> float:
    a, b = labels > 0, truth > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
