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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..fields import FieldError, mapping, text_list
from ..preprocessing import PreprocessingConfig
from ..volume import atomic_output, one_line
from .unet import UNet2D, UNetConfig

BUNDLE_FORMAT = "napari-uda-bundle"
BUNDLE_VERSION = 1
METADATA_KEY = "napari_uda"


class BundleError(ValueError):
    """A file that is not a usable napari-uda bundle; the message is one readable line."""


#: First bytes of files napari-uda refuses to open because loading them can run code.
_PICKLE_SIGNATURES = {b"PK\x03\x04": "a PyTorch checkpoint, a zip of pickles", b"\x80": "a pickle"}


def _json_default(value: Any) -> Any:
    """JSON for the values provenance and statistics commonly hold (numpy, paths, tensors)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} values cannot be stored in a bundle header")


def weights_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    """One line saying how ``state_dict`` does not fit ``model``, or ``None`` if it fits."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [
        key
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if not (missing or unexpected or reshaped):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        key = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape (e.g. {key}: {list(state_dict[key].shape)} in "
            f"the file, {list(expected[key].shape)} in the architecture)"
        )
    return "weights do not fit the architecture: " + "; ".join(parts)


def non_finite_weights(tensors: dict[str, torch.Tensor]) -> str | None:
    """One line naming the first floating-point tensor holding NaN or infinite values (such a
    model predicts nonsense, e.g. an empty mask), or ``None`` if all are finite."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"the weights hold NaN or infinite values ({key}); the model is broken"
    return None


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
        # contiguous: safetensors stores only contiguous tensors (a network computing on the
        # CPU keeps its weights channels-last, see UNetBundleAdapter.forward)
        state = {
            key: value.detach().cpu().contiguous().clone()
            for key, value in model.state_dict().items()
        }
        return cls(model.config, list(class_names), preprocessing, state, **extra)

    def build_model(self) -> UNet2D:
        """A fresh :class:`UNet2D` with the bundle's weights, in eval mode on the CPU.

        Raises:
            BundleError: the architecture is invalid or the weights do not fit it (one line).
        """
        try:
            model = UNet2D(self.architecture)
        except (ValueError, TypeError, RuntimeError) as error:
            raise BundleError(f"invalid architecture ({one_line(error)})") from error
        problem = weights_mismatch(model, self.state_dict)
        if problem is not None:
            raise BundleError(problem)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as error:
            raise BundleError(f"weights do not fit the architecture: {one_line(error)}") from error
        return model.eval()

    def header(self) -> dict:
        """The JSON header stored under the metadata key ``napari_uda``."""
        return {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "architecture": {"name": "unet2d", **self.architecture.to_dict()},
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "provenance": self.provenance,
            "source_statistics": self.source_statistics,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle to ``path`` atomically (nothing is left behind if writing fails).

        Raises:
            BundleError: class names and classes disagree, or a header value is not JSON-able.
        """
        path = Path(path)
        if len(self.class_names) != self.architecture.num_classes:
            raise BundleError(
                f"{path}: {len(self.class_names)} class names for a model with "
                f"{self.architecture.num_classes} classes"
            )
        tensors = {
            f"model.{key}": value.detach().cpu().contiguous()
            for key, value in self.state_dict.items()
        }
        for key, value in self.source_tensors.items():
            tensors[f"source_stats.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        if self.source_pack is not None:
            images = self.source_pack.images.detach().cpu()
            tensors["source_pack.images"] = images.half().contiguous()
            tensors["source_pack.labels"] = (
                self.source_pack.labels.cpu().to(torch.uint8).contiguous()
            )
        try:
            header = json.dumps(self.header(), default=_json_default)
        except (TypeError, ValueError) as error:
            raise BundleError(
                f"{path}: cannot store the bundle header ({one_line(error)})"
            ) from error
        with atomic_output(path) as temporary:
            save_file(tensors, str(temporary), metadata={METADATA_KEY: header})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelBundle:
        """Read a bundle without executing anything from the file.

        Raises:
            BundleError: missing, foreign, corrupt, too new, or weights that do not fit; the
                message is one line naming the file.
        """
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: no such model bundle")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                header = _parse_header(metadata)
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except _HeaderError as error:
            raise BundleError(f"{path}: not a napari-uda model bundle ({error})") from error
        except BundleError as error:
            raise BundleError(f"{path}: {error}") from error
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise BundleError(
                f"{path}: not a napari-uda model bundle ({_describe(path, error)})"
            ) from error
        try:
            return cls._from_parts(header, tensors)
        except BundleError as error:
            raise BundleError(f"{path}: {error}") from error

    @classmethod
    def _from_parts(cls, header: dict, tensors: dict[str, torch.Tensor]) -> ModelBundle:
        architecture = dict(header["architecture"])
        name = architecture.pop("name", "unet2d")
        if name != "unet2d":
            raise BundleError(f"unknown architecture {name!r}")
        try:
            config = UNetConfig.from_dict(architecture)
            preprocessing = PreprocessingConfig.from_dict(header["preprocessing"])
            class_names = header.get("class_names") or []
            class_names = text_list(class_names, "class_names", unique=True) if class_names else []
            provenance = mapping(header.get("provenance"), "provenance")
            statistics = mapping(header.get("source_statistics"), "source_statistics")
        except FieldError as error:
            raise BundleError(f"bundle header is invalid: {error}") from error
        except (TypeError, KeyError, ValueError) as error:
            raise BundleError(f"bundle header is invalid ({one_line(error)})") from error
        if preprocessing.pad_multiple % 2**config.depth:
            raise BundleError(
                f"slices are padded to a multiple of {preprocessing.pad_multiple} but a U-Net of "
                f"depth {config.depth} needs a multiple of {2**config.depth}"
            )
        if not class_names:
            class_names = [f"class {i}" for i in range(config.num_classes)]
        if len(class_names) != config.num_classes:
            raise BundleError(
                f"{len(class_names)} class names for a model with {config.num_classes} classes"
            )
        state = _strip(tensors, "model.")
        if not state:
            raise BundleError("holds no model weights")
        problem = non_finite_weights(state)
        if problem:
            raise BundleError(problem)
        pack = None
        if "source_pack.images" in tensors or "source_pack.labels" in tensors:
            images, labels = tensors.get("source_pack.images"), tensors.get("source_pack.labels")
            if images is None or labels is None or images.ndim != 4 or labels.ndim != 3:
                raise BundleError("source pack is incomplete (needs images and labels)")
            if images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
                raise BundleError(
                    f"source pack images {list(images.shape)} and labels "
                    f"{list(labels.shape)} do not match"
                )
            pack = SourcePack(images.float(), labels.long())
        bundle = cls(
            architecture=config,
            class_names=class_names,
            preprocessing=preprocessing,
            state_dict=state,
            provenance=provenance,
            source_statistics=statistics,
            source_tensors=_strip(tensors, "source_stats."),
            source_pack=pack,
        )
        bundle.build_model()  # weights that do not fit fail now, not at prediction time
        return bundle


class _HeaderError(ValueError):
    """The safetensors file is fine but its napari-uda header is not."""


def _parse_header(metadata: dict[str, str]) -> dict:
    if METADATA_KEY not in metadata:
        raise _HeaderError("a safetensors file without a napari-uda header")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise _HeaderError(f"header is not JSON: {one_line(error)}") from error
    if not isinstance(header, dict):
        raise _HeaderError("header is not a JSON object")
    if header.get("format") != BUNDLE_FORMAT:
        raise _HeaderError(f"format {header.get('format')!r}")
    try:
        version = int(header.get("version", 0))
    except (TypeError, ValueError) as error:
        raise _HeaderError(f"version {header.get('version')!r} is not a number") from error
    if version > BUNDLE_VERSION:
        raise BundleError(
            f"bundle version {version} is newer than this napari-uda understands "
            f"({BUNDLE_VERSION}); update napari-uda"
        )
    for key in ("architecture", "preprocessing"):
        if not isinstance(header.get(key), dict):
            raise _HeaderError(f"header has no {key!r} section")
    return header


def _describe(path: Path, error: BaseException) -> str:
    """Why a file could not be opened as safetensors, naming pickles for what they are."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    for signature, kind in _PICKLE_SIGNATURES.items():
        if start.startswith(signature):
            return f"it is {kind}, which napari-uda never loads because that could run code"
    return f"not a valid safetensors file: {one_line(error)}"


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
