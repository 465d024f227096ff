"""The keep-or-roll-back gate: never leave the user worse off than the model they brought.

The collapse guard (:mod:`~napari_uda.adaptation.guard`) sees sudden collapse, not slow,
confident drift, and Dice can rise while a mask turns into nonsense (a brain mask painting the
whole head). At the end of a run (and after every round of corrections) the gate compares the
adapted and the unadapted (source) model on the target with signals that need no labels:

* **agreement under test-time augmentation**: Dice between a model's mask and its mask on the
  left-right mirrored input (mirrored back) and on slightly rescaled intensities;
* **agreement across dropout samples**, where the network has dropout;
* **ADIC** (agreement with dropout inferences calibrated by confidence, after TEGDA, Zhou et al.
  MICCAI 2025): that agreement times the mean confidence on the predicted foreground;
* **foreground volume** per class in ml against the expected range the model states or the
  user sets (:mod:`napari_uda.core.plausibility`), and its change from the source's;
* **how the mask changed** (:func:`mask_change`): the share of the foreground the source was
  sure of that the adapted mask drops, the sure background it adds, the two masks' agreement,
  and whether the scan's own intensities support the voxels that changed
  (:mod:`~napari_uda.adaptation.intensity`).

:func:`model_signals` measures one model (the source's can be measured once and reused across
rounds); :func:`mask_change` compares the two; :func:`decide` is the pure rule on them;
:func:`gate` does all three and :func:`predict_and_gate` predicts scans with both models first
(batch site models, *Apply to other scans*); :func:`apply_gate` gates a finished run, and
:func:`overrule_gate` gives the user the adapted result the gate rolled back. The
decision (:class:`GateDecision`) says which model to keep, why, and which loud warnings the
kept result carries (a volume outside its range, a large change of volume). Thresholds are
fields of :class:`GateOptions`; docs/reliability.md has the measured effect.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..core.device import autocast
from ..core.inference import Prediction, class_labels, normalized_entropy, predict_batches
from ..core.metrics import dice_from_counts
from ..core.models.adapter import ModelAdapter
from ..core.plausibility import (
    ExpectedVolumes,
    VolumeFlag,
    class_volumes,
    flag_lines,
    volume_flags,
)
from ..settings import check_value, describe, setting
from .base import preserved_modes
from .guard import confusion_in_pieces
from .intensity import intensity_support

#: The first reason of a decision made with the gate off (it keeps the adapted model anyway).
GATE_OFF = "gate off; it would have kept the unadapted model"

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class GateOptions:
    """How the gate measures and decides. Defaults measured in docs/reliability.md."""

    gate: bool = setting(
        True,
        "At the end of a run, compare the adapted and the unadapted model with label-free "
        "signals and keep the unadapted one when adaptation does not look better.",
    )
    off_reason: str = setting(
        GATE_OFF,
        "With the gate off, the first reason of its decision: why it only advised, in the "
        "user's words (a round with corrections says the corrections outrank it).",
        hidden=True,
    )
    flip: bool = setting(True, "Test-time augmentation: mirror the input left-right.")
    intensity_change: float = setting(
        0.1,
        "Test-time augmentation: scale the network input by 1 + this (0: off).",
        min=0.0,
        max=0.5,
    )
    dropout_samples: int = setting(
        2,
        "Forward passes with dropout on, where the network has dropout (0: off).",
        min=0,
        max=16,
    )
    max_inputs: int = setting(
        16,
        "Network inputs (slices or patches) the augmented and dropout passes use, those with "
        "the most foreground first (0: all).",
        min=0,
    )
    confident: float = setting(
        0.9,
        "A voxel where the unadapted model's probability is at least this counts as one it is "
        "sure of (for the share of its sure foreground the adapted mask drops).",
        min=0.5,
        max=1.0,
    )
    max_dropped: float = setting(
        0.1,
        "Roll back when the adapted mask drops more than this share of the foreground the "
        "unadapted model was sure of (probability at least `confident`).",
        min=0.0,
        max=1.0,
    )
    min_intensity_support: float = setting(
        0.3,
        "Roll back when the scan's intensities do not support how the mask changed: the mean "
        "log-likelihood ratio (nats) of the changed voxels under the intensities of the "
        "agreed foreground against the agreed background, counted for added voxels and "
        "against dropped ones, is below this (a mask sliding sideways scores about 0; "
        "-10: off).",
        min=-10.0,
        max=10.0,
    )
    consistency_tolerance: float = setting(
        0.005,
        "Roll back when the adapted model's agreement under test-time augmentation (Dice of "
        "its mask with its mask on the mirrored and rescaled input) is lower than the "
        "unadapted model's by more than this.",
        min=0.0,
        max=1.0,
    )
    min_agreement_gain: float = setting(
        0.005,
        "Keep the adapted model only when it looks better: its agreement under test-time "
        "augmentation higher than the unadapted model's by at least this, or a class brought "
        "into its expected range (0: not worse is enough).",
        min=0.0,
        max=1.0,
    )
    max_volume_change: float = setting(
        3.0,
        "Roll back when adaptation changes a class's volume by more than this factor (3.0: "
        "more than four times or less than a quarter: a mask painting the whole head), unless "
        "it brings the class into its expected range.",
        min=0.05,
        max=100.0,
    )
    warn_agreement_below: float = setting(
        0.93,
        "Warn when the kept model's agreement under test-time augmentation is below this: "
        "a mask that changes when the scan is mirrored or rescaled needs checking.",
        min=0.0,
        max=1.0,
    )
    warn_mask_agreement_below: float = setting(
        0.9,
        "Warn when the kept adapted mask agrees with the unadapted model's less than this "
        "(foreground Dice): adaptation moved the mask, even where the volume stayed, so the "
        "user checks it.",
        min=0.0,
        max=1.0,
    )
    warn_volume_change: float = setting(
        0.25,
        "Warn when adaptation changes a class's volume by more than this fraction either way "
        "(0.25: by more than 25 %), so that the user checks the mask.",
        min=0.0,
        max=100.0,
    )

    def __post_init__(self):
        for spec in describe(type(self)):
            check_value(spec, getattr(self, spec.name))


@dataclass
class ModelSignals:
    """Label-free signals of one model on the target (model grid; foreground Dice averages
    over the foreground classes)."""

    tta_agreement: float | None
    dropout_agreement: float | None
    confidence: float
    adic: float
    mean_entropy: float
    foreground_fraction: list[float]
    seconds: float = 0.0

    @property
    def agreement(self) -> float:
        """The agreement the gate decides on: under test-time augmentation, else across
        dropout samples (1.0 when neither was measured). Dropout agreement and ADIC are
        recorded but do not decide: on the gate benchmark both rose for runs that lost Dice
        (an entropy-minimised model is confident and stable under dropout while wrong)."""
        for value in (self.tta_agreement, self.dropout_agreement):
            if value is not None:
                return float(value)
        return 1.0


@dataclass
class ChangeSignals:
    """How the adapted model's mask differs from the unadapted (source) model's, label-free.

    Attributes:
        agreement: foreground Dice between the two masks (mean over foreground classes).
        confident_agreement: the same, on the voxels where the source model is confident.
        dropped: share of the source's confident foreground that the adapted mask labels
            otherwise (a model that forgets what the source was sure of).
        added: adapted foreground where the source was confidently background, per voxel of
            the source's foreground (a mask growing where the source was sure there is none).
        volume_ratio: adapted foreground voxels over the source's.
        entropy_change: mean normalised entropy, adapted minus source.
        intensity_support: how much the scan's intensities support the changed voxels
            (:func:`~napari_uda.adaptation.intensity.intensity_support`, nats); None when not
            measured (no inputs given) or nothing changed.
    """

    agreement: float
    confident_agreement: float
    dropped: float
    added: float
    volume_ratio: float
    entropy_change: float
    intensity_support: float | None = None


@dataclass
class GateDecision:
    """What the gate decided, and why.

    Attributes:
        keep: ``"adapted"`` or ``"source"`` (the unadapted model).
        reasons: why, one short phrase each.
        warnings: loud lines about the kept result (implausible volume, large volume change).
        source / adapted: each model's signals.
        change: how the adapted mask differs from the source's (:func:`mask_change`).
        volumes_ml: per target volume, {"source": {class: ml}, "adapted": {class: ml}}.
        expected_ml: the expected ranges used (class -> [low, high]).
        flags: volume flags of the kept result (class, volume, range).
        seconds: wall time of the gate (signals and decision).
        adapted_warnings: on a roll-back, the loud lines the adapted mask would carry (shown
            if the user keeps it anyway: :func:`overrule_gate`).
        overruled: the gate rolled back, and the user kept the adapted model anyway.
    """

    keep: Literal["adapted", "source"]
    reasons: list[str]
    warnings: list[str]
    source: ModelSignals
    adapted: ModelSignals
    volumes_ml: list[dict[str, dict[str, float]]]
    change: ChangeSignals | None = None
    expected_ml: dict[str, list[float]] = field(default_factory=dict)
    flags: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    adapted_warnings: list[str] = field(default_factory=list)
    overruled: bool = False

    @property
    def rolled_back(self) -> bool:
        return self.keep == "source"

    @property
    def summary(self) -> str:
        """One line for a status bar, the CLI and the report."""
        if self.overruled:
            return (
                "the user kept the adapted model against the gate's advice (the gate would "
                f"have kept the unadapted model: {'; '.join(self.reasons)})"
            )
        if self.rolled_back:
            line = "kept the unadapted model: adaptation did not look better"
        else:
            line = "kept the adapted model"
        return f"{line} ({'; '.join(self.reasons)})" if self.reasons else line

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(summary=self.summary, rolled_back=self.rolled_back)
        return record


# -- measuring one model -----------------------------------------------------------------------
def left_right_dim(prepared) -> int | None:
    """The dimension of the network inputs (N, C, ...) that runs left-right, or None when the
    inputs have none (sagittal slices)."""
    if hasattr(prepared, "left_right_dim"):  # prepared volumes that know it (nnU-Net, MONAI)
        return prepared.left_right_dim
    tiling = getattr(prepared, "tiling", None)
    if tiling is None:  # PreparedVolume: slices along a canonical (RAS) axis
        return None if prepared.slice_axis == 0 else 2
    network_axis = int(prepared.grid.orientation[0, 0])
    axis = getattr(tiling, "axis", None)
    if tiling.spatial_dims == 3 or axis is None:
        return 2 + network_axis
    if network_axis == axis:
        return None
    return 2 + [a for a in range(3) if a != axis].index(network_axis)


def _foreground_dice(labels: torch.Tensor, other: torch.Tensor, valid, num_classes: int) -> float:
    """Mean foreground Dice of two label arrays over the ``valid`` voxels (None: all)."""
    counts = confusion_in_pieces(labels, other, valid, num_classes)
    scores = dice_from_counts(counts.numpy())[1:]
    return float(np.mean(scores)) if scores else 1.0


def _chosen_inputs(probabilities: Sequence[torch.Tensor], limit: int) -> torch.Tensor:
    """Indices of the ``limit`` inputs with the most foreground in any of ``probabilities``."""
    count = probabilities[0].shape[0]
    if limit <= 0 or count <= limit:
        return torch.arange(count)
    foreground = sum((class_labels(p) > 0).flatten(1).sum(1) for p in probabilities)
    return torch.sort(torch.argsort(foreground, descending=True)[:limit]).values


@torch.no_grad()
def _dropout_probabilities(
    model: ModelAdapter, inputs: torch.Tensor, device, batch_size: int
) -> torch.Tensor:
    """Softmax with only the dropout layers in training mode (normalisation stays in eval)."""
    network = model.network
    with preserved_modes(network):
        network.eval().to(device)
        for module in network.modules():
            if isinstance(module, DROPOUT_TYPES):
                module.train()
        outputs = []
        for start in range(0, inputs.shape[0], batch_size):
            with autocast(device):
                logits = model.forward(inputs[start : start + batch_size].to(device)).logits
            outputs.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(outputs)


def has_dropout(model: ModelAdapter) -> bool:
    return any(isinstance(m, DROPOUT_TYPES) and m.p > 0 for m in model.network.modules())


def model_signals(
    model: ModelAdapter,
    inputs: torch.Tensor,
    probabilities: torch.Tensor,
    *,
    chosen: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    lr_dim: int | None = None,
    options: GateOptions | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    seed: int = 0,
) -> ModelSignals:
    """Label-free signals of ``model`` on ``inputs`` (N, C_in, ...), whose no-grad
    ``probabilities`` (N, C, ...) are given. ``chosen`` selects the inputs the augmented and
    dropout passes use (default: all); ``valid`` (N, ...) masks out padding; ``lr_dim`` is the
    left-right dimension (:func:`left_right_dim`; None: no mirroring). Dropout sampling is
    seeded with ``seed`` without touching torch's global random state."""
    options = options or GateOptions()
    device = torch.device(device)
    started = time.perf_counter()
    num_classes = probabilities.shape[1]
    chosen = torch.arange(inputs.shape[0]) if chosen is None else chosen
    part_inputs, part_probs = inputs[chosen], probabilities[chosen]
    part_valid = None if valid is None else valid[chosen]
    labels = class_labels(part_probs)
    run = {"device": device, "batch_size": batch_size}

    tta = []
    if options.flip and lr_dim is not None:
        flipped = predict_batches(model, part_inputs.flip(lr_dim), **run).flip(lr_dim)
        tta.append(_foreground_dice(labels, class_labels(flipped), part_valid, num_classes))
    if options.intensity_change > 0:
        scaled = predict_batches(model, part_inputs * (1.0 + options.intensity_change), **run)
        tta.append(_foreground_dice(labels, class_labels(scaled), part_valid, num_classes))
    dropout = []
    if options.dropout_samples and has_dropout(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(options.dropout_samples):
                sample = _dropout_probabilities(model, part_inputs, device, batch_size)
                dropout.append(
                    _foreground_dice(labels, class_labels(sample), part_valid, num_classes)
                )

    confidence_map = part_probs.max(1).values
    foreground = labels > 0
    if part_valid is not None:
        foreground &= part_valid
    confidence = float(confidence_map[foreground].mean()) if bool(foreground.any()) else 1.0
    tta_agreement = float(np.mean(tta)) if tta else None
    dropout_agreement = float(np.mean(dropout)) if dropout else None
    agreement = dropout_agreement if dropout_agreement is not None else tta_agreement
    all_labels = class_labels(probabilities)
    where = valid if valid is not None else torch.ones_like(all_labels, dtype=torch.bool)
    counts = torch.bincount(all_labels[where].flatten(), minlength=num_classes).double()
    entropy = normalized_entropy(probabilities, axis=1)
    return ModelSignals(
        tta_agreement=tta_agreement,
        dropout_agreement=dropout_agreement,
        confidence=confidence,
        adic=(agreement if agreement is not None else 1.0) * confidence,
        mean_entropy=float(entropy[where].mean()) if bool(where.any()) else 0.0,
        foreground_fraction=[float(c) / max(float(counts.sum()), 1.0) for c in counts],
        seconds=time.perf_counter() - started,
    )


# -- comparing the two masks -------------------------------------------------------------------
def mask_change(
    source_probabilities: torch.Tensor | np.ndarray,
    adapted_probabilities: torch.Tensor | np.ndarray,
    valid: torch.Tensor | np.ndarray | None = None,
    *,
    confident: float = 0.9,
    class_axis: int = 1,
    inputs: torch.Tensor | None = None,
) -> ChangeSignals:
    """Compare two models' softmax outputs of the same inputs (class axis ``class_axis``:
    1 for stacked network inputs (N, C, ...), 0 for a volume's (C, X, Y, Z)). ``valid`` masks
    out padding; ``confident``: a source probability at least this counts as sure.
    ``inputs``: the network inputs, laid out as the probabilities with input channels for
    classes, for the intensity support of the change (not measured without them)."""
    if class_axis not in (0, 1):
        raise ValueError(f"class_axis must be 0 or 1, not {class_axis}")
    source, adapted = (
        torch.as_tensor(p).float().unsqueeze(0) if class_axis == 0 else torch.as_tensor(p).float()
        for p in (source_probabilities, adapted_probabilities)
    )
    num_classes = source.shape[1]
    where = torch.ones(source.shape[:1] + source.shape[2:], dtype=torch.bool)
    if valid is not None:
        where = torch.as_tensor(valid).reshape(where.shape).bool()
    source_conf, source_labels = source.max(1)
    adapted_labels = class_labels(adapted)
    sure = (source_conf >= confident) & where
    source_fg, adapted_fg = (source_labels > 0) & where, (adapted_labels > 0) & where
    sure_fg, sure_bg = sure & source_fg, sure & ~source_fg
    fg_count = max(int(source_fg.sum()), 1)
    return ChangeSignals(
        agreement=_foreground_dice(source_labels, adapted_labels, where, num_classes),
        confident_agreement=_foreground_dice(source_labels, adapted_labels, sure, num_classes),
        dropped=float((adapted_labels[sure_fg] != source_labels[sure_fg]).float().mean())
        if bool(sure_fg.any())
        else 0.0,
        added=float((adapted_fg & sure_bg).sum()) / fg_count,
        volume_ratio=float(adapted_fg.sum()) / fg_count,
        entropy_change=float(
            normalized_entropy(adapted, axis=1)[where].mean()
            - normalized_entropy(source, axis=1)[where].mean()
        )
        if bool(where.any())
        else 0.0,
        intensity_support=None
        if inputs is None
        else intensity_support(
            torch.as_tensor(inputs).unsqueeze(0) if class_axis == 0 else torch.as_tensor(inputs),
            source_fg,
            adapted_fg,
            where,
        ),
    )


# -- deciding ----------------------------------------------------------------------------------
def _volume_changes(
    volumes: Sequence[Mapping[str, Mapping[str, float]]], limit: float
) -> list[tuple[str, float, float]]:
    """(class, source ml, adapted ml) where the volume changed by more than the factor
    ``1 + limit`` either way (``limit`` 0.25: above 125 % or below 80 %)."""
    changed = []
    for per_volume in volumes:
        for name, before in per_volume["source"].items():
            after = per_volume["adapted"].get(name, 0.0)
            low, high = sorted((max(before, 1e-3), max(after, 1e-3)))
            if high / low > 1.0 + limit:
                changed.append((name, before, after))
    return changed


def _flags(volumes, expected, stage: str) -> list[VolumeFlag]:
    return [f for v in volumes for f in volume_flags(v[stage], expected)]


def _roll_back_reasons(
    source: ModelSignals,
    adapted: ModelSignals,
    change: ChangeSignals | None,
    volumes_ml: Sequence[Mapping[str, Mapping[str, float]]],
    flags: tuple[list[VolumeFlag], list[VolumeFlag]],
    options: GateOptions,
) -> list[str]:
    """Why the adapted model looks worse than the source (empty: it does not)."""
    source_flags, adapted_flags = flags
    reasons: list[str] = []
    new_flags = {f.class_name for f in adapted_flags} - {f.class_name for f in source_flags}
    fixed = {f.class_name for f in source_flags} - {f.class_name for f in adapted_flags}
    if new_flags:
        reasons.append(
            "adapted volume outside the expected range: "
            + "; ".join(f.message for f in adapted_flags if f.class_name in new_flags)
        )
    changes = _volume_changes(volumes_ml, options.max_volume_change)
    unsupported = [c for c in changes if c[0] not in fixed]
    if unsupported:
        reasons.append(
            "volume changed too much: "
            + "; ".join(f"{n} {a:.0f} -> {b:.0f} ml" for n, a, b in unsupported)
        )
    if change is not None and change.dropped > options.max_dropped and not fixed:
        reasons.append(
            f"dropped {change.dropped:.0%} of the foreground the unadapted model was sure of"
        )
    support = None if change is None else change.intensity_support
    if support is not None and support < options.min_intensity_support:
        reasons.append(
            f"the scan's intensities do not support the change (support {support:+.2f} < "
            f"{options.min_intensity_support:g}): the mask moved into voxels that look like "
            "background or out of voxels that look like foreground"
        )
    gain = adapted.agreement - source.agreement
    if -gain > options.consistency_tolerance:
        reasons.append(
            f"less consistent under test-time augmentation ({source.agreement:.3f} -> "
            f"{adapted.agreement:.3f})"
        )
    elif options.min_agreement_gain > 0 and gain < options.min_agreement_gain and not fixed:
        reasons.append(
            f"not more consistent under test-time augmentation ({source.agreement:.3f} -> "
            f"{adapted.agreement:.3f}; keeping it needs +{options.min_agreement_gain:g} or a "
            "volume brought into its expected range)"
        )
    return reasons


def _warnings(
    kept: ModelSignals,
    kept_flags: list[VolumeFlag],
    change: ChangeSignals | None,
    volumes_ml: Sequence[Mapping[str, Mapping[str, float]]],
    options: GateOptions,
) -> list[str]:
    """The loud lines about the kept adapted model's mask (kept_flags: its volume flags)."""
    warnings = flag_lines(kept_flags, "the kept mask")
    if kept.agreement < options.warn_agreement_below:
        warnings.append(
            f"the kept model is unsure of this scan: its mask agrees with itself under "
            f"test-time augmentation only {kept.agreement:.2f} (Dice); check the mask"
        )
    warnings += [
        f"adaptation changed {n} from {a:.0f} to {b:.0f} ml ({(b - a) / max(a, 1e-3):+.0%}); "
        "check the mask"
        for n, a, b in _volume_changes(volumes_ml, options.warn_volume_change)
    ]
    if change is not None and change.agreement < options.warn_mask_agreement_below:
        warnings.append(
            f"adaptation moved the mask: it agrees only {change.agreement:.2f} (Dice) with the "
            "unadapted model's; check the mask"
        )
    return warnings


def decide(
    source: ModelSignals,
    adapted: ModelSignals,
    volumes_ml: Sequence[Mapping[str, Mapping[str, float]]],
    expected: ExpectedVolumes | None = None,
    options: GateOptions | None = None,
    change: ChangeSignals | None = None,
) -> GateDecision:
    """Keep the adapted model only when it looks better than the source and not worse.

    Any of these rolls back: (1) a class outside its expected range after adaptation but
    inside before; (2) a volume change beyond ``max_volume_change``, unless it brings an
    out-of-range class into its range; (3) the adapted mask dropping more than
    ``max_dropped`` of the foreground the source was sure of (``change``,
    :func:`mask_change`; the same exception); (4) a change the scan's intensities do not
    support (``change.intensity_support`` below ``min_intensity_support``; no exception);
    (5) agreement under test-time augmentation lower than the source's by more than
    ``consistency_tolerance`` (:attr:`ModelSignals.agreement`); (6) no sign that it is
    better: agreement up by less than ``min_agreement_gain`` and no class brought into its
    expected range. ``volumes_ml`` holds, per target volume, ``{"source": {class: ml},
    "adapted": {class: ml}}``. The kept mask's warnings: a volume outside its range, an
    unsure model, and (when the adapted model is kept) a large change of volume or of the
    mask itself.
    """
    options = options or GateOptions()
    expected = dict(expected or {})
    flags = tuple(_flags(volumes_ml, expected, stage) for stage in ("source", "adapted"))
    reasons = _roll_back_reasons(source, adapted, change, volumes_ml, flags, options)
    keep: Literal["adapted", "source"] = "source" if reasons else "adapted"
    if reasons and not options.gate:
        keep = "adapted"
        reasons.insert(0, options.off_reason)
    elif not reasons:
        reasons.append(
            f"agreement {source.agreement:.3f} -> {adapted.agreement:.3f}, "
            f"ADIC {source.adic:.3f} -> {adapted.adic:.3f}"
        )
        fixed = {f.class_name for f in flags[0]} - {f.class_name for f in flags[1]}
        if fixed:
            reasons.append(f"brings {', '.join(sorted(fixed))} into the expected range")
    adapted_warnings = _warnings(adapted, flags[1], change, volumes_ml, options)
    if keep == "source":
        kept_flags = flags[0]
        warnings = _warnings(source, kept_flags, None, [], options)
    else:
        kept_flags, warnings, adapted_warnings = flags[1], adapted_warnings, []
    return GateDecision(
        keep=keep,
        reasons=reasons,
        warnings=warnings,
        source=source,
        adapted=adapted,
        volumes_ml=[{k: dict(v) for k, v in per.items()} for per in volumes_ml],
        change=change,
        expected_ml={k: list(v) for k, v in expected.items()},
        flags=[asdict(f) for f in kept_flags],
        adapted_warnings=adapted_warnings,
    )


def gate(
    source_model: ModelAdapter,
    adapted_model: ModelAdapter,
    inputs: torch.Tensor,
    source_probabilities: torch.Tensor,
    adapted_probabilities: torch.Tensor,
    volumes_ml: Sequence[Mapping[str, Mapping[str, float]]],
    *,
    expected: ExpectedVolumes | None = None,
    valid: torch.Tensor | None = None,
    lr_dim: int | None = None,
    options: GateOptions | None = None,
    device: torch.device | str = "cpu",
    source_signals: ModelSignals | None = None,
    seed: int = 0,
) -> GateDecision:
    """Measure both models (the source's signals may be passed in, measured once) and
    :func:`decide`. Both models' networks are left in their modes and on their devices.

    Args:
        source_model / adapted_model: the unadapted and the adapted model.
        inputs: (N, C_in, ...) prepared target inputs (as the engine stacks them).
        source_probabilities / adapted_probabilities: their (N, C, ...) no-grad softmax.
        volumes_ml: per target volume, {"source": {class: ml}, "adapted": {class: ml}}, on
            the scan's grid.
        expected: class -> (low, high) ml (the model's ranges merged with the user's).
        valid: (N, ...) boolean, False on padding. lr_dim: see :func:`left_right_dim`.
    """
    options = options or GateOptions()
    started = time.perf_counter()
    chosen = _chosen_inputs([source_probabilities, adapted_probabilities], options.max_inputs)
    common = dict(chosen=chosen, valid=valid, lr_dim=lr_dim, options=options, device=device)
    if source_signals is None:
        source_signals = model_signals(
            source_model, inputs, source_probabilities, seed=seed, **common
        )
    adapted_signals = model_signals(
        adapted_model, inputs, adapted_probabilities, seed=seed, **common
    )
    change = mask_change(
        source_probabilities,
        adapted_probabilities,
        valid,
        confident=options.confident,
        inputs=inputs,
    )
    decision = decide(source_signals, adapted_signals, volumes_ml, expected, options, change)
    decision.seconds = time.perf_counter() - started
    return decision


# -- predicting and gating ---------------------------------------------------------------------
def class_volumes_of(
    before: Sequence[Prediction], after: Sequence[Prediction], class_names: Sequence[str]
) -> list[dict[str, dict[str, float]]]:
    """The gate's ``volumes_ml``: per volume, each model's volume per class on the scan grid."""
    return [
        {
            "source": class_volumes(b.labels, b.source.spacing, list(class_names)),
            "adapted": class_volumes(a.labels, a.source.spacing, list(class_names)),
        }
        for b, a in zip(before, after)
    ]


@dataclass
class GatedPredictions:
    """Both models' predictions of some volumes and the gate's decision on them."""

    before: list[Prediction]
    after: list[Prediction]
    decision: GateDecision

    @property
    def kept(self) -> list[Prediction]:
        """The predictions of the model the gate keeps."""
        return self.before if self.decision.rolled_back else self.after


def predict_and_gate(
    source_model: ModelAdapter,
    adapted_model: ModelAdapter,
    volumes: Sequence,
    *,
    expected: ExpectedVolumes | None = None,
    options: GateOptions | None = None,
    device: torch.device | str = "cpu",
    source_signals: ModelSignals | None = None,
    seed: int = 0,
) -> GatedPredictions:
    """Predict ``volumes`` with both models (each once, on the model grid) and :func:`gate`
    them: what a finished run without its inputs, a batch's site model on a scan and *Apply to
    other scans* use."""
    from .targets import TargetSet

    targets = TargetSet.prepare(source_model, list(volumes))
    run = {"device": device, "batch_size": 16}
    source_probabilities = predict_batches(source_model, targets.inputs, **run)
    adapted_probabilities = predict_batches(adapted_model, targets.inputs, **run)
    before = targets.predictions(source_probabilities)
    after = targets.predictions(adapted_probabilities)
    decision = gate(
        source_model,
        adapted_model,
        targets.inputs,
        source_probabilities,
        adapted_probabilities,
        class_volumes_of(before, after, source_model.class_names),
        expected=expected,
        valid=None if targets.valid_mask is None else targets.valid,
        lr_dim=left_right_dim(targets.prepared[0]),
        options=options,
        device=device,
        source_signals=source_signals,
        seed=seed,
    )
    return GatedPredictions(before, after, decision)


# -- on a finished run -------------------------------------------------------------------------
def apply_gate(
    result,
    source_model: ModelAdapter,
    volumes: Sequence | None = None,
    *,
    expected: ExpectedVolumes | None = None,
    options: GateOptions | None = None,
    device: torch.device | str = "cpu",
    inputs: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    source_probabilities: torch.Tensor | None = None,
    adapted_probabilities: torch.Tensor | None = None,
    lr_dim: int | None = None,
    source_signals: ModelSignals | None = None,
    seed: int = 0,
) -> GateDecision:
    """Gate a finished :class:`~napari_uda.adaptation.events.AdaptationResult` in place.

    The engine passes what it already has (stacked ``inputs``, ``valid``, both models'
    probabilities, ``lr_dim``); any other caller (a round of corrections, a batch) may pass
    only the target ``volumes`` and both models predict them here (:func:`predict_and_gate`).
    The decision goes to ``result.gate`` and ``result.extra["gate"]``; when it keeps the
    source, the result's model becomes a copy of ``source_model`` and its predictions,
    checkpoint and reference Dice the unadapted ones, with the reason; the adapted ones go to
    ``result.rolled_back`` (:class:`RolledBack`), for the user to overrule the gate
    (:func:`overrule_gate`).
    """
    common = dict(
        expected=expected, options=options, device=device, source_signals=source_signals, seed=seed
    )
    if inputs is None:
        decision = predict_and_gate(source_model, result.model, volumes, **common).decision
    else:
        run = {"device": device, "batch_size": 16}
        if source_probabilities is None:
            source_probabilities = predict_batches(source_model, inputs, **run)
        if adapted_probabilities is None:
            adapted_probabilities = predict_batches(result.model, inputs, **run)
        volumes_ml = class_volumes_of(
            result.initial_predictions or [result.initial_prediction],
            result.predictions or [result.prediction],
            source_model.class_names,
        )
        decision = gate(
            source_model,
            result.model,
            inputs,
            source_probabilities,
            adapted_probabilities,
            volumes_ml,
            valid=valid,
            lr_dim=lr_dim,
            **common,
        )
    if decision.rolled_back:
        _roll_back(result, source_model, decision)
    result.gate = decision
    result.extra["gate"] = decision.to_dict()
    return decision


@dataclass
class RolledBack:
    """What the gate rolled back on a result, kept so that the user can take it anyway
    (:func:`overrule_gate`): the adapted model (on the CPU), its predictions, checkpoint and
    reference Dice. It is one more model and one more set of predictions in memory: drop it
    (``result.rolled_back = None``) when the user moves on (a new run or round)."""

    model: ModelAdapter
    prediction: Prediction
    predictions: list[Prediction]
    checkpoint: Any  # events.CheckpointChoice
    reference_dice_after: list[float] | None


def _roll_back(result, source_model: ModelAdapter, decision: GateDecision) -> None:
    from .events import CheckpointChoice

    result.rolled_back = RolledBack(
        result.model,
        result.prediction,
        list(result.predictions),
        result.checkpoint,
        result.reference_dice_after,
    )
    model = source_model.clone()
    model.network.requires_grad_(True)  # as an adapted model (a later round may train it)
    model.network.eval().to("cpu")
    result.model = model
    result.prediction = result.initial_prediction
    result.predictions = list(result.initial_predictions)
    result.reference_dice_after = result.reference_dice_before
    result.checkpoint = CheckpointChoice(0, f"the unadapted model ({decision.summary})", None)


def overrule_gate(result) -> GateDecision:
    """Keep the adapted result the gate rolled back, as the user decided against its advice.

    The result's model, predictions, checkpoint and reference Dice become the adapted ones
    again (``result.rolled_back``, which is then emptied); the decision
    (``result.gate`` and ``result.extra["gate"]``) says the user overruled it, keeps the
    gate's reasons, and carries the adapted mask's loud lines and volume flags.

    Raises:
        ValueError: nothing was rolled back (the gate kept the adapted model, the run was
            not gated, or what was rolled back has been dropped).
    """
    kept, decision = getattr(result, "rolled_back", None), result.gate
    if kept is None or decision is None or not decision.rolled_back:
        raise ValueError(
            "There is no rolled-back result to keep: the gate did not roll this run back, "
            "or a newer run or round replaced it."
        )
    result.model, result.checkpoint = kept.model, kept.checkpoint
    result.prediction, result.predictions = kept.prediction, list(kept.predictions)
    result.reference_dice_after = kept.reference_dice_after
    result.rolled_back = None
    adapted_flags = _flags(decision.volumes_ml, decision.expected_ml, "adapted")
    decision = replace(
        decision,
        keep="adapted",
        overruled=True,
        warnings=list(decision.adapted_warnings),
        adapted_warnings=[],
        flags=[asdict(f) for f in adapted_flags],
    )
    result.gate = decision
    result.extra["gate"] = decision.to_dict()
    return decision
