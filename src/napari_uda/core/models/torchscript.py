"""Generic TorchScript models (2D or 3D) described by a small JSON spec next to the file.

``model.pt`` (``torch.jit.save`` of a scripted or traced network) plus ``model.json``::

    {
      "spatial_dims": 3,
      "class_names": ["background", "brain"],
      "orientation": "RAS",
      "spacing": [1.0, 1.0, 1.0],
      "normalization": "percentile_zscore",
      "patch_size": [96, 96, 96],
      "overlap": 0.5,
      "output_activation": "softmax",
      "first_blocks": ["encoder.0.", "encoder.1."],
      "trainable": "all"
    }

Every key, its default and its meaning is in :class:`TorchScriptSpec` and in
``docs/model-adapters.md``. The spec is validated on load; errors are one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from nibabel.orientations import axcodes2ornt
from torch import nn

from ..preprocessing import PreprocessingConfig, normalize_intensity
from ..volume import Volume
from .adapter import ModelAdapter, ModelInfo
from .registry import TORCHSCRIPT_SUFFIXES, ModelLoadError
from .scripted import LogitsNetwork, ScriptedAdapterMixin, load_scripted_network, save_scripted
from .volumetric import VolumetricPrepared, prepare_on_grid

OutputActivation = Literal["none", "softmax", "sigmoid"]
Trainable = Literal["all", "first_blocks"]

NORMALIZATIONS = ("percentile_zscore", "zscore", "minmax", "none")
#: Spec keys that describe the file and are not settings (``provenance``: how it was adapted).
IGNORED_KEYS = {"format", "version", "description", "provenance"}


class ModelSpecError(ModelLoadError):
    """A model spec that is missing, malformed or inconsistent; the message is one line."""


@dataclass
class TorchScriptSpec:
    """What napari-uda needs to know about a TorchScript network (the JSON spec).

    Attributes:
        spatial_dims: 2 (the network sees slices) or 3 (patches or whole volumes). Required.
        class_names: one name per output class, background first. Required (at least 2).
        name: shown in the UI; default the file name.
        orientation: axis codes of the network's array axes (``"RAS"``, ``"LPS"``, ...). Default
            ``"RAS"``: first axis runs to the Right, second Anterior, third Superior.
        spacing: voxel size in mm along those axes the network expects, or ``None`` (default)
            to use the scan's own spacing.
        normalization: ``"percentile_zscore"`` (default), ``"zscore"``, ``"minmax"`` or ``"none"``,
            as in :class:`~napari_uda.core.preprocessing.PreprocessingConfig`.
        clip_percentiles: percentiles clipped before normalising. Default (0.5, 99.5).
        intensity_scale, intensity_shift: applied after normalising (x * scale + shift).
            Defaults 1 and 0.
        slice_axis: 2D only, the network axis slices are taken along. Default 2.
        patch_size: 3D only, the sliding-window size (D, H, W); ``None`` (default) feeds the
            whole volume padded to ``pad_multiple``.
        overlap: fraction of a window shared with its neighbour, 0 <= overlap < 1. Default 0.5.
        window_weighting: ``"gaussian"`` (default) or ``"constant"`` stitching weights.
        pad_multiple: slices or whole volumes are padded to a multiple of this. Default 16.
        output_activation: what the network itself applies last: ``"none"`` (default: it
            returns logits; one channel means a binary logit), ``"softmax"`` (class
            probabilities) or ``"sigmoid"`` (one channel of foreground probability).
        first_blocks: module-name prefixes of the early layers (``"encoder.0."``), the
            parameter group ``early`` / "first blocks". Default none.
        trainable: which parameters methods update when they train "all" of them: ``"all"``
            (default) or ``"first_blocks"``.
        batch_size: the most slices or patches per forward pass at inference. Default 16 for
            2D and 1 for 3D.
        adapter: which loader reads this spec; default ``"torchscript"``.
        file: the TorchScript file, relative to the spec; default ``<spec stem>.pt``.
    """

    spatial_dims: int
    class_names: list[str]
    name: str = ""
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    normalization: str = "percentile_zscore"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_scale: float = 1.0
    intensity_shift: float = 0.0
    slice_axis: int = 2
    patch_size: tuple[int, int, int] | None = None
    overlap: float = 0.5
    window_weighting: str = "gaussian"
    pad_multiple: int = 16
    output_activation: OutputActivation = "none"
    first_blocks: list[str] = field(default_factory=list)
    trainable: Trainable = "all"
    batch_size: int | None = None
    adapter: str = "torchscript"
    file: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "spec") -> TorchScriptSpec:
        """Validate and build a spec; raises :class:`ModelSpecError` with one line."""
        if not isinstance(values, dict):
            raise ModelSpecError(f"{where}: a model spec must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - IGNORED_KEYS)
        if unknown:
            raise ModelSpecError(
                f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})"
            )
        for key in ("spatial_dims", "class_names"):
            if key not in values:
                raise ModelSpecError(f"{where}: {key!r} is required")
        try:
            spec = cls(**{k: v for k, v in values.items() if k in known})
            spec._validate()
        except ModelSpecError as error:
            raise ModelSpecError(f"{where}: {error}") from None
        except (TypeError, ValueError) as error:
            raise ModelSpecError(f"{where}: {error}") from None
        return spec

    def _validate(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ModelSpecError(f"spatial_dims must be 2 or 3, not {self.spatial_dims!r}")
        names = self.class_names
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ModelSpecError("class_names must be a list of non-empty strings")
        if len(names) < 2 or len(set(names)) != len(names):
            raise ModelSpecError("class_names needs at least 2 different names, background first")
        if self.output_activation not in ("none", "softmax", "sigmoid"):
            raise ModelSpecError(
                f"output_activation must be none, softmax or sigmoid, not "
                f"{self.output_activation!r}"
            )
        if self.output_activation == "sigmoid" and len(names) != 2:
            raise ModelSpecError("a sigmoid output is one foreground channel: give 2 class_names")
        try:
            axcodes2ornt(tuple(str(self.orientation).upper()))
            if len(self.orientation) != 3:
                raise ValueError
        except ValueError:
            raise ModelSpecError(
                f"orientation must be 3 axis codes such as RAS or LPS, not {self.orientation!r}"
            ) from None
        if self.spacing is not None:
            self.spacing = _positive_triple(self.spacing, "spacing", float)
        if self.normalization not in NORMALIZATIONS:
            raise ModelSpecError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
                f"not {self.normalization!r}"
            )
        low, high = (float(v) for v in self.clip_percentiles)
        if not 0 <= low < high <= 100:
            raise ModelSpecError("clip_percentiles must be [low, high] with 0 <= low < high <= 100")
        self.clip_percentiles = (low, high)
        self.intensity_scale = float(self.intensity_scale)
        self.intensity_shift = float(self.intensity_shift)
        if self.slice_axis not in (0, 1, 2):
            raise ModelSpecError(f"slice_axis must be 0, 1 or 2, not {self.slice_axis!r}")
        if self.patch_size is not None:
            if self.spatial_dims == 2:
                raise ModelSpecError("patch_size is for 3D models; 2D models see whole slices")
            self.patch_size = _positive_triple(self.patch_size, "patch_size", int)
        if not 0 <= float(self.overlap) < 1:
            raise ModelSpecError(f"overlap must be at least 0 and below 1, not {self.overlap!r}")
        if self.window_weighting not in ("gaussian", "constant"):
            raise ModelSpecError("window_weighting must be gaussian or constant")
        if not isinstance(self.pad_multiple, int) or self.pad_multiple < 1:
            raise ModelSpecError("pad_multiple must be a positive whole number")
        if not isinstance(self.first_blocks, list) or not all(
            isinstance(p, str) and p for p in self.first_blocks
        ):
            raise ModelSpecError("first_blocks must be a list of module-name prefixes")
        if self.trainable not in ("all", "first_blocks"):
            raise ModelSpecError(f"trainable must be all or first_blocks, not {self.trainable!r}")
        if self.trainable == "first_blocks" and not self.first_blocks:
            raise ModelSpecError("trainable is first_blocks but first_blocks lists no prefix")
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ModelSpecError("batch_size must be a positive whole number")

    @property
    def inference_batch_size(self) -> int:
        return self.batch_size or (16 if self.spatial_dims == 2 else 1)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for key in ("spacing", "patch_size", "clip_percentiles"):
            if values[key] is not None:
                values[key] = list(values[key])
        return values


def _positive_triple(values, key: str, kind: type) -> tuple:
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ModelSpecError(f"{key} must be a list of 3 numbers")
    try:
        triple = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise ModelSpecError(f"{key} must be a list of 3 numbers") from None
    if kind is int and any(float(v) != int(v) for v in values):
        raise ModelSpecError(f"{key} must be whole numbers")
    if any(v <= 0 for v in triple):
        raise ModelSpecError(f"{key} must be positive")
    return triple


class TorchScriptAdapter(ScriptedAdapterMixin, ModelAdapter):
    """A TorchScript network with its :class:`TorchScriptSpec`.

    ``network`` is a :class:`~napari_uda.core.models.scripted.LogitsNetwork` around the scripted
    module. Capabilities: ``norm_affine`` when its normalisation layers have affine parameters
    (TENT); ``batchnorm`` when its BatchNorm was scripted, not traced (AdaBN), no early head
    and no bottleneck (UDAS and AIVA do not apply).
    """

    def __init__(
        self,
        scripted: nn.Module,
        spec: TorchScriptSpec,
        *,
        name: str = "",
        path: Path | None = None,
        spec_path: Path | None = None,
    ):
        self.spec = spec
        self.path = path
        self.spec_path = spec_path
        self.name = spec.name or name or (path.name if path else "torchscript")
        self.class_names = list(spec.class_names)
        self.spatial_dims = spec.spatial_dims
        self.network = LogitsNetwork(
            scripted,
            spec.output_activation,
            len(spec.class_names),
            spec.inference_batch_size,
            self.name,
        )
        self.first_block_prefixes = list(spec.first_blocks)
        self.trainable = spec.trainable

    def normalize(self, data: np.ndarray) -> np.ndarray:
        """The spec's intensity normalisation, then ``* intensity_scale + intensity_shift``."""
        config = PreprocessingConfig(
            normalization=self.spec.normalization, clip_percentiles=self.spec.clip_percentiles
        )
        normalized = normalize_intensity(data, config)
        if self.spec.intensity_scale != 1.0 or self.spec.intensity_shift != 0.0:
            normalized = normalized * self.spec.intensity_scale + self.spec.intensity_shift
        return normalized.astype(np.float32)

    def prepare(self, volume: Volume) -> VolumetricPrepared:
        spec = self.spec
        return prepare_on_grid(
            volume,
            normalize=self.normalize,
            orientation=spec.orientation,
            spacing=spec.spacing,
            spatial_dims=spec.spatial_dims,
            slice_axis=spec.slice_axis,
            patch_size=spec.patch_size,
            overlap=spec.overlap,
            pad_multiple=spec.pad_multiple,
            weighting=spec.window_weighting,
        )

    @property
    def capabilities(self) -> set[str]:
        return self.scripted_capabilities()

    def info(self) -> ModelInfo:
        spec = self.spec
        return ModelInfo(
            name=self.name,
            class_names=self.class_names,
            spatial_dims=spec.spatial_dims,
            norm_type=self.norm_description(),
            spacing=spec.spacing,
            capabilities=self.capabilities,
            details={
                "adapter": "torchscript",
                "path": str(self.path) if self.path else None,
                "spec": spec.to_dict(),
                "trainable": self.trainable,
                "notes": "; ".join(self.capability_notes()),
                **self.parameter_counts(),
            },
        )

    def input_files(self) -> list[Path]:
        return [p for p in (self.path, self.spec_path) if p is not None]

    def _write(self, path: Path, provenance: dict) -> Path:
        """The current weights as ``path`` (.pt) with the spec (.json) next to it; the spec
        keeps every setting, the current ``trainable`` and ``provenance``."""
        spec = self.spec.to_dict()
        spec["trainable"] = self.trainable
        if provenance:
            spec["provenance"] = provenance
        return save_scripted(self.scripted, spec, path)


