"""deepbet (Fisch et al. 2024, MIT): 3D brain extraction of T1-weighted heads, as an adapter.

Optional extra: ``pip install 'napari-uda[deepbet]'``; open with ``load_model("deepbet")``. The
TorchScript weights ship in deepbet's wheel; nothing is downloaded.

Preprocessing and post-processing are deepbet 1.0's own (``deepbet/bet.py``), called through
its functions where it has them so the product's result equals ``deepbet-cli``'s:

1. canonical (closest RAS+) orientation, NaN -> 0;
2. a copy resized to 128^3 (``nearest-exact``); its 0.5 and 99.5 percentiles are ``low`` and
   ``high``; the *localiser* network (``bbox_model.pt``) segments it, the largest connected
   component above 0.5 gives a bounding box, enlarged by 10 % on each side and scaled to the
   full grid;
3. the box is cropped from the full-resolution volume and resized to 256^3 (``nearest-exact``);
   intensities are clipped to [low, high], scaled to [0, 1], z-scored over the crop and mapped
   to ``0.226 * z + 0.449``;
4. the main network (``model.pt``, a 3D LinkNet with InstanceNorm and a softmax output) gives
   (background, brain) probabilities; they are resized back into the box (``nearest-exact``),
   background outside it;
5. brain where p > 0.5, then inside the box: the largest connected component, holes filled
   (``fill_voids``); no dilation (deepbet's default).

Step 5 is applied by :meth:`VolumetricPrepared.to_source_grid`: the voxels it changes get their
two probabilities swapped (p -> 1 - p), so labels equal deepbet's mask while the entropy map
keeps the network's own uncertainty.

Only the main network is adapted; the localiser stays as shipped. deepbet's InstanceNorm layers
have no affine parameters, so TENT (norm affine parameters) and AdaBN (BatchNorm statistics) do
not apply. Entropy minimisation (AdaEnt), self-training, Mean Teacher and distillation update
either the first blocks (``trainable="first_blocks"``, default: the 7x7x7 stem and the first
encoder stage, ``init`` and ``down0``) or every parameter (``trainable="all"``). The first
blocks are the default because training every parameter of a network this size on one scan
lets entropy minimisation drift on a severe shift, where the first blocks hold; the measured
settings per method are :data:`RECOMMENDED_SETTINGS` (numbers in docs/model-adapters.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..device import cpu_bfloat16_supported
from ..volume import Volume, VolumeError
from .adapter import ModelAdapter, ModelInfo
from .errors import ModelLoadError
from .scripted import LogitsNetwork, ScriptedAdapterMixin, load_scripted_network, save_scripted
from .volumetric import ModelGrid, PatchTiling, VolumetricPrepared

CLASS_NAMES = ["background", "brain"]
LOCALISER_SHAPE = (128, 128, 128)
MODEL_SHAPE = (256, 256, 256)
BOX_MARGIN = 0.1
FIRST_BLOCKS = ["init.", "down0."]
INSTALL_HINT = "pip install 'napari-uda[deepbet]'"
NOT_APPLICABLE = (
    "TENT and AdaBN do not apply: deepbet's InstanceNorm layers have no affine parameters "
    "and it has no BatchNorm"
)
#: Settings per method for one-shot adaptation of deepbet (one 256^3 input per scan, so one
#: optimiser step per epoch), measured on real heads with simulated scanners
#: (benchmarks/deepbet_benchmark.py, docs/model-adapters.md): six steps at learning rate 5e-4.
#: AdaEnt's default ``parameters="norm"`` does not exist in deepbet: "all" trains the adapter's
#: trainable set (the first blocks by default).
RECOMMENDED_SETTINGS = {
    "adaent": {"parameters": "all", "learning_rate": 5e-4, "epochs": 6},
    "mean_teacher": {"learning_rate": 5e-4, "epochs": 6},
    # corrections (docs/corrections.md): one evaluation after six steps at 3e-4 on every
    # weight, on the whole input. Not on a window (corrections_crop): deepbet normalises each
    # layer over its whole input, so a window gets another answer than the whole scan and the
    # step trained another network than the one that segments (the first blocks then barely
    # moved the scan; every weight cost a clean head); on the whole input every weight, held
    # by the anchor, left a clean head as it was (measured in the benchmark)
    "corrections": {
        "epochs": 1,
        "steps_per_epoch": 6,
        "corrections_parameters": "every",
        "corrections_learning_rate": 3e-4,
        "corrections_crop": 0,
    },
}
SPEC_KEYS = {"adapter", "file", "name", "class_names", "trainable", "postprocess", "provenance"}


def deepbet_missing_reason() -> str:
    """Why deepbet cannot be used here ("" when it can)."""
    if importlib.util.find_spec("deepbet") is None:
        return f"deepbet is not installed ({INSTALL_HINT})"
    try:
        model, localiser = deepbet_weight_paths()
    except Exception as error:  # a broken install
        return f"deepbet cannot be imported ({error})"
    missing = [str(p) for p in (model, localiser) if not p.exists()]
    return f"deepbet's weights are missing: {', '.join(missing)}" if missing else ""


def deepbet_weight_paths() -> tuple[Path, Path]:
    """Paths of deepbet's main network and localiser in its installed wheel."""
    from deepbet.utils import DATA_PATH

    models = Path(DATA_PATH) / "models"
    return models / "model.pt", models / "bbox_model.pt"


