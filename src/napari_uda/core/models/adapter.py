"""The model adapter interface: everything the engine and the UI need to know about a model.

An adapter wraps one network and says how a volume becomes network input, how output goes back
onto the scan's grid, which features it exposes (early head, bottleneck, BatchNorm) and which
parameter groups an adaptation method may update. The product's own U-Net bundles are one
adapter (:class:`UNetBundleAdapter`); TorchScript models are another; third parties register
more under the entry-point group ``napari_uda.model_adapters``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..outputs import staged_folder
from ..plausibility import ExpectedVolumes, parse_expected_volumes
from ..preprocessing import PreparedInputs, PreparedVolume, prepare_volume
from ..volume import Volume
from .bundle import BundleError, ModelBundle, SourcePack
from .unet import UNet2D

#: Capabilities an adapter can declare; methods list the ones they need.
EARLY_HEAD = "early_head"
BOTTLENECK = "bottleneck"
BATCHNORM = "batchnorm"
NORM_AFFINE = "norm_affine"
SOURCE_PACK = "source_pack"
SOURCE_STATISTICS = "source_statistics"

NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
)


@dataclass
class ForwardOutputs:
    """One forward pass: logits (B, C, ...), and where the model has them, the early head's
    logits and the bottleneck features."""

    logits: torch.Tensor
    early_logits: torch.Tensor | None = None
    bottleneck: torch.Tensor | None = None


@dataclass
class ModelInfo:
    """What the UI shows about a model."""

    name: str
    class_names: list[str]
    spatial_dims: int
    norm_type: str
    spacing: tuple[float, ...] | None
    capabilities: set[str] = field(default_factory=set)
    details: dict[str, Any] = field(default_factory=dict)


class ModelSaveError(BundleError):
    """A model that cannot be saved, or not at that path; the message is one line."""


def atomic_folder(path: Path) -> contextlib.AbstractContextManager[Path]:
    """A temporary folder beside ``path`` to write a saved model into; renamed to ``path`` when
    the block ends, removed if it raises (Ctrl-C included), so the folder appears whole or not
    at all. ``path`` must not exist (:func:`~napari_uda.core.outputs.staged_folder`)."""
    return staged_folder(path)


class FolderModelMixin:
    """Saving for adapters whose model is a folder (nnU-Net, MONAI bundles): :meth:`save`
    writes a new folder (``save_suffix`` is empty: any name), never the input folder or a place
    inside or around it, never over an existing path. Subclasses set ``path`` (the input
    folder) and write with :func:`atomic_folder`."""

    path: Path
    save_suffix = ""

    @property
    def can_save(self) -> bool:
        return True

    def input_files(self) -> list[Path]:
        return [self.path]

    def saved_files(self, path: str | os.PathLike) -> list[Path]:
        """The folder: it is the one output (staged and moved into place whole)."""
        return [Path(path)]

    def check_save_path(self, path: str | os.PathLike) -> Path:
        """A new folder outside the input model's folder; :class:`ModelSaveError` otherwise."""
        path = Path(path)
        source, target = self.path.resolve(), path.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise ModelSaveError(f"{path}: is (inside) the input model; it is never overwritten")
        if path.exists():
            raise ModelSaveError(f"{path}: already exists; this model is saved as a new folder")
        return path


def norm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, NORM_TYPES)]


