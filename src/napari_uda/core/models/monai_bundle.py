"""MONAI bundles as an adapter: open, predict as the bundle's own components do, adapt, save back.

A bundle folder holds ``configs/metadata.json``, ``configs/inference.json`` (or ``.yaml``) and
``models/model.pt`` (a state dict for the config's ``network_def``) or ``models/model.ts``
(TorchScript). Open it with ``load_model(folder)``.

**A bundle is code-like; napari-uda reads it as data.** A bundle's config may hold Python
expressions (``"$..."``), which MONAI's ``ConfigParser`` evaluates, and ``_target_`` names any
importable callable. napari-uda never evaluates an expression and instantiates only allow-listed
MONAI components:

* only the sections it needs are used: ``network_def``, ``preprocessing``, ``inferer`` and
  (for the order of softmax and inversion) ``postprocessing``; expressions elsewhere (the
  ``device``, ``dataset``, ``evaluator`` ... of every real bundle) are never looked at;
* in those sections a string starting with ``$`` (expression) or ``%`` (another file) is refused
  with one line naming the file and the key; ``@`` references are resolved by napari-uda to
  other literal entries of the config (no expression behind them either);
* every ``_target_`` must be a network of ``monai.networks.nets``, a transform on
  :data:`PREPROCESSING` or an inferer on :data:`INFERERS`; ``_requires_`` and ``_mode_``
  other than the default are refused; ``postprocessing`` is only read (where ``Activationsd``
  and ``Invertd`` stand, and how ``Invertd`` interpolates), never instantiated;
* only then is MONAI's own ``ConfigParser`` given those checked sections, to instantiate them;
* weights are read with ``torch.load(weights_only=True)``; a TorchScript ``model.ts`` holds a
  graph, not Python code, and is read with ``torch.jit.load``; no path leaves the folder.

The scan goes through the bundle's preprocessing (its loading transforms are skipped: napari-uda
hands over the volume, in the file's voxel order with its affine, as MONAI's ``LoadImaged`` with
the NIfTI reader gives it), then sliding windows as its ``SlidingWindowInferer`` cuts them
(MONAI's own window positions and importance map), and back through ``Invertd`` as its
postprocessing does.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..preprocessing import check_labels_shape
from ..volume import Volume, require_room_on_model_grid
from .adapter import (
    BATCHNORM,
    NORM_AFFINE,
    FolderModelMixin,
    ModelAdapter,
    ModelInfo,
    atomic_folder,
    has_batchnorm,
)
from .errors import ModelLoadError
from .nnunet import NnUNetNetwork, _inside, read_json
from .nnunet_pipeline import PROBABILITY_FLOOR, WindowTiling, centred_padding
from .scripted import LogitsNetwork, load_scripted_network, norm_affine_parameters, norm_description

#: Preprocessing transforms a bundle may use (dictionary versions); the loading ones are skipped.
PREPROCESSING = (
    "Compose",
    "LoadImaged",
    "EnsureChannelFirstd",
    "Orientationd",
    "Spacingd",
    "ScaleIntensityRanged",
    "ScaleIntensityd",
    "NormalizeIntensityd",
    "ScaleIntensityRangePercentilesd",
    "CropForegroundd",
    "SpatialPadd",
    "DivisiblePadd",
    "EnsureTyped",
    "CastToTyped",
    "ToTensord",
)
SKIPPED = ("LoadImaged", "EnsureChannelFirstd")
INFERERS = ("SlidingWindowInferer", "SimpleInferer")
#: Sections instantiated (checked first); ``postprocessing`` is only read for its order.
SECTIONS = ("network_def", "preprocessing", "inferer")
RESERVED = ("_target_", "_disabled_", "_desc_", "_mode_")


def is_monai_bundle(path: Path) -> bool:
    configs = path / "configs"
    return (
        path.is_dir()
        and (configs / "metadata.json").is_file()
        and any((configs / f"inference.{s}").is_file() for s in ("json", "yaml", "yml"))
    )


def monai_missing_reason() -> str:
    try:
        import monai  # noqa: F401
    except ImportError:
        return "MONAI is not installed (pip install 'napari-uda[monai]')"
    return ""


# -- reading the bundle as data --------------------------------------------------------------------
def _read_config(folder: Path) -> tuple[dict, Path]:
    configs = folder / "configs"
    for suffix in ("json", "yaml", "yml"):
        path = configs / f"inference.{suffix}"
        if path.is_file():
            _inside(folder, path, path.name)
            try:
                text = path.read_text()
                if suffix == "json":
                    values = json.loads(text)
                else:
                    import yaml

                    values = yaml.safe_load(text)
            except Exception as error:  # JSON / YAML errors, unreadable files
                first = str(error).strip().splitlines()[0][:200]
                raise ModelLoadError(f"{path}: not a readable config ({first})") from None
            if not isinstance(values, dict):
                raise ModelLoadError(f"{path}: must hold an object")
            return values, path
    raise ModelLoadError(f"{configs}: no inference.json; not a MONAI bundle")


def _component(name: Any, allowed: tuple[str, ...] | None, module: str, where: str) -> str:
    """A ``_target_`` checked against the allow-list (``allowed`` None: any class of
    ``module``, for networks)."""
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"{where}: '_target_' must name a MONAI component")
    short = name.rsplit(".", 1)[-1]
    if "." in name and not name.startswith("monai."):
        raise ModelLoadError(f"{where}: '_target_' {name!r} is not a MONAI component; refused")
    import importlib

    namespace = importlib.import_module(module)
    target = getattr(namespace, short, None)
    known = allowed is None and isinstance(target, type) and issubclass(target, nn.Module)
    if not (known or (allowed is not None and short in allowed and target is not None)):
        raise ModelLoadError(
            f"{where}: '_target_' {name!r} is not on napari-uda's list of MONAI components it "
            "instantiates; refused"
        )
    return short


def literal(config: dict, value: Any, where: str, seen: tuple = ()) -> Any:
    """``value`` with ``@`` references replaced by the literal entries they name; expressions
    (``$``) and macros (``%``) refused with one line."""
    if isinstance(value, dict):
        for key in value:
            if key.startswith("_") and key not in RESERVED:
                raise ModelLoadError(f"{where}: key {key!r} is not allowed (only {RESERVED})")
        if value.get("_mode_", "default") != "default":
            raise ModelLoadError(f"{where}: '_mode_' {value['_mode_']!r} is not allowed")
        return {k: literal(config, v, f"{where}.{k}", seen) for k, v in value.items()}
    if isinstance(value, list):
        return [literal(config, v, f"{where}[{i}]", seen) for i, v in enumerate(value)]
    if isinstance(value, str) and value[:1] == "$":
        raise ModelLoadError(
            f"{where}: {value[:60]!r} is an expression; napari-uda reads bundles as data and "
            "does not evaluate them"
        )
    if isinstance(value, str) and value[:1] == "%":
        raise ModelLoadError(f"{where}: {value[:60]!r} refers to another file; refused")
    if isinstance(value, str) and value[:1] == "@":
        key = value[1:]
        if key in seen or ("#" in key and key.split("#")[0] in seen):
            raise ModelLoadError(f"{where}: references {value!r} form a circle")
        target: Any = config
        for part in key.split("#"):
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise ModelLoadError(f"{where}: {value!r} names no entry of the config")
        return literal(config, target, f"{where}->{key}", (*seen, key))
    return value


def _check_targets(value: Any, section: str, where: str) -> None:
    allowed = {
        "network_def": (None, "monai.networks.nets"),
        "preprocessing": (PREPROCESSING, "monai.transforms"),
        "inferer": (INFERERS, "monai.inferers"),
    }[section]
    if isinstance(value, dict):
        if "_target_" in value:
            _component(value["_target_"], *allowed, where)
        for key, item in value.items():
            _check_targets(item, section, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_targets(item, section, f"{where}[{index}]")


def checked_sections(config: dict, where: str) -> dict[str, Any]:
    """The sections napari-uda uses, literal and allow-listed (see the module's docstring)."""
    sections = {}
    for name in SECTIONS:
        if name not in config:
            raise ModelLoadError(f"{where}: {name!r} is missing")
        value = literal(config, config[name], f"{where}: {name}", (name,))
        _check_targets(value, name, f"{where}: {name}")
        sections[name] = value
    if not isinstance(sections["network_def"], dict) or "_target_" not in sections["network_def"]:
        raise ModelLoadError(f"{where}: 'network_def' must be a component with a '_target_'")
    return sections


def _transforms(section: Any) -> list[dict]:
    """The transform entries of a Compose section (or a plain list)."""
    if isinstance(section, dict) and "transforms" in section:
        section = section["transforms"]
    return [t for t in (section or []) if isinstance(t, dict) and not t.get("_disabled_")]


def _short(entry: dict) -> str:
    return str(entry.get("_target_", "")).rsplit(".", 1)[-1]


def _class_names(metadata: dict, channels: int, where: str) -> list[str]:
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    output = next(iter(outputs.values()), {}) if isinstance(outputs, dict) else {}
    channel_def = output.get("channel_def", {}) if isinstance(output, dict) else {}
    names = [str(channel_def.get(str(i), f"class {i}")) for i in range(channels)]
    if len(set(names)) != len(names):
        raise ModelLoadError(f"{where}: channel_def gives two channels the same name")
    return names


# -- the adapter ----------------------------------------------------------------------------------
class MonaiBundleAdapter(FolderModelMixin, ModelAdapter):
    """A MONAI bundle: its network, preprocessing and sliding-window inferer.

    Capabilities: ``norm_affine`` when its normalisation layers have scale and shift (TENT),
    ``batchnorm`` when it has BatchNorm layers with running statistics (AdaBN; not for a
    TorchScript ``model.ts``); no early head, no bottleneck.
    """

    save_description = "MONAI bundle folder"

    def __init__(self, folder: Path):
        reason = monai_missing_reason()
        if reason:
            raise ModelLoadError(reason)
        self.path = Path(folder)
        config, self.config_path = _read_config(self.path)
        where = str(self.config_path)
        self.sections = checked_sections(config, where)
        self.postprocessing_entries = _transforms(config.get("postprocessing"))
        self.spatial_dims = int(self.sections["network_def"].get("spatial_dims", 3))
        if self.spatial_dims != 3:
            raise ModelLoadError(
                f"{where}: only 3D bundles open (spatial_dims is {self.spatial_dims})"
            )
        self.metadata = read_json(self.path, "configs/metadata.json", "a MONAI bundle")
        self.scripted_file = None
        self.network = self._network(where)
        out_channels = self._out_channels()
        self.class_names = _class_names(self.metadata, out_channels, where)
        if len(self.class_names) < 2:
            raise ModelLoadError(f"{where}: the network has {out_channels} output channel(s)")
        self.preprocessing, self.image_key = self._preprocessing(where)
        self._inferer_settings(where)
        self._postprocessing_order()
        self.name = str(self.metadata.get("name") or self.path.name)

    @classmethod
    def open(cls, path: str | os.PathLike, **options: Any) -> MonaiBundleAdapter:
        if options:
            raise ModelLoadError(f"MONAI bundles take no options (got {', '.join(options)})")
        return cls(Path(path))

    # -- building ----------------------------------------------------------------------------------
    def _parsed(self, section: str):
        from monai.bundle import ConfigParser

        parser = ConfigParser({section: copy.deepcopy(self.sections[section])})
        return parser.get_parsed_content(section, instantiate=True)

    def _network(self, where: str) -> nn.Module:
        models = self.path / "models"
        state_file, script_file = models / "model.pt", models / "model.ts"
        if state_file.is_file():
            _inside(self.path, state_file, state_file.name)
            try:
                network = self._parsed("network_def")
            except Exception as error:  # MONAI raises many kinds on bad arguments
                first = str(error).strip().splitlines()[0][:200]
                raise ModelLoadError(f"{where}: cannot build network_def ({first})") from None
            try:
                network.load_state_dict(_state_dict(state_file))
            except RuntimeError as error:
                first = str(error).strip().splitlines()[0][:200]
                raise ModelLoadError(f"{state_file}: does not fit network_def ({first})") from None
            return NnUNetNetwork([network.eval()], mirroring=False)
        if script_file.is_file():
            _inside(self.path, script_file, script_file.name)
            self.scripted_file = script_file
            scripted = load_scripted_network(script_file)
            channels = int(self.sections["network_def"].get("out_channels", 0)) or 2
            return LogitsNetwork(scripted, "none", channels, 1, self.path.name)
        raise ModelLoadError(f"{models}: no model.pt or model.ts")

    def _out_channels(self) -> int:
        channels = self.sections["network_def"].get("out_channels")
        if isinstance(channels, int) and channels > 0:
            return channels
        raise ModelLoadError(f"{self.config_path}: network_def needs an 'out_channels' number")

    def _preprocessing(self, where: str):
        from monai.bundle import ConfigParser

        entries = _transforms(self.sections["preprocessing"])
        keys = [e.get("keys") for e in entries if _short(e) in SKIPPED]
        key = keys[0] if keys else "image"
        key = key[0] if isinstance(key, list) and key else key
        kept = [e for e in entries if _short(e) not in SKIPPED]
        parser = ConfigParser(
            {"preprocessing": {"_target_": "Compose", "transforms": copy.deepcopy(kept)}}
        )
        try:
            return parser.get_parsed_content("preprocessing"), str(key)
        except Exception as error:
            first = str(error).strip().splitlines()[0][:200]
            raise ModelLoadError(f"{where}: cannot build preprocessing ({first})") from None

    def _inferer_settings(self, where: str) -> None:
        inferer = self.sections["inferer"]
        name = _short(inferer)
        self.roi_size = None
        self.overlap, self.blend, self.sigma_scale = 0.25, "constant", 0.125
        if name == "SlidingWindowInferer":
            roi = inferer.get("roi_size")
            if not isinstance(roi, list) or not all(isinstance(n, int) and n > 0 for n in roi):
                raise ModelLoadError(f"{where}: inferer 'roi_size' must be a list of whole numbers")
            self.roi_size = tuple(roi)
            self.overlap = float(inferer.get("overlap", 0.25))
            self.blend = str(inferer.get("mode", "constant"))
            self.sigma_scale = inferer.get("sigma_scale", 0.125)
            if self.blend not in ("constant", "gaussian") or not 0 <= self.overlap < 1:
                raise ModelLoadError(f"{where}: inferer mode/overlap not supported")

    def _postprocessing_order(self) -> None:
        """Whether the bundle applies softmax before inverting the preprocessing (the usual
        order) and how ``Invertd`` interpolates."""
        entries = self.postprocessing_entries  # read, never instantiated
        names = [_short(e) for e in entries]
        self.softmax_first = (
            "Activationsd" not in names
            or "Invertd" not in names
            or names.index("Activationsd") < names.index("Invertd")
        )
        invert = next((e for e in entries if _short(e) == "Invertd"), {})
        self.nearest_interp = bool(invert.get("nearest_interp", True))

    # -- preprocessing --
    def prepare(self, volume: Volume) -> MonaiPrepared:
        from monai.data import MetaTensor

        spacing = self.target_spacing
        if spacing:  # the grid Spacingd will make, at least (its axes may be reoriented)
            coarsest = max(spacing)
            shape = [max(1, round(n * s / coarsest)) for n, s in zip(volume.shape, volume.spacing)]
            require_room_on_model_grid(volume, shape, 1, spacing)
        image = MetaTensor(
            torch.from_numpy(np.asarray(volume.data, dtype=np.float32)[None].copy()),
            affine=torch.as_tensor(volume.affine, dtype=torch.float64),
        )
        data = self.preprocessing({self.image_key: image})
        prepared = data[self.image_key]
        grid = tuple(prepared.shape[1:])
        roi = self.roi_size or grid
        tiling = _monai_tiling(grid, roi, self.overlap, self.blend, self.sigma_scale)
        inputs = tiling.split(prepared.as_tensor().float())
        return MonaiPrepared(volume, inputs.float(), tiling, prepared, self)

    # -- description --
    @property
    def capabilities(self) -> set[str]:
        caps = {NORM_AFFINE} if norm_affine_parameters(self.network) else set()
        if self.scripted_file is None and has_batchnorm(self.network):
            caps.add(BATCHNORM)
        return caps

    @property
    def target_spacing(self) -> tuple[float, ...] | None:
        """The voxel size (mm) the bundle's ``Spacingd`` resamples to, if it has one."""
        spacing = next(
            (
                e.get("pixdim")
                for e in _transforms(self.sections["preprocessing"])
                if _short(e) == "Spacingd"
            ),
            None,
        )
        if not isinstance(spacing, list) or not all(isinstance(v, (int, float)) for v in spacing):
            return None
        return tuple(float(v) for v in spacing)

    def info(self) -> ModelInfo:
        spacing = self.target_spacing
        return ModelInfo(
            name=self.name,
            class_names=self.class_names,
            spatial_dims=self.spatial_dims,
            norm_type=norm_description(self.network),
            spacing=spacing,
            capabilities=self.capabilities,
            details={
                "adapter": "monai_bundle",
                "path": str(self.path),
                "network": _short(self.sections["network_def"]),
                "weights": "model.ts" if self.scripted_file else "model.pt",
                "roi_size": list(self.roi_size) if self.roi_size else None,
                "version": self.metadata.get("version"),
                "parameters": sum(p.numel() for p in self.network.parameters()),
            },
        )

    # -- saving --
    def _write(self, path: Path, provenance: dict) -> Path:
        """A new bundle folder: ``configs/`` (and ``docs/``) copied, the adapted weights in
        ``models/``, ``provenance`` in ``configs/napari_uda_provenance.json``."""
        with atomic_folder(path) as temporary:
            for part in ("configs", "docs"):
                source = self.path / part
                if source.is_dir():
                    shutil.copytree(source, temporary / part, symlinks=False)
            (temporary / "models").mkdir()
            if self.scripted_file is not None:
                torch.jit.save(
                    copy.deepcopy(self.network.scripted).cpu(), temporary / "models" / "model.ts"
                )
            else:
                state = self.network.folds[0].state_dict()
                weights = {k: v.detach().cpu().clone() for k, v in state.items()}
                torch.save(weights, temporary / "models" / "model.pt")
            (temporary / "configs" / "napari_uda_provenance.json").write_text(
                json.dumps(provenance, indent=2, default=str)
            )
        return path


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``models/model.pt`` as a state dict, read with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else "unreadable"
        raise ModelLoadError(f"{path}: not loadable as weights only ({first})") from None
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # {"model": state_dict}, as CheckpointSaver writes
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: not a state dict of tensors")
    return state


def _monai_tiling(grid, roi, overlap: float, blend: str, sigma_scale) -> WindowTiling:
    """Windows and weights as MONAI's ``sliding_window_inference`` makes them."""
    from monai.data.utils import compute_importance_map, dense_patch_slices

    grid, roi = tuple(int(n) for n in grid), tuple(int(n) for n in roi)
    padding = centred_padding(grid, roi)
    padded = tuple(n + a + b for n, (a, b) in zip(grid, padding))
    interval = tuple(r if r == n else max(1, int(r * (1 - overlap))) for n, r in zip(padded, roi))
    slices = dense_patch_slices(padded, roi, interval, return_slice=True)
    weights = compute_importance_map(roi, mode=blend, sigma_scale=sigma_scale, device="cpu")
    windows = [(slice(None), *s) for s in slices]
    return WindowTiling(grid, roi, padding, windows, weights.float())


class MonaiPrepared:
    """A scan as the bundle prepares it, as windows, with the way back through ``Invertd``.
    Follows :class:`~napari_uda.core.models.volumetric.PreparedInputs`."""

    def __init__(self, source: Volume, inputs, tiling: WindowTiling, prepared, model):
        self.source = source
        self.inputs = inputs
        self.tiling = tiling
        self.prepared = prepared  # the MetaTensor, with the transforms applied
        self.model = model

    #: Not worked out through the bundle's transforms: the gate skips its left-right check.
    left_right_dim = None

    @property
    def spatial_dims(self) -> int:
        return 3

    @property
    def num_slices(self) -> int:
        return int(self.inputs.shape[0])

    def valid_mask(self) -> torch.Tensor:
        ones = torch.ones((1, *self.tiling.grid_shape), dtype=torch.uint8)
        return self.tiling.split(ones, pad_value=0).bool()

    def _invert(self, channels: torch.Tensor, nearest: bool) -> torch.Tensor:
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        key = self.model.image_key
        output = MetaTensor(channels, affine=self.prepared.affine, meta=dict(self.prepared.meta))
        inverter = Invertd(
            keys="pred",
            transform=self.model.preprocessing,
            orig_keys=key,
            nearest_interp=nearest,
        )
        return torch.as_tensor(inverter({"pred": output, key: self.prepared})["pred"])

    def to_source_grid(self, outputs, *, nearest: bool = False) -> np.ndarray:
        """Window outputs (class probabilities) -> (C, *source.shape): averaged as the inferer
        does (as log-probabilities: the same softmax as averaged logits), softmax and
        ``Invertd`` in the bundle's postprocessing order."""
        outputs = torch.as_tensor(outputs).float()
        if nearest:
            merged = self.tiling.merge(outputs)
            return self._invert(merged, True).numpy()
        merged = self.tiling.merge(outputs.clamp_min(PROBABILITY_FLOOR).log())
        if self.model.softmax_first:
            back = self._invert(torch.softmax(merged, 0), self.model.nearest_interp)
        else:
            back = torch.softmax(self._invert(merged, self.model.nearest_interp), 0)
        return np.ascontiguousarray(back.numpy().astype(np.float32))

    def labels_to_inputs(self, labels: Volume | np.ndarray, *, fill: int = 0) -> torch.Tensor:
        """A label map on the scan's grid -> int64 windows (resampled to the prepared grid,
        nearest neighbour, every value kept; outside the scan and on padding ``fill``)."""
        from monai.data import MetaTensor
        from monai.transforms import ResampleToMatch

        data = check_labels_shape(labels, self.source)
        meta = MetaTensor(
            torch.from_numpy(data.astype(np.float32)[None]),
            affine=torch.as_tensor(self.source.affine, dtype=torch.float64),
        )
        resample = ResampleToMatch(mode="nearest", padding_mode="zeros")
        matched = resample(meta - fill, img_dst=self.prepared) + fill  # outside: fill
        channels = torch.as_tensor(matched).float()
        return self.tiling.split(channels, pad_value=float(fill))[:, 0].round().long()
