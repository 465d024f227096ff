"""Which adapter opens which model: built-in loaders plus third-party ones from entry points.

:func:`load_model` asks each :class:`ModelLoader` in turn whether it can open a path or a name:

1. ``bundle``: napari-uda bundles (``*.safetensors``);
2. ``torchscript``: a TorchScript file with its JSON spec next to it (``model.pt`` +
   ``model.json``), or the spec itself (see :mod:`napari_uda.core.models.torchscript`);
3. ``deepbet``: the name ``"deepbet"`` (needs the optional extra ``napari-uda[deepbet]``);
4. ``nnunet``: an nnU-Net v2 trained-model folder (see :mod:`napari_uda.core.models.nnunet`;
   needs ``napari-uda[nnunet]``);
5. loaders registered by other packages under the entry-point group
   ``napari_uda.model_adapters`` (each entry point names a :class:`ModelLoader` subclass or
   instance), in the order the entry points are found.

A spec JSON may name its loader with ``"adapter": "<name>"`` (default ``"torchscript"``); that is
how an adapted deepbet model, saved as ``.pt`` + ``.json``, opens again through deepbet's pipeline.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import TORCHSCRIPT_SUFFIXES, ModelLoadError

if TYPE_CHECKING:
    from .adapter import ModelAdapter

ENTRY_POINT_GROUP = "napari_uda.model_adapters"
__all__ = [
    "ENTRY_POINT_GROUP",
    "TORCHSCRIPT_SUFFIXES",
    "ModelLoadError",
    "ModelLoader",
    "NamedModel",
    "load_model",
    "model_loaders",
    "named_models",
]


@dataclass(frozen=True)
class NamedModel:
    """A model known by name rather than by path (shown in the UI's model list)."""

    name: str
    description: str
    available: bool
    reason: str = ""


class ModelLoader:
    """Opens one kind of model. Subclass it and register it under :data:`ENTRY_POINT_GROUP`.

    Class attributes:
        name: short name (also the value of a spec's ``"adapter"`` key that picks this loader).
        description: one line for error messages and docs.
        model_names: names (lower case) of models this loader opens without a file.
    """

    name: str = ""
    description: str = ""
    model_names: tuple[str, ...] = ()

    def can_open(self, source: str) -> bool:
        """Whether ``source`` (a path or a model name) is something this loader opens."""
        return False

    def open(self, source: str, **options: Any) -> ModelAdapter:
        """The adapter for ``source``; raise :class:`ModelLoadError` with one line on failure."""
        raise NotImplementedError

    def open_spec(self, spec_path: Path, spec: dict, **options: Any) -> ModelAdapter:
        """Open a spec JSON whose ``"adapter"`` names this loader (default: unsupported)."""
        raise ModelLoadError(f"{spec_path}: the {self.name} loader does not read spec files")

    def named_models(self) -> list[NamedModel]:
        """Models this loader offers by name (default: none)."""
        return []


class BundleLoader(ModelLoader):
    name = "bundle"
    description = "napari-uda bundle (.safetensors)"

    def can_open(self, source: str) -> bool:
        return source.lower().endswith(".safetensors")

    def open(self, source: str, **options: Any) -> ModelAdapter:
        from .adapter import UNetBundleAdapter
        from .bundle import ModelBundle

        if options:
            raise ModelLoadError(f"bundles take no options (got {', '.join(sorted(options))})")
        path = Path(source)
        return UNetBundleAdapter(ModelBundle.load(path), name=path.name, path=path)


class TorchScriptLoader(ModelLoader):
    name = "torchscript"
    description = "TorchScript file with a JSON spec next to it (model.pt + model.json)"

    def can_open(self, source: str) -> bool:
        return source.lower().endswith((*TORCHSCRIPT_SUFFIXES, ".json"))

    def open(self, source: str, **options: Any) -> ModelAdapter:
        from .torchscript import load_torchscript

        return load_torchscript(source, **options)

    def open_spec(self, spec_path: Path, spec: dict, **options: Any) -> ModelAdapter:
        from .torchscript import open_torchscript

        return open_torchscript(spec_path, spec, **options)


class DeepbetLoader(ModelLoader):
    name = "deepbet"
    description = "deepbet brain extraction (pip install 'napari-uda[deepbet]')"
    model_names = ("deepbet",)

    def can_open(self, source: str) -> bool:
        return source.strip().lower() == "deepbet"

    def open(self, source: str, **options: Any) -> ModelAdapter:
        from .deepbet import DeepbetAdapter

        return DeepbetAdapter.from_package(**options)

    def open_spec(self, spec_path: Path, spec: dict, **options: Any) -> ModelAdapter:
        from .deepbet import DeepbetAdapter

        return DeepbetAdapter.from_spec(spec_path, spec, **options)

    def named_models(self) -> list[NamedModel]:
        from .deepbet import deepbet_missing_reason

        reason = deepbet_missing_reason()
        return [
            NamedModel(
                "deepbet",
                "deepbet 3D brain extraction of T1-weighted heads (TorchScript, MIT)",
                available=not reason,
                reason=reason,
            )
        ]


class NnUNetLoader(ModelLoader):
    name = "nnunet"
    description = (
        "nnU-Net v2 trained-model folder (dataset.json, plans.json, fold_<k>/checkpoint_*.pth)"
    )

    def can_open(self, source: str) -> bool:
        from .nnunet import is_nnunet_folder

        return is_nnunet_folder(Path(source))

    def open(self, source: str, **options: Any) -> ModelAdapter:
        from .nnunet import NnUNetAdapter

        return NnUNetAdapter.open(source, **options)


class MonaiBundleLoader(ModelLoader):
    name = "monai_bundle"
    description = "MONAI bundle folder (configs/metadata.json, configs/inference.json, models/)"

    def can_open(self, source: str) -> bool:
        from .monai_bundle import is_monai_bundle

        return is_monai_bundle(Path(source))

    def open(self, source: str, **options: Any) -> ModelAdapter:
        from .monai_bundle import MonaiBundleAdapter

        return MonaiBundleAdapter.open(source, **options)


BUILTIN_LOADERS: tuple[type[ModelLoader], ...] = (
    BundleLoader,
    TorchScriptLoader,
    DeepbetLoader,
    NnUNetLoader,
    MonaiBundleLoader,
)


@lru_cache(maxsize=1)
def _plugin_loaders() -> tuple[ModelLoader, ...]:
    loaders = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = entry.load()
            loader = target() if isinstance(target, type) else target
            if not isinstance(loader, ModelLoader):
                raise TypeError(f"{entry.value} is not a ModelLoader")
        except Exception as error:  # a broken plugin must not break the product
            warnings.warn(
                f"model adapter plugin {entry.name!r} could not be loaded: {error}", stacklevel=2
            )
            continue
        loaders.append(loader)
    return tuple(loaders)


def model_loaders() -> list[ModelLoader]:
    """Built-in loaders first, then the ones registered by other packages."""
    return [cls() for cls in BUILTIN_LOADERS] + list(_plugin_loaders())


def named_models() -> list[NamedModel]:
    """Models that open by name (e.g. ``deepbet``), with whether they are installed."""
    return [model for loader in model_loaders() for model in loader.named_models()]


def _spec_for(path: Path) -> Path | None:
    """The spec JSON that goes with ``path`` (the file itself, or ``<stem>.json`` next to it)."""
    if path.suffix.lower() == ".json":
        return path
    candidate = path.with_suffix(".json")
    return candidate if candidate.exists() else None


def load_model(path: str | os.PathLike, **options: Any) -> ModelAdapter:
    """Open any model the product understands and return its adapter.

    Args:
        path: a bundle (``.safetensors``), a TorchScript file with its spec (``.pt`` +
            ``.json``) or the spec, a model name (``"deepbet"``), an nnU-Net v2 trained-model
            folder, or anything a plugin loader claims.
        options: adapter settings, e.g. ``trainable="first_blocks"`` for TorchScript and
            deepbet, ``folds=[0]`` or ``mirroring=False`` for nnU-Net.

    Raises:
        ModelLoadError: (a :class:`BundleError`) with one readable line.
    """
    source = os.fspath(path)
    loaders = model_loaders()
    for loader in loaders:  # names first: "deepbet" must not be mistaken for a missing file
        if source.strip().lower() in loader.model_names:
            return loader.open(source, **options)
    file = Path(source)
    if not file.exists():
        raise ModelLoadError(f"{source}: no such file or model name (named models: {_names()})")
    if file.is_dir():
        for loader in loaders:
            if loader.can_open(source):
                return loader.open(source, **options)
        raise ModelLoadError(
            f"{source}: is a folder but not an nnU-Net v2 trained-model folder (no plans.json "
            "and dataset.json); choose the model file"
        )
    spec_path = _spec_for(file)
    if spec_path is not None and file.suffix.lower() != ".safetensors":
        from .torchscript import read_spec, with_model_file

        spec = with_model_file(spec_path, read_spec(spec_path), file)  # the file named runs
        wanted = str(spec.get("adapter", "torchscript"))
        for loader in loaders:
            if loader.name == wanted:
                return loader.open_spec(spec_path, spec, **options)
        known = ", ".join(loader.name for loader in loaders)
        raise ModelLoadError(f"{spec_path}: unknown adapter {wanted!r} (known: {known})")
    for loader in loaders:
        if loader.can_open(source):
            return loader.open(source, **options)
    kinds = "; ".join(loader.description for loader in loaders)
    raise ModelLoadError(f"{source}: not a model napari-uda can open (it opens: {kinds})")


def _names() -> str:
    return ", ".join(name for loader in model_loaders() for name in loader.model_names) or "none"
