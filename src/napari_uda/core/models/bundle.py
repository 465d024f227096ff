"""Model bundles: one safe file holding a trained U-Net and everything needed to reuse it.

A bundle is a `safetensors <https://github.com/huggingface/safetensors>`_ file. Tensors hold the
weights (``model.*``), the optional *source pack* (``source_pack.images`` float16 (N, 1, H, W),
``source_pack.labels`` uint8 (N, H, W)) and optional source feature statistics
(``source_stats.*``). The metadata entry ``napari_uda`` holds JSON: format version, architecture,
class names, preprocessing, provenance and source statistics (class ratios and the like).
Loading never executes code from the file. See ``docs/bundle-format.md``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..preprocessing import PreprocessingConfig
from .unet import UNet2D, UNetConfig

BUNDLE_FORMAT = "napari-uda-bundle"
BUNDLE_VERSION = 1
METADATA_KEY = "napari_uda"


class BundleError(ValueError):
    """A file that is not a usable napari-uda bundle; the message is one readable line."""


@dataclass
class SourcePack:
    """A few labelled source slices, already preprocessed, for methods that need source data.

    Attributes:
        images: float32 (N, 1, H, W) network input slices.
        labels: int64 (N, H, W) class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class ModelBundle:
    """A trained 2D U-Net with its preprocessing, classes, provenance and source knowledge.

    Attributes:
        architecture: the U-Net's configuration.
        class_names: one name per output class, background first.
        preprocessing: how volumes become network input.
        state_dict: the network's weights.
        provenance: how the bundle was made (command, data, seed, versions, date).
        source_statistics: JSON-able facts about the source domain, e.g. ``class_ratios``.
        source_tensors: tensor-valued source statistics, e.g. AIVA's ``bottleneck_centres``.
        source_pack: optional labelled source slices.
    """

    architecture: UNetConfig
    class_names: list[str]
    preprocessing: PreprocessingConfig
    state_dict: dict[str, torch.Tensor]
    provenance: dict = field(default_factory=dict)
    source_statistics: dict = field(default_factory=dict)
    source_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source_pack: SourcePack | None = None

    @classmethod
    def from_model(cls, model: UNet2D, class_names, preprocessing, **extra) -> ModelBundle:
        state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
        return cls(model.config, list(class_names), preprocessing, state, **extra)

    def build_model(self) -> UNet2D:
        """A fresh :class:`UNet2D` with the bundle's weights, in eval mode on the CPU."""
        model = UNet2D(self.architecture)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise BundleError(f"weights do not fit the architecture: {first}") from error
        return model.eval()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle to ``path`` atomically."""
        path = Path(path)
        tensors = {f"model.{key}": value.contiguous() for key, value in self.state_dict.items()}
        for key, value in self.source_tensors.items():
            tensors[f"source_stats.{key}"] = value.detach().cpu().contiguous()
        if self.source_pack is not None:
            tensors["source_pack.images"] = self.source_pack.images.half().contiguous()
            tensors["source_pack.labels"] = self.source_pack.labels.to(torch.uint8).contiguous()
        header = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "architecture": {"name": "unet2d", **self.architecture.to_dict()},
            "class_names": self.class_names,
            "preprocessing": self.preprocessing.to_dict(),
            "provenance": self.provenance,
            "source_statistics": self.source_statistics,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata={METADATA_KEY: json.dumps(header)})
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelBundle:
        """Read a bundle; raises :class:`BundleError` with one line naming the file."""
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: no such model bundle")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise BundleError(f"{path}: not a napari-uda model bundle ({error})") from error
        try:
            header = json.loads(metadata[METADATA_KEY])
        except (KeyError, json.JSONDecodeError) as error:
            raise BundleError(
                f"{path}: not a napari-uda model bundle (no bundle header)"
            ) from error
        if header.get("format") != BUNDLE_FORMAT:
            raise BundleError(
                f"{path}: not a napari-uda model bundle (format {header.get('format')!r})"
            )
        if int(header.get("version", 0)) > BUNDLE_VERSION:
            raise BundleError(
                f"{path}: bundle version {header['version']} is newer than this napari-uda "
                f"understands ({BUNDLE_VERSION}); update napari-uda"
            )
        architecture = dict(header["architecture"])
        name = architecture.pop("name", "unet2d")
        if name != "unet2d":
            raise BundleError(f"{path}: unknown architecture {name!r}")
        try:
            config = UNetConfig.from_dict(architecture)
            preprocessing = PreprocessingConfig.from_dict(header["preprocessing"])
        except (TypeError, KeyError) as error:
            raise BundleError(f"{path}: bundle header is incomplete ({error})") from error
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        stats = {
            k[len("source_stats.") :]: v
            for k, v in tensors.items()
            if k.startswith("source_stats.")
        }
        pack = None
        if "source_pack.images" in tensors:
            pack = SourcePack(
                tensors["source_pack.images"].float(), tensors["source_pack.labels"].long()
            )
        bundle = cls(
            architecture=config,
            class_names=list(
                header.get("class_names") or [f"class {i}" for i in range(config.num_classes)]
            ),
            preprocessing=preprocessing,
            state_dict=state,
            provenance=header.get("provenance", {}),
            source_statistics=header.get("source_statistics", {}),
            source_tensors=stats,
            source_pack=pack,
        )
        try:
            bundle.build_model()
        except BundleError as error:
            raise BundleError(f"{path}: {error}") from error
        return bundle
