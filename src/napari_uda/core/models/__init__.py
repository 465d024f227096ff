"""Models: the papers' 2D U-Net, safe bundles, and adapters for any model the product can use."""

from __future__ import annotations

import os
from typing import Any

from .adapter import (
    ForwardOutputs,
    ModelAdapter,
    ModelInfo,
    ModelSaveError,
    UNetBundleAdapter,
)
from .bundle import BundleError, ModelBundle, SourcePack
from .registry import ModelLoader, ModelLoadError, NamedModel, named_models
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


def load_model(path: str | os.PathLike, **options: Any) -> ModelAdapter:
    """Open any model the product understands and return its adapter.

    ``path`` is a napari-uda bundle (``.safetensors``), a TorchScript model with its JSON spec
    (``model.pt`` + ``model.json``; either may be given), a model name such as ``"deepbet"``
    (optional extra ``napari-uda[deepbet]``), or anything a loader registered under the
    entry-point group ``napari_uda.model_adapters`` opens. ``options`` go to the adapter (e.g.
    ``trainable="first_blocks"``). Raises :class:`BundleError` (:class:`ModelLoadError`) with
    one line. See :mod:`napari_uda.core.models.registry`.
    """
    from .registry import load_model as _load_model

    return _load_model(path, **options)
