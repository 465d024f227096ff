"""Corrections as supervision: the loss on corrected voxels and the step that adds it to a run.

A user corrects a few slices of a segmentation; every voxel of a corrected slice is truth, every
other voxel carries :data:`NOT_CORRECTED` (-1). The engine maps the corrections through the
model's preparation like a reference mask (``AdaptationContext.corrections``: a long tensor
aligned with ``target_inputs``) and, when a run has corrections, calls one
:class:`CorrectionStep` after every step of the method. So every method combines with
corrections in one place (a method that cannot sets ``corrections_unsupported`` to the reason),
and the ``corrections`` method (:mod:`.methods.corrections`) is this step alone.

One correction step:

* picks a batch: slices that hold corrected voxels (at most half of ``batch_size``, the rest
  filled with the engine's batch of other target slices); a 3D model's single input holds both;
* supervised loss on the corrected voxels only: cross-entropy plus ``corrections_dice_weight``
  times a soft Dice loss (the corrected voxels carry both classes of a slice, so Dice does not
  collapse to the majority class);
* anchor (``corrections_anchor_weight``): cross-entropy with the frozen model's probabilities
  (the model the round started from) on voxels where that model was confident
  (``corrections_anchor_confidence``) and that lie more than ``corrections_anchor_margin``
  voxels from any corrected voxel, so corrections spread to their neighbourhood while the rest
  of the scan keeps what the model already did well (forgetting is what an unanchored update
  of every weight showed);
* one Adam step on its own parameter group (``corrections_parameters``: ``auto`` is every
  parameter the model offers for training), with its own learning rate; the network's BatchNorm
  layers run in evaluation mode for this step (statistics as at inference, independent of how
  few slices were corrected); the method's own modes are restored afterwards.

Why the defaults are what they are is measured in ``benchmarks/corrections_benchmark.py``
(docs/corrections.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import maximum_filter
from torch import nn

from ..core.corrections import NOT_CORRECTED
from ..core.metrics import mean_foreground_dice
from ..settings import setting
from .losses import soft_cross_entropy, soft_dice_loss

if TYPE_CHECKING:
    from .base import AdaptationContext


@dataclass
class CorrectionSettings:
    """How corrections supervise a run (prefixed, so they sit beside any method's settings)."""

    corrections_weight: float = setting(
        1.0, "Weight of the cross-entropy on corrected voxels.", min=0.0, max=100.0
    )
    corrections_dice_weight: float = setting(
        1.0, "Weight of the soft Dice loss on corrected voxels (0: cross-entropy only).", min=0.0
    )
    corrections_anchor_weight: float = setting(
        1.0,
        "Weight of the anchor: cross-entropy with the round's starting model on confident "
        "voxels far from every correction (0: no anchor).",
        min=0.0,
        max=100.0,
    )
    corrections_anchor_confidence: float = setting(
        0.9,
        "The anchor holds voxels where the starting model's top probability is at least this.",
        min=0.0,
        max=1.0,
    )
    corrections_anchor_margin: int = setting(
        12,
        "The anchor leaves free every voxel within this many voxels (model grid) of a "
        "corrected voxel.",
        min=0,
        max=256,
    )
    corrections_anchor_precision: float = setting(
        0.0,
        "The anchor holds only voxels of classes the starting model got right on the corrected "
        "voxels at least this often (its precision there; 0, the default: every class; 0.95 "
        "let a whole brain shrink when every corrected slice lay below it).",
        min=0.0,
        max=1.0,
    )
    corrections_parameters: str = setting(
        "auto",
        "Parameters the corrections train: auto (the model's trainable set, 'all'), or a group "
        "of the model (all, norm, early, first_blocks, every).",
    )
    corrections_learning_rate: float = setting(
        3e-4, "Adam learning rate of the correction step.", min=1e-7, max=1.0
    )
    corrections_crop: int = setting(
        0,
        "3D models: train on a window of this many voxels per axis (a multiple of 32) around a "
        "random corrected voxel instead of the whole input (0: whole input); faster per step, "
        "but only for networks whose answer on a window is that window of their answer: not "
        "those that normalise over the whole input (InstanceNorm, as deepbet).",
        min=0,
        max=1024,
    )


#: What :func:`resolve_correction_settings` takes from the caller.
CorrectionSettingsInput = CorrectionSettings | dict | list | tuple | None


def resolve_correction_settings(
    method: type, method_settings: Any, given: CorrectionSettingsInput, model: Any = None
) -> CorrectionSettings:
    """The correction step's settings for a run.

    A method that is the correction step (``needs_corrections``) holds them in its own settings.
    Otherwise: the defaults, then the model's ``recommended_settings("corrections")`` (only its
    ``corrections_*`` keys), then ``given`` (an instance, a dict or ``key=value`` strings).
    """
    from ..settings import apply_overrides

    if getattr(method, "needs_corrections", False):
        return method_settings
    if isinstance(given, CorrectionSettings):
        return given
    recommended = model.recommended_settings("corrections") if model is not None else {}
    names = set(correction_fields())
    settings = apply_overrides(
        CorrectionSettings(), {k: v for k, v in (recommended or {}).items() if k in names}
    )
    return apply_overrides(settings, list(given) if isinstance(given, tuple) else given)


def correction_fields() -> list[str]:
    """Names of the :class:`CorrectionSettings` fields."""
    return [f.name for f in dataclasses.fields(CorrectionSettings)]


def split_correction_settings(values: dict[str, Any]) -> tuple[CorrectionSettings, dict]:
    """``values`` -> (CorrectionSettings from the ``corrections_*`` keys, the other keys)."""
    names = set(correction_fields())
    mine = {k: v for k, v in values.items() if k in names}
    return CorrectionSettings(**mine), {k: v for k, v in values.items() if k not in names}


# -- losses ------------------------------------------------------------------------------------
def corrected_voxel_loss(
    logits: torch.Tensor, labels: torch.Tensor, dice_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """Cross-entropy and soft Dice loss on the corrected voxels (labels >= 0) only.

    Args:
        logits: (B, C, ...) network output.
        labels: (B, ...) long, :data:`NOT_CORRECTED` where the user did not correct.
        dice_weight: 0 skips the Dice term.
    Returns:
        ``{"corrections_ce": ..., "corrections_dice": ...}`` (zeros with a gradient when no
        voxel of the batch is corrected).
    """
    labels = labels.to(logits.device)
    corrected = labels != NOT_CORRECTED
    if not bool(corrected.any()):
        zero = logits.sum() * 0.0
        return {"corrections_ce": zero, "corrections_dice": zero}
    # only the corrected voxels, gathered (K, C): the same sums as over the whole masked
    # input, without its full-size temporaries (a few slices of a 256^3 input)
    picked = logits.movedim(1, -1)[corrected].float()
    truth = labels[corrected].long()
    terms = {"corrections_ce": F.cross_entropy(picked, truth)}
    if dice_weight > 0:
        probabilities = torch.softmax(picked, dim=1).T.unsqueeze(0)  # (1, C, K)
        terms["corrections_dice"] = soft_dice_loss(probabilities, truth.unsqueeze(0))
    return terms


def corrected_fit(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean foreground Dice of the prediction with the corrections, on corrected voxels only
    (None when the batch has none): how well the model reproduces what the user drew."""
    corrected = labels != NOT_CORRECTED
    if not bool(corrected.any()):
        return None
    predicted = logits.movedim(1, -1)[corrected].argmax(1)  # the corrected voxels only
    return mean_foreground_dice(predicted.cpu(), labels[corrected].cpu(), logits.shape[1])


def class_precision(corrections: torch.Tensor, probabilities: torch.Tensor) -> list[float | None]:
    """Per class: how often the starting model's label ``c`` is the user's on corrected voxels
    (None: the model predicts ``c`` on no corrected voxel)."""
    corrected = corrections != NOT_CORRECTED
    predicted = probabilities.movedim(1, -1)[corrected].argmax(dim=1)  # corrected voxels only
    truth = corrections[corrected]
    result: list[float | None] = []
    for label in range(probabilities.shape[1]):
        chosen = predicted == label
        count = int(chosen.sum())
        result.append(float((truth[chosen] == label).sum()) / count if count else None)
    return result


def rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[index]``, as a view when ``index`` is one run of consecutive rows (a 3D model's
    single input: no copy of a 256^3 volume per step), else a copy."""
    if len(index) and bool((index[1:] - index[:-1] == 1).all()):
        start = int(index[0])
        return tensor[start : start + len(index)]
    return tensor[index]


def anchor_region(
    corrections: torch.Tensor,
    probabilities: torch.Tensor,
    *,
    confidence: float,
    margin: int,
    valid: torch.Tensor | None = None,
    precision: float = 0.0,
) -> torch.Tensor:
    """(N, ...) boolean: voxels the anchor holds to the starting model.

    Confident (top probability >= ``confidence``), valid (not padding), more than ``margin``
    voxels (a box, along every axis of the stacked inputs: for 2D models the stack of slices is
    the volume) from every corrected voxel, and predicted as a class whose precision on the
    corrected voxels (:func:`class_precision`) is at least ``precision``: a model that is
    confidently wrong about one class (deepbet missing brain on a new contrast) is not held to
    that class where nobody corrected it.
    """
    top, labels = probabilities.max(dim=1)
    confident = top >= confidence
    if precision > 0:
        scores = class_precision(corrections, probabilities)
        trusted = torch.tensor([p is not None and p >= precision for p in scores])
        confident &= trusted[labels]
    corrected = (corrections != NOT_CORRECTED).numpy()
    if margin > 0 and corrected.any():
        near = maximum_filter(corrected, size=2 * margin + 1, mode="constant")
    else:
        near = corrected
    region = confident & ~torch.from_numpy(np.ascontiguousarray(near))
    if valid is not None:
        region &= valid.reshape(region.shape)
    return region


# -- the step ----------------------------------------------------------------------------------
def whole_input_norms(network: nn.Module) -> set[str]:
    """The network's normalisation kinds whose statistics come from each input as a whole
    (``instance``, ``group``): on such a network a window of the input does not give that window
    of the answer, so the correction step must not train on windows (``corrections_crop``)."""
    from ..core.models.scripted import norm_kinds

    return norm_kinds(network) & {"instance", "group"}


def _batchnorm_eval(network: nn.Module) -> None:
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class CorrectionStep:
    """One supervised update from the corrections, called by the engine after each method step.

    Built once per run from the context (which must hold corrections) and the settings.
    """

    def __init__(
        self,
        context: AdaptationContext,
        settings: CorrectionSettings,
        starting_probabilities: torch.Tensor | None = None,
    ):
        corrections = getattr(context, "corrections", None)
        if corrections is None:
            raise ValueError("no corrections given: correct at least one slice first")
        if not bool((corrections != NOT_CORRECTED).any()):
            raise ValueError("the corrections hold no corrected voxel")
        if settings.corrections_crop and whole_input_norms(context.model.network):
            raise ValueError(
                "corrections_crop must be 0 for this model: its "
                f"{'/'.join(sorted(whole_input_norms(context.model.network)))} normalisation "
                "works over the whole input, so a window gets another answer than the scan"
            )
        self.context, self.settings = context, settings
        self.corrections = corrections
        flat = (corrections != NOT_CORRECTED).reshape(corrections.shape[0], -1)
        self.corrected_items = torch.nonzero(flat.any(1)).flatten()
        valid = None if context.valid_mask is None else context.valid_mask[:, 0]
        starting = context.initial_probabilities
        self.starting = starting if starting_probabilities is None else starting_probabilities
        self.anchor = anchor_region(
            corrections,
            self.starting,
            confidence=settings.corrections_anchor_confidence,
            margin=settings.corrections_anchor_margin,
            valid=valid,
            precision=settings.corrections_anchor_precision,
        )
        self.precision = class_precision(corrections, self.starting)
        self.parameters = self._parameters()
        self.optimizer = torch.optim.Adam(self.parameters, lr=settings.corrections_learning_rate)
        self.last_fit: float | None = None  # Dice with the corrections on the latest batch

    def _parameters(self) -> list[nn.Parameter]:
        groups = self.context.model.parameter_groups()
        wanted = self.settings.corrections_parameters
        name = "all" if wanted == "auto" else wanted
        if name not in groups or not groups[name]:
            known = ", ".join(n for n, p in groups.items() if p)
            raise ValueError(f"corrections_parameters: this model has no {name!r}; it has {known}")
        return list(groups[name])

    def batch_index(self, engine_index: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Corrected items first (a random half of the batch at most), then the engine's."""
        corrected = self.corrected_items
        room = max(1, batch_size // 2) if len(engine_index) else batch_size
        if len(corrected) > room:
            pick = torch.randperm(len(corrected), generator=self.context.generator)[:room]
            corrected = corrected[pick]
        others = engine_index[~torch.isin(engine_index, corrected)]
        return torch.cat([corrected, others[: max(0, batch_size - len(corrected))]])

    def window(self, index: torch.Tensor) -> tuple[slice, ...]:
        """Where to cut the inputs of items ``index`` (batch, channel, spatial...): everything,
        or for 3D inputs with ``corrections_crop`` a window around a random corrected voxel of
        the first item (each side a multiple of 32, at most the input's size)."""
        full = (slice(None),) * self.context.target_inputs.dim()
        crop = self.settings.corrections_crop
        spatial = self.context.target_inputs.shape[2:]
        if not crop or len(spatial) != 3:
            return full
        voxels = torch.nonzero(self.corrections[index[0]] != NOT_CORRECTED)
        if not len(voxels):
            return full
        pick = int(torch.randint(len(voxels), (1,), generator=self.context.generator))
        window = [slice(None), slice(None)]
        for centre, size in zip(voxels[pick].tolist(), spatial):
            side = min(size, max(32, crop // 32 * 32))
            start = min(max(0, centre - side // 2), size - side)
            window.append(slice(start, start + side))
        return tuple(window)

    def losses(
        self, logits: torch.Tensor, index: torch.Tensor, window: tuple[slice, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        """The named loss terms of ``logits`` (the network's output on items ``index``, cut to
        ``window``: batch, channel, spatial slices)."""
        settings, device = self.settings, logits.device
        cut = (slice(None),) if window is None else window[:1] + window[2:]
        labels = rows(self.corrections, index)[cut].to(device)
        terms = corrected_voxel_loss(logits, labels, settings.corrections_dice_weight)
        terms["corrections_ce"] = terms["corrections_ce"] * settings.corrections_weight
        if settings.corrections_anchor_weight > 0:
            source = rows(self.starting, index)[window or ()].to(device)
            anchor = rows(self.anchor, index)[cut].to(device)
            terms["corrections_anchor"] = settings.corrections_anchor_weight * (
                soft_cross_entropy(logits, source, anchor)
            )
        if "corrections_dice" in terms:
            terms["corrections_dice"] = terms["corrections_dice"] * settings.corrections_dice_weight
        return terms

    def step(self, engine_index: torch.Tensor, batch_size: int) -> dict[str, float]:
        """One Adam step on the corrections; returns the step's losses (``corrections_*``)."""
        from .base import preserved_modes

        context = self.context
        index = self.batch_index(engine_index, batch_size)
        network = context.model.network
        requires = {parameter: parameter.requires_grad for parameter in network.parameters()}
        with preserved_modes(network):
            _batchnorm_eval(network)
            network.requires_grad_(False)  # gradients only where this step changes weights
            for parameter in self.parameters:
                parameter.requires_grad_(True)
            window = self.window(index)
            inputs = rows(context.target_inputs, index)[window].to(context.device)
            with context.autocast():
                logits = context.model.forward(inputs).logits
            terms = self.losses(logits, index, window)
            total = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            for parameter, flag in requires.items():
                parameter.requires_grad_(flag)
        labels = rows(self.corrections, index)[window[:1] + window[2:]].to(logits.device)
        self.last_fit = corrected_fit(logits.detach(), labels)
        values = {name: float(value.detach()) for name, value in terms.items()}
        return {"corrections_total": float(total.detach()), **values}

    def report(self) -> dict[str, Any]:
        """Facts for ``AdaptationResult.extra``."""
        corrected = int((self.corrections != NOT_CORRECTED).sum())
        return {
            "corrections": {
                "corrected_voxels_model_grid": corrected,
                "corrected_items": len(self.corrected_items),
                "anchor_voxels": int(self.anchor.sum()),
                "starting_model_precision_on_corrections": self.precision,
                "parameters": len(self.parameters),
                **dataclasses.asdict(self.settings),
            }
        }
