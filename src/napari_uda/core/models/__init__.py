"""Models: the papers' 2D U-Net, safe bundles, and adapters for any model the product can use."""

from __future__ import annotations

from .adapter import (
    ForwardOutputs,
    ModelAdapter,
    ModelInfo,
    ModelSaveError,
    UNetBundleAdapter,
)
from .bundle import BundleError, ModelBundle, SourcePack
from .registry import ModelLoader, ModelLoadError, NamedModel, load_model, named_models
from .unet import UNet2D, UNetConfig

__all__ = [
    "BundleError",
    "ForwardOutputs",
    "ModelAdapter",
    "ModelBundle",
    "ModelInfo",
    "ModelLoadError",
    "ModelLoader",
    "ModelSaveError",
    "NamedModel",
    "SourcePack",
    "UNet2D",
    "UNetBundleAdapter",
    "UNetConfig",
    "load_model",
    "named_models",
]
