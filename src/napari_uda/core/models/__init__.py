"""Models: the papers' 2D U-Net, safe bundles, and adapters for any model the product can use."""

from __future__ import annotations

import os
from pathlib import Path

from .adapter import ForwardOutputs, ModelAdapter, ModelInfo, UNetBundleAdapter
from .bundle import BundleError, ModelBundle, SourcePack
from .unet import UNet2D, UNetConfig

__all__ = [
    "BundleError",
    "ForwardOutputs",
    "ModelAdapter",
    "ModelBundle",
    "ModelInfo",
    "SourcePack",
    "UNet2D",
    "UNetBundleAdapter",
    "UNetConfig",
    "load_model",
]


def load_model(path: str | os.PathLike) -> ModelAdapter:
    """Open any model the product understands and return its adapter.

    Currently: napari-uda bundles (``.safetensors``). Raises :class:`BundleError` with one line.
    """
    path = Path(path)
    return UNetBundleAdapter(ModelBundle.load(path), name=path.name)
