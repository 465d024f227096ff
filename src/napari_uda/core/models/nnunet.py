"""nnU-Net v2 trained-model folders as an adapter: open, predict as nnU-Net does, adapt, save back.

A trained-model folder (``Dataset123_X/nnUNetTrainer__nnUNetPlans__3d_fullres``) holds
``dataset.json``, ``plans.json`` and ``fold_<k>/checkpoint_final.pth`` (or
``checkpoint_best.pth``) for one fold or several. Open it with ``load_model(folder)``; options:

* ``folds``: which folds (default every ``fold_<k>`` with a checkpoint; ``fold_all`` only when
  it is the only one, as nnU-Net);
* ``checkpoint``: ``"final"`` (default; ``"best"`` when a fold has no final checkpoint) or
  ``"best"``;
* ``mirroring``: average over mirrored inputs at inference, as nnU-Net (default True; False is
  2^3 times faster in 3D and slightly less accurate).

Nothing of ``nnunetv2`` is needed: the network is built from the plans' ``architecture`` entry
with ``dynamic-network-architectures`` (the package nnU-Net uses; deep supervision off), and the
pipeline is :mod:`napari_uda.core.models.nnunet_pipeline`. Model files are data:

* checkpoints are read with ``torch.load(weights_only=True)``, allowing only numpy scalars and
  arrays besides tensors (nnU-Net's training log holds numpy floats); anything else is refused
  with one line naming the file and the object;
* the network class and the ``_kw_requires_import`` entries (``conv_op``, ``norm_op``, ...) must
  be on an allow-list (:data:`NETWORK_CLASSES`, :data:`TORCH_LAYERS`); nothing is imported by
  name;
* every path stays inside the model's folder (symbolic links out of it are refused), every field
  used is checked with its name.

Several folds form one network (:class:`NnUNetNetwork`) whose logits are the folds' average, so
adaptation trains all folds together and saving writes each fold back. nnU-Net's InstanceNorm
layers have affine parameters and no running statistics: TENT adapts their scale and shift,
AdaBN does not apply, the other methods train on the 3D (or 2D) windows with the same memory
clamp as TorchScript models (:func:`~napari_uda.core.models.scripted.forward_in_chunks`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from ..preprocessing import check_labels_shape
from ..volume import Volume, VolumeError, require_room_on_model_grid
from .adapter import NORM_AFFINE, FolderModelMixin, ModelAdapter, ModelInfo, atomic_folder
from .errors import ModelLoadError
from .nnunet_pipeline import (
    NORMALIZATIONS,
    PROBABILITY_FLOOR,
    WindowTiling,
    file_axes,
    file_spacing,
    from_file_axes,
    new_shape_for,
    nonzero_bbox,
    normalize_channel,
    resample,
)
from .scripted import (
    chunk_size,
    forward_in_chunks,
    norm_affine_parameters,
    norm_description,
)

INSTALL_HINT = "pip install 'napari-uda[nnunet]'"
CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
#: Network classes a plans file may name (dynamic-network-architectures' U-Nets).
NETWORK_CLASSES = ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")
#: torch layers the plans' ``_kw_requires_import`` entries may name (``torch.nn.<name>`` or
#: ``torch.nn.modules.<module>.<name>``).
TORCH_LAYERS = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "LayerNorm",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "LeakyReLU",
    "ReLU",
    "PReLU",
    "ELU",
    "GELU",
    "SiLU",
)
#: Readers nnU-Net plans name; all but the reorienting one read the file's own voxel order.
READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient", "SimpleITKIOWithReorient")
NOT_APPLICABLE = (
    "AdaBN does not apply: nnU-Net's InstanceNorm layers keep no running statistics "
    "(TENT adapts their scale and shift)"
)
NUMPY_DTYPES = (
    "Float64DType",
    "Float32DType",
    "Float16DType",
    "Int64DType",
    "Int32DType",
    "BoolDType",
)
_FOLD = re.compile(r"^fold_(\d+|all)$")


def nnunet_missing_reason() -> str:
    """Why nnU-Net models cannot be opened here ("" when they can)."""
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError:
        return f"dynamic-network-architectures is not installed ({INSTALL_HINT})"
    return ""


def is_nnunet_folder(path: Path) -> bool:
    """Whether ``path`` looks like an nnU-Net v2 trained-model folder."""
    return path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()


# -- reading and checking the folder -------------------------------------------------------------
def _inside(folder: Path, path: Path, what: str) -> Path:
    """``path`` resolved, refused (one line) when it leads out of ``folder``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ModelLoadError(f"{path}: {what} leads out of the model folder; refused")
    return resolved