def _require_deepbet() -> None:
    reason = deepbet_missing_reason()
    if reason:
        raise ModelLoadError(reason)


def _deepbet_tools():
    """deepbet's own functions (imported late: deepbet is an optional extra)."""
    from deepbet.bet import BrainExtraction
    from deepbet.utils import keep_largest_connected_component, normalize

    # An instance without loading networks: only its box and post-processing helpers are used.
    helper = BrainExtraction.__new__(BrainExtraction)
    return helper, normalize, keep_largest_connected_component


#: Plausible brain-mask volume (ml) deepbet states: adult brains, and heads in template space.
EXPECTED_BRAIN_ML = (900.0, 2200.0)


class DeepbetAdapter(ScriptedAdapterMixin, ModelAdapter):
    """deepbet's main network with deepbet's exact pre- and post-processing.

    Args:
        network: deepbet's main TorchScript network (``model.pt``, or an adapted copy).
        localiser: deepbet's bounding-box network (``bbox_model.pt``); never adapted.
        trainable: ``"first_blocks"`` (default: ``init`` and ``down0``, 33 k parameters) or
            ``"all"`` (2.1 M); what methods train when they train "all" parameters.
        postprocess: apply deepbet's largest-component and hole filling. Default True.
        name: shown in the UI. Default ``"deepbet"``.
        input_shape: size the brain box is resized to. Default (256, 256, 256), deepbet's;
            smaller sizes are only for quick tests of the mechanics (the network was trained
            at 256^3).
        bfloat16: compute the main network under bfloat16 autocast on the CPU in every pass:
            False (default: float32, deepbet's own result), True, or None (where the CPU has
            native bfloat16, see ``core.device.cpu_bfloat16_supported``). Faster per pass on
            such a CPU, but the unadapted prediction is then no longer exactly deepbet's.
        bfloat16_training: bfloat16 autocast on the CPU in the passes with gradients only
            (the training steps of adaptation and correction rounds), while every prediction
            (the unadapted one, the engine's evaluations, the result) stays float32: False
            (default), True, or None (where the CPU has native bfloat16). Each training step
            of deepbet is a forward and backward pass at 256^3; in bfloat16 it needs less
            time and memory, but it moved the Dice of one correction-round case beyond noise
            (docs/performance.md), hence off by default.
    """

    spatial_dims = 3

    def __init__(
        self,
        network: nn.Module,
        localiser: nn.Module,
        *,
        trainable: str = "first_blocks",
        postprocess: bool = True,
        name: str = "deepbet",
        input_shape: tuple[int, int, int] = MODEL_SHAPE,
        bfloat16: bool | None = False,
        bfloat16_training: bool | None = False,
    ):
        self.name = name
        self.input_shape = tuple(int(n) for n in input_shape)
        self.class_names = list(CLASS_NAMES)
        native = cpu_bfloat16_supported()
        self.network = LogitsNetwork(
            network,
            "softmax",
            2,
            inference_batch_size=1,
            name=name,
            cpu_bfloat16=native if bfloat16 is None else bool(bfloat16),
            cpu_bfloat16_training=native if bfloat16_training is None else bool(bfloat16_training),
        )
        self.localiser = localiser.eval()
        for parameter in self.localiser.parameters():
            parameter.requires_grad_(False)
        self.first_block_prefixes = list(FIRST_BLOCKS)
        self.postprocess = bool(postprocess)
        self.trainable = "all"
        self.set_trainable(trainable)
        #: The files the networks were read from (never overwritten by :meth:`save`).
        self.files: list[Path] = []

    @classmethod
    def from_package(cls, **options: Any) -> DeepbetAdapter:
        """deepbet as shipped in its wheel (``options``: see the class)."""
        _require_deepbet()
        model, localiser = deepbet_weight_paths()
        adapter = cls(load_scripted_network(model), load_scripted_network(localiser), **options)
        adapter.files = [model, localiser]
        return adapter

    @classmethod
    def from_spec(cls, spec_path: Path, spec: dict, **options: Any) -> DeepbetAdapter:
        """An adapted deepbet saved by :meth:`save` (``.pt`` + ``.json`` with adapter deepbet)."""
        _require_deepbet()
        unknown = sorted(set(spec) - SPEC_KEYS - {"format", "version", "description"})
        if unknown:
            raise ModelLoadError(f"{spec_path}: unknown key {unknown[0]!r} for a deepbet model")
        if spec.get("class_names", CLASS_NAMES) != CLASS_NAMES:
            raise ModelLoadError(f"{spec_path}: deepbet's classes are {CLASS_NAMES}")
        file = spec_path.parent / str(spec.get("file") or spec_path.with_suffix(".pt").name)
        settings = {
            "trainable": spec.get("trainable", "first_blocks"),
            "postprocess": spec.get("postprocess", True),
            "name": spec.get("name", file.name),
        }
        settings.update(options)
        _, localiser = deepbet_weight_paths()
        adapter = cls(load_scripted_network(file), load_scripted_network(localiser), **settings)
        adapter.files = [file, spec_path, localiser]
        return adapter

    # -- preprocessing ----------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, volume: Volume) -> VolumetricPrepared:
        helper, normalize, keep_largest = _deepbet_tools()
        canonical = volume.to_canonical()
        x = torch.nan_to_num(torch.from_numpy(np.asarray(canonical.data, dtype=np.float32)))
        x_small = F.interpolate(x[None, None], LOCALISER_SHAPE, mode="nearest-exact")[0, 0]
        low, high = x_small.quantile(0.005), x_small.quantile(0.995)
        if not float(high) > float(low):
            raise VolumeError("deepbet cannot use this volume: its intensities are constant")
        localiser = self.localiser.cpu()
        mask_small = localiser(normalize(x_small, low, high)[None, None])[0, 1]
        mask_small = (mask_small > 0.5).float().numpy()
        if not mask_small.any():
            raise VolumeError(
                "deepbet's localiser found no brain in this volume; is it a T1-weighted head?"
            )
        mask_small = torch.from_numpy(keep_largest(mask_small))
        box = helper.get_bbox_with_margin(mask_small, tuple(x.shape), BOX_MARGIN)
        crop = F.interpolate(x[box][None, None], self.input_shape, mode="nearest-exact")[0, 0]
        inputs = normalize(crop, low, high)[None, None].float().contiguous()
        grid = ModelGrid(
            tuple(canonical.shape), "RAS", box, self.input_shape, interpolation="nearest-exact"
        )
        tiling = PatchTiling.build(self.input_shape, None, pad_multiple=1)
        postprocess = _Postprocess(box) if self.postprocess else None
        return VolumetricPrepared(volume, inputs, grid, tiling, postprocess)

    def recommended_settings(self, method: str) -> dict[str, Any]:
        """:data:`RECOMMENDED_SETTINGS` for ``method`` (measured; none for the others)."""
        return dict(RECOMMENDED_SETTINGS.get(method, {}))

    def expected_volumes(self) -> dict[str, tuple[float, float]]:
        """:data:`EXPECTED_BRAIN_ML`: an adult brain mask (as deepbet draws it) measures
        roughly 1000-1800 ml in the scanner's space; heads in template space are larger (the
        MNI152 mask: 2075 ml), hence the wider range. A mask outside it is flagged."""
        return {self.class_names[-1]: EXPECTED_BRAIN_ML}

    # -- description ---------------------------------------------------------------------------
    @property
    def capabilities(self) -> set[str]:
        return self.scripted_capabilities()

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            class_names=self.class_names,
            spatial_dims=3,
            norm_type=self.norm_description(),
            spacing=None,
            capabilities=self.capabilities,
            details={
                "adapter": "deepbet",
                "input": f"brain box resized to {'x'.join(map(str, self.input_shape))}",
                "trainable": self.trainable,
                "first_blocks": self.first_block_prefixes,
                "postprocess": self.postprocess,
                "notes": NOT_APPLICABLE,
                **self.parameter_counts(),
            },
        )

    def input_files(self) -> list[Path]:
        return list(self.files)

    def _write(self, path: Path, provenance: dict) -> Path:
        """The adapted main network as ``path`` (.pt) plus a .json that reopens it as deepbet
        (the localiser stays deepbet's own)."""
        spec = {
            "adapter": "deepbet",
            "name": f"{self.name} (adapted)" if "adapted" not in self.name else self.name,
            "class_names": self.class_names,
            "trainable": self.trainable,
            "postprocess": self.postprocess,
        }
        if provenance:
            spec["provenance"] = provenance
        return save_scripted(self.scripted, spec, path)


class _Postprocess:
    """deepbet's post-processing on canonical (background, brain) probabilities.

    The mask (brain where it is the more likely class) gets deepbet's largest connected component
    and hole filling inside ``box``; voxels whose label that changes get their probabilities
    swapped, so the entropy map is unchanged.
    """

    def __init__(self, box: tuple[slice, slice, slice]):
        self.box = box

    def __call__(self, probabilities: np.ndarray) -> np.ndarray:
        helper, _, _ = _deepbet_tools()
        mask = probabilities[1] > probabilities[0]
        if not mask[self.box].any():
            return probabilities
        helper.bbox = self.box
        processed = helper.postprocess(mask.copy(), 0)
        changed = processed != mask
        if changed.any():
            probabilities = probabilities.copy()
            probabilities[:, changed] = probabilities[::-1][:, changed]
            ties = changed & processed & (probabilities[1] <= probabilities[0])
            probabilities[1][ties] = np.nextafter(probabilities[0][ties], np.float32(2))
        return probabilities