def norm_affine_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Affine (scale and shift) parameters of every normalisation layer."""
    params = []
    for layer in norm_layers(module):
        for name in ("weight", "bias"):
            value = getattr(layer, name, None)
            if isinstance(value, nn.Parameter):
                params.append(value)
    return params


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class ModelAdapter(ABC):
    """A model the product can predict with and adapt.

    Subclasses hold the network in :attr:`network` (an ``nn.Module`` mapping a batch of inputs to
    logits) and implement :meth:`prepare`. Methods work on copies made by :meth:`clone`.
    """

    network: nn.Module
    class_names: list[str]
    spatial_dims: int = 2
    #: Suffix of the file :meth:`save` writes (``""``: this kind of model cannot be saved).
    save_suffix: str = ""
    #: What :meth:`save` writes, for file dialogs and messages.
    save_description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def prepare(self, volume: Volume) -> PreparedInputs:
        """Turn a volume into network input, with the way back onto its grid (any
        :class:`~napari_uda.core.preprocessing.PreparedInputs`)."""

    @abstractmethod
    def info(self) -> ModelInfo:
        """Name, classes, norm type, spacing and capabilities for display."""

    def forward(self, inputs: torch.Tensor, *, features: bool = False) -> ForwardOutputs:
        """Run the network; with ``features`` also the early logits and bottleneck if any."""
        return ForwardOutputs(self.network(inputs))

    @property
    def capabilities(self) -> set[str]:
        return self.info().capabilities

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter subsets a method may update: ``norm``, ``early``, ``all``."""
        groups = {"all": [p for p in self.network.parameters()]}
        norm = norm_affine_parameters(self.network)
        if norm:
            groups["norm"] = norm
        return groups

    def recommended_settings(self, method: str) -> dict[str, Any]:
        """Changes to the default settings of ``method`` (a registry name) that this model
        needs or is safer with, measured (docs/model-adapters.md). Code that resolves settings
        applies them beneath the user's own; the benchmarks use them. Default: none."""
        return {}

    def clone(self) -> ModelAdapter:
        """A deep copy whose network can be trained without touching this one."""
        return copy.deepcopy(self)

    # -- saving an adapted model ----------------------------------------------------------------
    @property
    def can_save(self) -> bool:
        return bool(self.save_suffix)

    def input_files(self) -> list[Path]:
        """Files the model was read from; :meth:`save` never writes over them."""
        return []

    def saved_files(self, path: str | os.PathLike) -> list[Path]:
        """Every file ``save(path)`` writes (``path`` first)."""
        return [Path(path)]

    def check_save_path(self, path: str | os.PathLike) -> Path:
        """``path`` if :meth:`save` may write there; :class:`ModelSaveError` (one line) if the
        model cannot be saved, the suffix is wrong, or a file would replace an input file."""
        path = Path(path)
        if not self.can_save:
            raise ModelSaveError(f"a {type(self).__name__} model cannot be saved")
        if path.suffix.lower() != self.save_suffix:
            raise ModelSaveError(
                f"{path}: this model is saved as {self.save_description or self.save_suffix} "
                f"(a {self.save_suffix} file)"
            )
        inputs = {p.resolve() for p in self.input_files()}
        for target in self.saved_files(path):
            if target.resolve() in inputs:
                raise ModelSaveError(f"{target}: is the input model; it is never overwritten")
            if target.is_dir():
                raise ModelSaveError(f"{target}: is a folder")
        return path

    def save(self, path: str | os.PathLike, *, provenance: dict | None = None) -> Path:
        """Write the current (adapted) weights so that ``load_model(path)`` reopens them.

        Every file is written atomically (a temporary file, then a rename); the model's input
        files are never overwritten. ``provenance`` (JSON-able, e.g. the adaptation method and
        settings) is stored with the model. Returns ``path``. Adapters implement
        :meth:`_write` and set :attr:`save_suffix`.
        """
        path = self.check_save_path(path)
        return self._write(path, dict(provenance or {}))

    def _write(self, path: Path, provenance: dict) -> Path:
        raise ModelSaveError(f"a {type(self).__name__} model cannot be saved")

    def source_pack(self) -> SourcePack | None:
        return None

    def source_statistics(self) -> dict:
        return {}

    def expected_volumes(self) -> ExpectedVolumes:
        """Plausible volume per foreground class in ml, as the model states it: a bundle's
        ``source_statistics["expected_volume_ml"]`` (``{"brain": [1000, 1800]}``, written by
        ``train --expected-volume``); adapters of known models override it. Default: none.
        A result outside is flagged (:mod:`napari_uda.core.plausibility`)."""
        stated = self.source_statistics().get("expected_volume_ml")
        if not stated:
            return {}
        return parse_expected_volumes(
            stated, self.class_names, where="the model's expected_volume_ml"
        )

    def source_tensors(self) -> dict[str, torch.Tensor]:
        return {}


