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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from ..fields import (
    MAX_PATCH_SIDE,
    FieldError,
    number_list,
    one_of,
    percentile_pair,
    real_number,
    spacing_mm,
    text,
    text_list,
    whole_number,
)
from ..preprocessing import PreprocessingConfig, normalize_intensity
from ..volume import Volume
from .adapter import ModelAdapter, ModelInfo
from .errors import TORCHSCRIPT_SUFFIXES, ModelLoadError
from .scripted import LogitsNetwork, ScriptedAdapterMixin, load_scripted_network, save_scripted
from .volumetric import VolumetricPrepared, prepare_on_grid

OutputActivation = Literal["none", "softmax", "sigmoid"]
Trainable = Literal["all", "first_blocks"]

NORMALIZATIONS = ("percentile_zscore", "zscore", "minmax", "none")
#: The most voxels one sliding-window patch may hold (512^3; real 3D networks use far less).
MAX_PATCH_VOXELS = 512**3
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
        except (TypeError, ValueError) as error:  # FieldError and ModelSpecError included
            raise ModelSpecError(f"{where}: {error}") from None
        return spec

    def _validate(self) -> None:
        """Every field's type and range, each error naming its field (:mod:`..fields`)."""
        self.spatial_dims = one_of(self.spatial_dims, "spatial_dims", (2, 3))
        self.class_names = text_list(self.class_names, "class_names", min_length=2, unique=True)
        self.name = text(self.name, "name", empty=True)
        self.orientation = orientation_codes(self.orientation, "orientation")
        if self.spacing is not None:
            self.spacing = spacing_mm(self.spacing, "spacing")
        self.normalization = one_of(self.normalization, "normalization", NORMALIZATIONS)
        self.clip_percentiles = percentile_pair(self.clip_percentiles, "clip_percentiles")
        self.intensity_scale = real_number(self.intensity_scale, "intensity_scale")
        self.intensity_shift = real_number(self.intensity_shift, "intensity_shift")
        self.slice_axis = one_of(self.slice_axis, "slice_axis", (0, 1, 2))
        if self.patch_size is not None:
            if self.spatial_dims == 2:
                raise ModelSpecError("patch_size is for 3D models; 2D models see whole slices")
            self.patch_size = number_list(
                self.patch_size, "patch_size", 3, whole=True, minimum=1, maximum=MAX_PATCH_SIDE
            )
            if math.prod(self.patch_size) > MAX_PATCH_VOXELS:
                raise ModelSpecError(
                    f"patch_size {list(self.patch_size)} is too large (at most "
                    f"{MAX_PATCH_VOXELS:,} voxels per patch)"
                )
        self.overlap = real_number(self.overlap, "overlap", minimum=0.0, below=1.0)
        self.window_weighting = one_of(
            self.window_weighting, "window_weighting", ("gaussian", "constant")
        )
        self.pad_multiple = whole_number(
            self.pad_multiple, "pad_multiple", minimum=1, maximum=MAX_PATCH_SIDE
        )
        self.output_activation = one_of(
            self.output_activation, "output_activation", ("none", "softmax", "sigmoid")
        )
        if self.output_activation == "sigmoid" and len(self.class_names) != 2:
            raise ModelSpecError("a sigmoid output is one foreground channel: give 2 class_names")
        self.first_blocks = text_list(self.first_blocks, "first_blocks")
        self.trainable = one_of(self.trainable, "trainable", ("all", "first_blocks"))
        if self.trainable == "first_blocks" and not self.first_blocks:
            raise ModelSpecError("trainable is first_blocks but first_blocks lists no prefix")
        if self.batch_size is not None:
            self.batch_size = whole_number(self.batch_size, "batch_size", minimum=1, maximum=4096)
        self.adapter = text(self.adapter, "adapter")
        if self.file is not None:
            self.file = text(self.file, "file")

    @property
    def inference_batch_size(self) -> int:
        return self.batch_size or (16 if self.spatial_dims == 2 else 1)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for key in ("spacing", "patch_size", "clip_percentiles"):
            if values[key] is not None:
                values[key] = list(values[key])
        return values