def _spec_and_file(path: Path) -> tuple[Path, Path]:
    if path.suffix.lower() == ".json":
        spec_path = path
        try:
            named = json.loads(path.read_text()).get("file")
        except (OSError, ValueError, AttributeError):
            named = None
        if named:
            return spec_path, path.parent / named
        for suffix in TORCHSCRIPT_SUFFIXES:
            if path.with_suffix(suffix).exists():
                return spec_path, path.with_suffix(suffix)
        return spec_path, path.with_suffix(".pt")
    return path.with_suffix(".json"), path


def read_spec(spec_path: Path) -> dict[str, Any]:
    """The JSON object in ``spec_path``; :class:`ModelSpecError` with one line otherwise."""
    if not spec_path.exists():
        raise ModelSpecError(
            f"{spec_path}: no model spec; a TorchScript model needs a JSON spec next to it "
            "(see docs/model-adapters.md)"
        )
    try:
        values = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        message = str(error).splitlines()[0]
        raise ModelSpecError(f"{spec_path}: not valid JSON ({message})") from None
    if not isinstance(values, dict):
        raise ModelSpecError(f"{spec_path}: a model spec must be a JSON object")
    return values


def load_torchscript(
    path: str | os.PathLike, *, trainable: str | None = None
) -> TorchScriptAdapter:
    """Open ``model.pt`` + ``model.json`` (either path may be given) as a TorchScript adapter.

    Args:
        trainable: overrides the spec's ``trainable`` (``"all"`` or ``"first_blocks"``).
    """
    spec_path, file = _spec_and_file(Path(path))
    values = read_spec(spec_path)
    spec = TorchScriptSpec.from_dict(values, where=str(spec_path))
    network = load_scripted_network(file)
    adapter = TorchScriptAdapter(network, spec, name=file.name, path=file, spec_path=spec_path)
    if spec.first_blocks and not adapter.first_block_params():
        raise ModelSpecError(
            f"{spec_path}: no parameter name starts with any of first_blocks {spec.first_blocks}"
        )
    adapter.set_trainable(trainable or spec.trainable)
    return adapter