def channels_last_on_cpu(network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` for ``network`` in the channels-last layout when both are on the CPU and 2D.

    oneDNN's channels-last convolutions are about twice as fast on the CPU as the default
    layout for the small channel counts of these U-Nets (benchmarks/compute_benchmark.py). A
    network's weights are converted once, in place (values unchanged; saving makes them
    contiguous again), also when the first call comes under :func:`torch.inference_mode`; on
    other devices nothing changes."""
    if inputs.device.type != "cpu" or inputs.dim() != 4:
        return inputs
    weights = (p for p in network.parameters() if p.dim() == 4 and min(p.shape[1:]) > 1)
    probe = next(weights, None)
    if probe is None or probe.device.type != "cpu":
        return inputs
    if not probe.is_contiguous(memory_format=torch.channels_last):
        with torch.inference_mode(False):  # the weights stay ordinary (trainable) tensors
            network.to(memory_format=torch.channels_last)
    return inputs.contiguous(memory_format=torch.channels_last)


class UNetBundleAdapter(ModelAdapter):
    """The product's own 2D U-Net bundles."""

    spatial_dims = 2
    save_suffix = ".safetensors"
    save_description = "napari-uda bundle (.safetensors)"

    def __init__(self, bundle: ModelBundle, name: str = "bundle", path: Path | None = None):
        self.bundle = bundle
        self.network: UNet2D = bundle.build_model()
        self.class_names = list(bundle.class_names)
        self.name = name
        self.path = Path(path) if path is not None else None

    def prepare(self, volume: Volume) -> PreparedVolume:
        return prepare_volume(volume, self.bundle.preprocessing)

    def forward(self, inputs: torch.Tensor, *, features: bool = False) -> ForwardOutputs:
        """The network's outputs (contiguous tensors); on the CPU computed channels-last
        (:func:`channels_last_on_cpu`)."""
        inputs = channels_last_on_cpu(self.network, inputs)
        if not features:
            return ForwardOutputs(self.network(inputs).contiguous())
        out = self.network.forward_features(inputs)
        early = None if out.early_logits is None else out.early_logits.contiguous()
        return ForwardOutputs(out.logits.contiguous(), early, out.bottleneck.contiguous())

    def info(self) -> ModelInfo:
        config = self.bundle.architecture
        caps = {BOTTLENECK, NORM_AFFINE}
        if config.early_head:
            caps.add(EARLY_HEAD)
        if config.norm == "batch":
            caps.add(BATCHNORM)
        if self.bundle.source_pack is not None and len(self.bundle.source_pack):
            caps.add(SOURCE_PACK)
        if self.bundle.source_statistics or self.bundle.source_tensors:
            caps.add(SOURCE_STATISTICS)
        return ModelInfo(
            name=self.name,
            class_names=self.class_names,
            spatial_dims=2,
            norm_type=config.norm,
            spacing=self.bundle.preprocessing.target_spacing,
            capabilities=caps,
            details={
                "architecture": config.to_dict(),
                "preprocessing": self.bundle.preprocessing.to_dict(),
                "provenance": self.bundle.provenance,
                "source_pack_slices": len(self.bundle.source_pack)
                if self.bundle.source_pack
                else 0,
            },
        )

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().parameter_groups()
        groups["early"] = self.network.early_parameters()
        return groups

    def source_pack(self) -> SourcePack | None:
        return self.bundle.source_pack

    def source_statistics(self) -> dict:
        return self.bundle.source_statistics

    def source_tensors(self) -> dict[str, torch.Tensor]:
        return self.bundle.source_tensors

    def input_files(self) -> list[Path]:
        return [self.path] if self.path is not None else []

    def _write(self, path: Path, provenance: dict) -> Path:
        return self.to_bundle(provenance).save(path)

    def to_bundle(self, provenance_update: dict | None = None) -> ModelBundle:
        """The current weights as a new bundle (for saving an adapted model)."""
        provenance = dict(self.bundle.provenance)
        if provenance_update:
            provenance.update(provenance_update)
        return ModelBundle.from_model(
            self.network,
            self.class_names,
            self.bundle.preprocessing,
            provenance=provenance,
            source_statistics=dict(self.bundle.source_statistics),
            source_tensors=dict(self.bundle.source_tensors),
            source_pack=self.bundle.source_pack,
        )