def read_json(folder: Path, name: str, kind: str = "an nnU-Net v2 trained-model folder") -> dict:
    """The JSON object in ``folder / name`` (a file inside the folder); one line otherwise."""
    path = folder / name
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no {name}; not {kind}")
    _inside(folder, path, name)
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object")
    return values


def _field(values: dict, key: str, kind, where: str):
    """``values[key]`` checked to be of ``kind``; one line naming the file and the key."""
    if key not in values:
        raise ModelLoadError(f"{where}: {key!r} is missing")
    value = values[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelLoadError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _numbers(values, key: str, where: str, *, length: int | None = None, kind=float) -> list:
    if not isinstance(values, list) or not values or (length and len(values) != length):
        size = f"{length} " if length else ""
        raise ModelLoadError(f"{where}: {key!r} must be a list of {size}numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise ModelLoadError(f"{where}: {key!r} must hold positive numbers")
    if kind is int and any(float(v) != int(v) for v in values):
        raise ModelLoadError(f"{where}: {key!r} must hold whole numbers")
    return [kind(v) for v in values]


@dataclass
class NnUNetLabels:
    """The dataset's classes: names by label value, or regions (sigmoid outputs) in
    ``regions_class_order``."""

    class_names: list[str]
    regions: bool = False
    #: Region models: the label value each output channel writes, in order (later wins).
    region_labels: list[int] = field(default_factory=list)

    @property
    def num_outputs(self) -> int:
        return len(self.region_labels) if self.regions else len(self.class_names)

    @classmethod
    def from_dataset(cls, dataset: dict, where: str) -> NnUNetLabels:
        labels = _field(dataset, "labels", dict, where)
        labels = {k: v for k, v in labels.items() if k != "ignore"}
        if labels.get("background") != 0:
            raise ModelLoadError(f"{where}: 'labels' must map 'background' to 0")
        if any(isinstance(v, list) and len(set(v)) > 1 for v in labels.values()):
            return cls._regions(dataset, labels, where)
        values = {}
        for name, value in labels.items():
            value = value[0] if isinstance(value, list) and value else value
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ModelLoadError(f"{where}: label {name!r} must be a whole number")
            values[value] = name
        if sorted(values) != list(range(len(values))) or len(values) < 2:
            raise ModelLoadError(f"{where}: 'labels' must be consecutive values 0, 1, ...")
        return cls([values[v] for v in range(len(values))])

    @classmethod
    def _regions(cls, dataset: dict, labels: dict, where: str) -> NnUNetLabels:
        regions = [name for name, value in labels.items() if name != "background"]
        order = _field(dataset, "regions_class_order", list, where)
        if len(order) != len(regions) or sorted(order) != list(range(1, len(regions) + 1)):
            raise ModelLoadError(
                f"{where}: 'regions_class_order' must give each of the {len(regions)} regions "
                f"a label value 1..{len(regions)}"
            )
        names = ["background"] + [""] * len(regions)
        for name, value in zip(regions, order):
            names[value] = name
        return cls(names, True, [int(v) for v in order])


@dataclass
class NnUNetConfiguration:
    """What inference needs from ``plans.json`` (one configuration, inheritance resolved)."""

    name: str
    patch_size: list[int]
    spacing: list[float]
    normalization_schemes: list[str]
    use_mask_for_norm: list[bool]
    intensity_properties: list[dict]
    transpose_forward: list[int]
    transpose_backward: list[int]
    data_resampling: dict
    probability_resampling: dict
    network_class: str
    network_kwargs: dict
    requires_import: list[str]
    reorient: bool

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    @classmethod
    def from_plans(cls, plans: dict, name: str, channels: int, where: str) -> NnUNetConfiguration:
        configurations = _field(plans, "configurations", dict, where)
        config = _resolve(configurations, name, where)
        where_config = f"{where}: configuration {name!r}"
        if config.get("previous_stage"):
            raise ModelLoadError(
                f"{where_config} is a cascade stage (needs the previous stage's segmentation); "
                "open the 3d_lowres or 3d_fullres model instead"
            )
        patch = _numbers(config.get("patch_size"), "patch_size", where_config, kind=int)
        spacing = _numbers(config.get("spacing"), "spacing", where_config, length=len(patch))
        if len(patch) not in (2, 3):
            raise ModelLoadError(f"{where_config}: 'patch_size' must have 2 or 3 numbers")
        schemes = _field(config, "normalization_schemes", list, where_config)
        masks = _field(config, "use_mask_for_norm", list, where_config)
        if len(schemes) != channels or len(masks) != channels:
            raise ModelLoadError(
                f"{where_config}: 'normalization_schemes' and 'use_mask_for_norm' need one entry "
                f"per input channel ({channels})"
            )
        for scheme in schemes:
            if scheme not in NORMALIZATIONS:
                raise ModelLoadError(
                    f"{where_config}: unknown normalization scheme {scheme!r} "
                    f"(known: {', '.join(NORMALIZATIONS)})"
                )
        properties = plans.get("foreground_intensity_properties_per_channel", {})
        intensity = [properties.get(str(c), {}) for c in range(channels)]
        for c, scheme in enumerate(schemes):
            needed = ("mean", "std", "percentile_00_5", "percentile_99_5")
            if scheme == "CTNormalization" and not all(
                isinstance(intensity[c].get(k), (int, float)) for k in needed
            ):
                raise ModelLoadError(
                    f"{where}: 'foreground_intensity_properties_per_channel' lacks "
                    f"{', '.join(needed)} for channel {c} (CTNormalization)"
                )
        transpose_forward = _permutation(plans, "transpose_forward", where)
        transpose_backward = _permutation(plans, "transpose_backward", where)
        if [transpose_forward[i] for i in transpose_backward] != [0, 1, 2]:
            raise ModelLoadError(f"{where}: 'transpose_backward' does not undo 'transpose_forward'")
        architecture = _field(config, "architecture", dict, where_config)
        reader = plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in READERS:
            raise ModelLoadError(
                f"{where}: image_reader_writer {reader!r} is not for 3D scans "
                f"(known: {', '.join(READERS)})"
            )
        return cls(
            name=name,
            patch_size=patch,
            spacing=spacing,
            normalization_schemes=list(schemes),
            use_mask_for_norm=[bool(m) for m in masks],
            intensity_properties=intensity,
            transpose_forward=transpose_forward,
            transpose_backward=transpose_backward,
            data_resampling=_resampling(config, "data", where_config),
            probability_resampling=_resampling(config, "probabilities", where_config),
            network_class=_field(architecture, "network_class_name", str, where_config),
            network_kwargs=_field(architecture, "arch_kwargs", dict, where_config),
            requires_import=list(architecture.get("_kw_requires_import", [])),
            reorient=reader.endswith("WithReorient"),
        )


def _resolve(configurations: dict, name: str, where: str, seen: tuple = ()) -> dict:
    if name not in configurations or not isinstance(configurations[name], dict):
        raise ModelLoadError(
            f"{where}: no configuration {name!r} (it has: {', '.join(configurations)})"
        )
    if name in seen:
        raise ModelLoadError(f"{where}: configurations inherit from each other in a circle")
    config = copy.deepcopy(configurations[name])
    parent = config.get("inherits_from")
    if parent:
        resolved = _resolve(configurations, parent, where, (*seen, name))
        resolved.update(config)
        config = resolved
    return config


def _permutation(plans: dict, key: str, where: str) -> list[int]:
    value = plans.get(key, [0, 1, 2])
    if not isinstance(value, list) or sorted(value) != [0, 1, 2]:
        raise ModelLoadError(f"{where}: {key!r} must be a permutation of [0, 1, 2]")
    return [int(v) for v in value]


def _resampling(config: dict, kind: str, where: str) -> dict:
    """The resampling settings (``order``, ``order_z``, ``force_separate_z``) of ``kind``."""
    function = config.get(f"resampling_fn_{kind}", "resample_data_or_seg_to_shape")
    if function != "resample_data_or_seg_to_shape":
        raise ModelLoadError(f"{where}: unknown resampling_fn_{kind} {function!r}")
    kwargs = config.get(f"resampling_fn_{kind}_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ModelLoadError(f"{where}: 'resampling_fn_{kind}_kwargs' must be an object")
    settings = {"order": 3 if kind == "data" else 1, "order_z": 0, "force_separate_z": None}
    for key, value in kwargs.items():
        if key == "is_seg":
            continue
        if key not in settings:
            raise ModelLoadError(f"{where}: unknown key {key!r} in resampling_fn_{kind}_kwargs")
        if key == "force_separate_z" and value not in (None, True, False):
            raise ModelLoadError(f"{where}: 'force_separate_z' must be null, true or false")
        if key != "force_separate_z" and value not in range(6):
            raise ModelLoadError(f"{where}: {key!r} must be a spline order 0..5")
        settings[key] = value
    return settings


# -- checkpoints --------------------------------------------------------------------------------
def _numpy_globals() -> list:
    """numpy objects nnU-Net's checkpoints hold (its training log's floats) that
    ``torch.load(weights_only=True)`` may build: scalars, arrays and their dtypes. None of them
    runs code when unpickled."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [
        getattr(np.dtypes, name)
        for name in NUMPY_DTYPES
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name)
    ]
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint read without executing pickled code (``torch.load(weights_only=True)`` with
    numpy's scalars and arrays allowed); :class:`ModelLoadError` with one line otherwise."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ...
        text = str(error)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise ModelLoadError(
                f"{path}: holds a {found.group(1)} object, which napari-uda does not unpickle "
                "(only tensors and numpy numbers: model files are data)"
            ) from None
        first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
        raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{path}: not an nnU-Net checkpoint (no dictionary)")
    weights = _field(checkpoint, "network_weights", dict, str(path))
    if not weights or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise ModelLoadError(f"{path}: 'network_weights' must map names to tensors")
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    if axes is not None and (
        not isinstance(axes, (list, tuple)) or not all(isinstance(a, int) for a in axes)
    ):
        raise ModelLoadError(f"{path}: 'inference_allowed_mirroring_axes' must list axes")
    return checkpoint


def _network_class(name: str, where: str) -> type[nn.Module]:
    short = name.rsplit(".", 1)[-1]
    if short not in NETWORK_CLASSES or not (
        name == short or name.startswith("dynamic_network_architectures.")
    ):
        raise ModelLoadError(
            f"{where}: network_class_name {name!r} is not one napari-uda builds "
            f"(known: {', '.join(NETWORK_CLASSES)} from dynamic_network_architectures)"
        )
    reason = nnunet_missing_reason()
    if reason:
        raise ModelLoadError(reason)
    from dynamic_network_architectures.architectures import unet

    return getattr(unet, short)


def _torch_layer(key: str, name: Any, where: str):
    if name is None:
        return None
    short = name.rsplit(".", 1)[-1] if isinstance(name, str) else ""
    if short not in TORCH_LAYERS or not name.startswith("torch.nn."):
        raise ModelLoadError(
            f"{where}: arch_kwargs {key!r} names {name!r}, not a known torch layer"
        )
    return getattr(nn, short)


def build_network(
    config: NnUNetConfiguration, in_channels: int, out_channels: int, where: str
) -> nn.Module:
    """The configuration's network (deep supervision off), from the allow-listed classes."""
    network_class = _network_class(config.network_class, where)
    kwargs = dict(config.network_kwargs)
    for key in config.requires_import:
        if key not in kwargs:
            raise ModelLoadError(f"{where}: _kw_requires_import names {key!r}, not in arch_kwargs")
        kwargs[key] = _torch_layer(key, kwargs[key], where)
    kwargs["deep_supervision"] = False
    try:
        return network_class(input_channels=in_channels, num_classes=out_channels, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(f"{where}: cannot build {config.network_class} ({message})") from None


# -- the network --------------------------------------------------------------------------------
def region_class_logits(region_logits: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """Class logits (N, 1 + K, ...) from K region logits whose argmax is nnU-Net's region rule
    (the label of the last region in ``regions_class_order`` with sigmoid > 0.5, background if
    none): class ``labels[i]`` scores ``min(z_i, -z_j for later j)`` and background 0."""
    count = region_logits.shape[1]
    scores = [torch.zeros_like(region_logits[:, :1])] + [None] * count
    later = None
    for i in reversed(range(count)):
        own = region_logits[:, i : i + 1]
        scores[labels[i]] = own if later is None else torch.minimum(own, later)
        later = -own if later is None else torch.minimum(later, -own)
    return torch.cat(scores, dim=1)


class NnUNetNetwork(nn.Module):
    """One or more folds of an nnU-Net network as one module returning class logits.

    The logits are the folds' average (nnU-Net averages folds the same way, in logit space); in
    evaluation mode with ``mirroring`` also the average over inputs mirrored along
    ``mirror_axes`` (nnU-Net's test-time mirroring). Region models return
    :func:`region_class_logits`. Inputs go through in chunks (the TorchScript memory clamp).

    Args:
        folds: the fold networks (same architecture).
        mirror_axes: spatial axes (0-based) nnU-Net mirrors at inference; empty: none.
        region_labels: region models' label values per output channel; empty: plain labels.
        mirroring: use ``mirror_axes`` in evaluation mode. Default True.
        inference_batch_size: most windows per forward pass without gradients. Default 1.
    """

    def __init__(
        self,
        folds: Sequence[nn.Module],
        mirror_axes: Sequence[int] = (),
        region_labels: Sequence[int] = (),
        *,
        mirroring: bool = True,
        inference_batch_size: int = 1,
    ):
        super().__init__()
        self.folds = nn.ModuleList(folds)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.region_labels = [int(v) for v in region_labels]
        self.mirroring = bool(mirroring)
        self.inference_batch_size = max(1, int(inference_batch_size))

    def _mirror_sets(self) -> list[tuple[int, ...]]:
        if self.training or not self.mirroring:
            return [()]
        axes = [a + 2 for a in self.mirror_axes]
        return [()] + [c for n in range(1, len(axes) + 1) for c in combinations(axes, n)]

    def _run(self, inputs: torch.Tensor) -> torch.Tensor:
        total = None
        flips = self._mirror_sets()
        for fold in self.folds:
            for axes in flips:
                x = torch.flip(inputs, axes) if axes else inputs
                out = fold(x)
                out = torch.flip(out, axes) if axes else out
                total = out if total is None else total + out
        logits = total / (len(self.folds) * len(flips))
        if self.region_labels:
            return region_class_logits(logits, self.region_labels)
        return logits

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        chunk = chunk_size(inputs, training, self.inference_batch_size)
        return forward_in_chunks(self._run, inputs, chunk, training)


# -- the prepared volume --------------------------------------------------------------------------
@dataclass
class NnUNetPrepared:
    """A scan as nnU-Net prepares it, as windows, with nnU-Net's way back (see
    :mod:`~napari_uda.core.models.nnunet_pipeline`). Follows
    :class:`~napari_uda.core.models.volumetric.PreparedInputs`.

    Attributes:
        source: the volume as read.
        inputs: float32 windows (N, C, *patch_size).
        tiling: the windows over the resampled crop.
        transposed_shape: the scan's shape in nnU-Net's axes (after ``transpose_forward``).
        box: the non-zero crop in those axes.
        resampled_spacing, original_spacing: voxel sizes of the model grid and of the crop.
        config: the configuration (transposes, resampling settings, reader).
    """

    source: Volume
    inputs: torch.Tensor
    tiling: WindowTiling
    transposed_shape: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    resampled_spacing: list[float]
    original_spacing: list[float]
    config: NnUNetConfiguration

    @property
    def num_slices(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def spatial_dims(self) -> int:
        return self.config.spatial_dims

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.box)

    @property
    def model_spacing(self) -> tuple[float, ...]:
        return tuple(self.resampled_spacing)

    @property
    def left_right_dim(self) -> int | None:
        """The dimension of :attr:`inputs` (N, C, ...) that runs left-right (None: 2D slices
        taken along it), for the adaptation gate's left-right check."""
        affine = self.source.canonical_affine if self.config.reorient else self.source.affine
        codes = nib.aff2axcodes(affine)
        file_axis = next(i for i, code in enumerate(codes) if code in "LR")
        position = self.config.transpose_forward.index(2 - file_axis)  # nnU-Net's axes: z y x
        if self.spatial_dims == 3:
            return 2 + position
        return None if position == 0 else 2 + position - 1

    def valid_mask(self) -> torch.Tensor:
        """(N, 1, ...) True on the scan's voxels, False on nnU-Net's padding."""
        ones = torch.ones((1, *self.tiling.grid_shape), dtype=torch.uint8)
        return self.tiling.split(ones, pad_value=0).bool()

    def to_model_grid(self, outputs, *, nearest: bool = False) -> torch.Tensor:
        """Window outputs -> (C, *grid) on the resampled crop (Gaussian-weighted average;
        probabilities are averaged as log-probabilities, see :meth:`to_source_grid`)."""
        outputs = torch.as_tensor(outputs).float()
        if not nearest and outputs.shape[1] > 1:
            outputs = outputs.clamp_min(PROBABILITY_FLOOR).log()
        return self.tiling.merge(outputs, weighted=True)

    def to_source_grid(self, outputs, *, nearest: bool = False) -> np.ndarray:
        """Window outputs (class probabilities, shaped like :attr:`inputs`) -> (C, *source.shape).

        nnU-Net averages logits over windows, resamples them to the crop and applies softmax.
        Log-probabilities differ from the logits by one number per voxel and window, the same
        for every class, so averaging and resampling them (linear operations) and applying
        softmax gives nnU-Net's probabilities. Outside the crop: background.
        """
        merged = self.to_model_grid(outputs, nearest=nearest).numpy()
        current = list(self.resampled_spacing)
        settings = self.config.probability_resampling
        if nearest:
            settings = {**settings, "order": 0, "order_z": 0}
        merged = resample(merged, self.cropped_shape, current, self.original_spacing, **settings)
        channels = torch.from_numpy(np.ascontiguousarray(merged)).float()
        if not nearest and channels.shape[0] > 1:
            channels = torch.softmax(channels, dim=0)
            fill = [1.0] + [0.0] * (channels.shape[0] - 1)
        else:
            fill = [0.0] * channels.shape[0]
        full = torch.tensor(fill).view(-1, 1, 1, 1).expand(-1, *self.transposed_shape).clone()
        full[(slice(None), *self.box)] = channels
        back = full.numpy().transpose(0, *[a + 1 for a in self.config.transpose_backward])
        return from_file_axes(self.source, back, self.config.reorient)

    def labels_to_inputs(self, labels: Volume | np.ndarray, *, fill: int = 0) -> torch.Tensor:
        """A label map on the scan's grid -> int64 (N, *patch) aligned with :attr:`inputs`
        (nearest neighbour, every value kept); padding holds ``fill``."""
        data = check_labels_shape(labels, self.source)
        arranged = file_axes(self.source.with_data(data), self.config.reorient)
        arranged = arranged.transpose(self.config.transpose_forward)[self.box]
        channels = torch.from_numpy(np.ascontiguousarray(arranged))[None]
        channels = nn.functional.interpolate(
            channels[None], size=self.tiling.grid_shape, mode="nearest-exact"
        )[0]
        return self.tiling.split(channels, pad_value=float(fill))[:, 0].round().long()


# -- the adapter ----------------------------------------------------------------------------------
@dataclass
class NnUNetFolder:
    """A trained-model folder as read: its JSON files, configuration and checkpoints."""

    path: Path
    plans: dict
    dataset: dict
    configuration: NnUNetConfiguration
    labels: NnUNetLabels
    channels: list[str]
    folds: list[str]
    checkpoint_files: list[Path]
    checkpoints: list[dict]


def read_folder(
    path: str | os.PathLike, *, folds: Sequence | None = None, checkpoint: str = "final"
) -> NnUNetFolder:
    """Read and check an nnU-Net v2 trained-model folder (see the module's docstring)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder")
    if checkpoint not in CHECKPOINTS:
        raise ModelLoadError(f"checkpoint must be final or best, not {checkpoint!r}")
    plans, dataset = read_json(folder, "plans.json"), read_json(folder, "dataset.json")
    channel_names = _field(dataset, "channel_names", dict, str(folder / "dataset.json"))
    channels = [str(channel_names[k]) for k in sorted(channel_names, key=str)]
    if len(channels) != 1:
        raise ModelLoadError(
            f"{folder / 'dataset.json'}: the model needs {len(channels)} input channels "
            f"({', '.join(channels)}); napari-uda gives it one scan"
        )
    labels = NnUNetLabels.from_dataset(dataset, str(folder / "dataset.json"))
    chosen, files = _fold_files(folder, folds, checkpoint)
    checkpoints = [load_checkpoint(file) for file in files]
    name = _configuration_name(folder, checkpoints[0], files[0])
    config = NnUNetConfiguration.from_plans(plans, name, 1, str(folder / "plans.json"))
    return NnUNetFolder(
        folder, plans, dataset, config, labels, channels, chosen, files, checkpoints
    )


def _fold_files(folder: Path, folds: Sequence | None, checkpoint: str):
    present = {}
    for entry in sorted(folder.iterdir()):
        match = _FOLD.match(entry.name)
        if match and entry.is_dir():
            _inside(folder, entry, entry.name)
            present[match.group(1)] = entry
    if folds is None:
        numbered = [k for k in present if k != "all"]
        chosen = sorted(numbered, key=int) or list(present)
    else:
        chosen = [str(f) for f in folds]
        missing = [f for f in chosen if f not in present]
        if missing:
            raise ModelLoadError(f"{folder}: no fold_{missing[0]} (it has: {_names(present)})")
    files = []
    for fold in chosen:
        wanted = present[fold] / CHECKPOINTS[checkpoint]
        if not wanted.is_file() and checkpoint == "final":
            wanted = present[fold] / CHECKPOINTS["best"]
        if wanted.is_file():
            files.append(_inside(folder, wanted, wanted.name))
        elif folds is not None:
            raise ModelLoadError(f"{present[fold]}: no {CHECKPOINTS[checkpoint]}")
    files_folds = [f.parent.name.removeprefix("fold_") for f in files]
    if not files:
        raise ModelLoadError(
            f"{folder}: no fold_<k>/{CHECKPOINTS[checkpoint]} (or checkpoint_best.pth); "
            "not a trained nnU-Net v2 model"
        )
    return files_folds, files


def _names(present: dict) -> str:
    return ", ".join(f"fold_{k}" for k in present) or "no folds"


def _configuration_name(folder: Path, checkpoint: dict, file: Path) -> str:
    """The configuration the checkpoint was trained with (nnU-Net reads ``init_args``), or the
    folder name's last part (``Trainer__Plans__<configuration>``)."""
    init_args = checkpoint.get("init_args")
    if isinstance(init_args, dict) and isinstance(init_args.get("configuration"), str):
        return init_args["configuration"]
    parts = folder.resolve().name.split("__")
    if len(parts) == 3:
        return parts[2]
    raise ModelLoadError(f"{file}: 'init_args' names no configuration")


class NnUNetAdapter(FolderModelMixin, ModelAdapter):
    """An nnU-Net v2 trained model (one configuration, one or more folds).

    Capabilities: ``norm_affine`` (InstanceNorm with scale and shift: TENT); no BatchNorm
    statistics (AdaBN does not apply), no early head, no bottleneck.
    """

    save_description = "nnU-Net v2 trained-model folder"

    def __init__(self, folder: NnUNetFolder, *, mirroring: bool = True):
        self.folder = folder
        self.path = folder.path
        self.config = folder.configuration
        self.labels = folder.labels
        self.class_names = list(folder.labels.class_names)
        self.spatial_dims = self.config.spatial_dims
        where = str(folder.path / "plans.json")
        networks = []
        for file, checkpoint in zip(folder.checkpoint_files, folder.checkpoints):
            network = build_network(self.config, 1, self.labels.num_outputs, where)
            try:
                network.load_state_dict(checkpoint["network_weights"])
            except RuntimeError as error:
                first = str(error).strip().splitlines()[0][:200]
                raise ModelLoadError(
                    f"{file}: its weights do not fit the plans' network ({first})"
                ) from None
            networks.append(network.eval())
        axes = folder.checkpoints[0].get("inference_allowed_mirroring_axes") or ()
        if any(a >= self.spatial_dims or a < 0 for a in axes):
            raise ModelLoadError(
                f"{folder.checkpoint_files[0]}: mirroring axes {list(axes)} do not fit a "
                f"{self.spatial_dims}D network"
            )
        self.network = NnUNetNetwork(
            networks,
            axes,
            self.labels.region_labels if self.labels.regions else (),
            mirroring=mirroring,
        )
        folds = ", ".join(folder.folds)
        self.name = (
            f"{folder.path.parent.name} (nnU-Net {self.config.name}, "
            f"fold{'s' if len(folder.folds) > 1 else ''} {folds})"
        )

    @classmethod
    def open(cls, path: str | os.PathLike, **options: Any) -> NnUNetAdapter:
        """Open a trained-model folder; options ``folds``, ``checkpoint``, ``mirroring``."""
        reason = nnunet_missing_reason()
        if reason:
            raise ModelLoadError(reason)
        unknown = sorted(set(options) - {"folds", "checkpoint", "mirroring"})
        if unknown:
            raise ModelLoadError(
                f"nnU-Net models take the options folds, checkpoint and mirroring "
                f"(not {', '.join(unknown)})"
            )
        mirroring = options.pop("mirroring", True)
        return cls(read_folder(path, **options), mirroring=bool(mirroring))

    # -- preprocessing ----------------------------------------------------------------------
    def prepare(self, volume: Volume) -> NnUNetPrepared:
        config = self.config
        data = file_axes(volume, config.reorient)[None]
        if not np.isfinite(data).all():
            data = np.nan_to_num(data)
        spacing = file_spacing(volume, config.reorient)
        data = data.transpose(0, *[a + 1 for a in config.transpose_forward])
        spacing = [spacing[a] for a in config.transpose_forward]
        transposed_shape = tuple(data.shape[1:])
        box, mask = nonzero_bbox(data)
        data = data[(slice(None), *box)]
        target = list(config.spacing)
        if len(target) == 2:  # 2d: the slice axis keeps its spacing
            target = [spacing[0], *target]
        new_shape = new_shape_for(data.shape[1:], spacing, target)
        if (new_shape < 1).any():
            raise VolumeError(f"the scan is too small for the model's spacing {config.spacing}")
        require_room_on_model_grid(volume, new_shape, data.shape[0], target)
        for c in range(data.shape[0]):
            data[c] = normalize_channel(
                data[c],
                config.normalization_schemes[c],
                config.use_mask_for_norm[c],
                mask,
                config.intensity_properties[c],
            )
        data = resample(data, new_shape, spacing, target, **config.data_resampling)
        tiling = WindowTiling.build(data.shape[1:], config.patch_size)
        inputs = tiling.split(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)))
        return NnUNetPrepared(
            volume, inputs.float(), tiling, transposed_shape, box, target, spacing, config
        )

    # -- description ---------------------------------------------------------------------------
    @property
    def capabilities(self) -> set[str]:
        return {NORM_AFFINE} if norm_affine_parameters(self.network) else set()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``all`` (every fold's parameters), ``norm`` (their normalisation layers' scale and
        shift, TENT's), ``early`` (the first encoder stage of each fold)."""
        groups = {"all": list(self.network.parameters())}
        norm = norm_affine_parameters(self.network)
        if norm:
            groups["norm"] = norm
        early = [p for name, p in self.network.named_parameters() if ".encoder.stages.0." in name]
        if early:
            groups["early"] = early
        return groups

    def info(self) -> ModelInfo:
        config = self.config
        return ModelInfo(
            name=self.name,
            class_names=self.class_names,
            spatial_dims=self.spatial_dims,
            norm_type=norm_description(self.network),
            spacing=tuple(config.spacing),
            capabilities=self.capabilities,
            details={
                "adapter": "nnunet",
                "path": str(self.path),
                "configuration": config.name,
                "folds": self.folder.folds,
                "checkpoints": [f.name for f in self.folder.checkpoint_files],
                "trainer": str(self.folder.checkpoints[0].get("trainer_name", "")),
                "network": config.network_class.rsplit(".", 1)[-1],
                "patch_size": config.patch_size,
                "normalization": config.normalization_schemes,
                "mirroring": list(self.network.mirror_axes) if self.network.mirroring else [],
                "regions": self.labels.regions,
                "notes": NOT_APPLICABLE,
                "parameters": sum(p.numel() for p in self.network.parameters()),
            },
        )

    # -- saving ----------------------------------------------------------------------------------
    def _write(self, path: Path, provenance: dict) -> Path:
        """A new trained-model folder: the JSON files as they were, each fold's adapted weights
        in nnU-Net's checkpoint format (``checkpoint_final.pth``) with ``provenance``, written
        in a temporary folder beside ``path`` and renamed at the end."""
        with atomic_folder(path) as temporary:
            files = {"dataset.json": self.folder.dataset, "plans.json": self.folder.plans}
            for name, values in files.items():
                (temporary / name).write_text(json.dumps(values, indent=2))
            for fold, network, old in zip(
                self.folder.folds, self.network.folds, self.folder.checkpoints
            ):
                (temporary / f"fold_{fold}").mkdir()
                torch.save(
                    _checkpoint(network, old, self.folder, fold, provenance),
                    temporary / f"fold_{fold}" / CHECKPOINTS["final"],
                )
        return path


def _checkpoint(network: nn.Module, old: dict, folder: NnUNetFolder, fold: str, provenance: dict):
    """A checkpoint nnU-Net's predictor reads: the adapted weights plus what it needs."""
    init_args = old.get("init_args") if isinstance(old.get("init_args"), dict) else {}
    init_args = {
        **init_args,
        "plans": folder.plans,
        "configuration": folder.configuration.name,
        "fold": int(fold) if fold.isdigit() else fold,
        "dataset_json": folder.dataset,
        "device": torch.device("cpu"),
    }
    weights = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    return {
        "network_weights": weights,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": old.get("current_epoch", 0),
        "init_args": init_args,
        "trainer_name": str(old.get("trainer_name", "nnUNetTrainer")),
        "inference_allowed_mirroring_axes": old.get("inference_allowed_mirroring_axes"),
        "napari_uda_provenance": json.dumps(provenance, default=str),
    }