def orientation_codes(value: Any, field: str) -> str:
    """Three axis codes, one per axis and each axis once, e.g. ``"RAS"`` or ``"LPI"``."""
    codes = text(value, field).upper()
    pairs = ("LR", "PA", "IS")
    axes = sorted(next((i for i, pair in enumerate(pairs) if c in pair), -1) for c in codes)
    if len(codes) != 3 or axes != [0, 1, 2]:
        raise FieldError(
            field, f"must be 3 axis codes, one of L/R, P/A and I/S each (RAS, LPS), not {value!r}"
        )
    return codes


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


def spec_model_file(spec_path: Path, spec: dict[str, Any]) -> Path:
    """The model file a spec names (its ``"file"``, else the one file ``<spec stem>.pt`` /
    ``.pth`` / ... next to it), kept inside the spec's folder.

    A model file is data from someone else: an absolute path, a ``..`` escape, or a symlink
    that resolves outside the spec's folder is refused, as is a choice between several files.

    Raises:
        ModelSpecError: one line naming the spec.
    """
    named = spec.get("file")
    if named is None:
        candidates = [spec_path.with_suffix(suffix) for suffix in TORCHSCRIPT_SUFFIXES]
        found = [path for path in candidates if path.exists()]
        if len(found) > 1:
            raise ModelSpecError(
                f"{spec_path}: several model files fit this spec ("
                f"{', '.join(p.name for p in found)}); open the one you mean, or name it in "
                'the spec\'s "file"'
            )
        file = found[0] if found else candidates[0]
    else:
        try:
            named = text(named, "file")
        except FieldError as error:
            raise ModelSpecError(f"{spec_path}: {error}") from None
        file = spec_path.parent / named
    folder = spec_path.parent.resolve()
    if Path(str(named or "")).is_absolute() or folder not in file.resolve().parents:
        raise ModelSpecError(
            f"{spec_path}: the model file {str(named or file.name)!r} is outside the spec's "
            "folder; a model file must sit next to its spec (absolute paths, '..' and links "
            "out of the folder are refused)"
        )
    return file


def with_model_file(spec_path: Path, spec: dict[str, Any], named: Path | None) -> dict[str, Any]:
    """``spec`` with ``"file"`` set to the model file that will run: ``named`` (the file the
    user opened, if not the spec itself) or the spec's own choice (:func:`spec_model_file`).

    Raises:
        ModelSpecError: the user named one file and the spec another (one line saying which).
    """
    if named is not None and named.resolve() != spec_path.resolve():
        if "file" in spec and spec_model_file(spec_path, spec).resolve() != named.resolve():
            raise ModelSpecError(
                f"{named}: its spec {spec_path.name} is for another model file, "
                f"{spec['file']!r}; open {spec_path.name} to run that one"
            )
        spec = dict(spec, file=named.name)
    file = spec_model_file(spec_path, spec)
    return dict(spec, file=str(file.relative_to(spec_path.parent)))


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

    The file that runs is the one given (a ``.pt`` / ``.pth`` / ...), or the one its spec names
    inside the spec's folder (:func:`spec_model_file`); anything else is refused.

    Args:
        trainable: overrides the spec's ``trainable`` (``"all"`` or ``"first_blocks"``).
    """
    path = Path(path)
    spec_path = path if path.suffix.lower() == ".json" else path.with_suffix(".json")
    values = with_model_file(spec_path, read_spec(spec_path), path)
    return open_torchscript(spec_path, values, trainable=trainable)


def open_torchscript(
    spec_path: Path, values: dict[str, Any], *, trainable: str | None = None
) -> TorchScriptAdapter:
    """The adapter for a spec already read (``values["file"]`` set by :func:`with_model_file`)."""
    spec = TorchScriptSpec.from_dict(values, where=str(spec_path))
    file = spec_model_file(spec_path, values)
    network = load_scripted_network(file)
    adapter = TorchScriptAdapter(network, spec, name=file.name, path=file, spec_path=spec_path)
    if spec.first_blocks and not adapter.first_block_params():
        raise ModelSpecError(
            f"{spec_path}: no parameter name starts with any of first_blocks {spec.first_blocks}"
        )
    adapter.set_trainable(trainable or spec.trainable)
    return adapter
