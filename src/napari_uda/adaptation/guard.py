"""The collapse guard: label-free signals of an evaluation and the rules that call a run
collapsed (foreground vanishing, exploding or drifting slowly away from the start and the
prior, entropy collapse, the method's smoothed agreement falling below its early level).

The engine (:mod:`napari_uda.adaptation.engine`) evaluates the adapted model and hands the
signals to a :class:`~napari_uda.adaptation.checkpoints.CheckpointKeeper`, which asks
:class:`CollapseGuard` for reasons and keeps a healthy checkpoint. The thresholds and the
checkpoint policy are :class:`GuardOptions` (which
:class:`~napari_uda.adaptation.engine.EngineOptions` extends).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..core.inference import class_labels, normalized_entropy
from ..core.metrics import dice_from_counts
from ..settings import check_value, describe, setting
from .base import fraction_setting


@dataclass
class GuardOptions:
    """The collapse guard's rules and thresholds and the checkpoint policy (label-free).

    Defaults suit one-shot adaptation; docs/methods.md lists them with their help.
    """

    collapse_guard: bool = setting(
        True,
        "Watch the label-free signals for collapse (vanish, explode, drift, entropy, agreement "
        "rules) and keep a healthy checkpoint.",
    )
    stop_on_collapse: bool = setting(True, "End the run as soon as collapse is detected.")
    checkpoint_policy: Literal["last_healthy", "lowest_entropy"] = setting(
        "last_healthy",
        "Which healthy evaluation to keep: the latest one (after a collapse, the latest whose "
        "drift stayed within half drift_tolerance: the onset of the drift), or the one with "
        "the lowest mean entropy.",
    )
    foreground_vanish_ratio: float = fraction_setting(
        0.2,
        "Vanish: collapse when a foreground class's predicted fraction falls below this times "
        "the smaller of its fraction at the start and its source prior.",
    )
    foreground_explode_ratio: float = setting(
        3.0,
        "Explode: collapse when a foreground class's predicted fraction exceeds this times the "
        "larger of its fraction at the start, its source prior and min_reference_fraction.",
        min=1.0,
    )
    min_reference_fraction: float = fraction_setting(
        0.01,
        "Floor of the reference fraction in the explosion and drift tests (classes smaller "
        "than this are not tested for a downward drift).",
    )
    drift_tolerance: float = setting(
        0.1,
        "Drift (slow, cumulative): after the first epoch, collapse when a foreground class's "
        "fraction lies more than this (relative: 0.1 = 10 % above the top or below the "
        "bottom) outside the range of its fraction at the start, its source prior and its "
        "fractions during the first epoch (0: off).",
        min=0.0,
        max=10.0,
    )
    entropy_collapse_ratio: float = fraction_setting(
        0.05, "Entropy collapse: mean entropy below this times its value at the start ..."
    )
    entropy_collapse_agreement: float = fraction_setting(
        0.3, "... together with a Dice between the current and the initial segmentation below this."
    )
    agreement_smoothing: int = setting(
        3,
        "Epochs averaged into the smoothed agreement: the mean of the method's per-step "
        "agreement Dice over the last this many epochs' steps (independent of evaluate_every).",
        min=1,
        max=100,
    )
    agreement_drop_ratio: float = fraction_setting(
        0.5,
        "Agreement: collapse when the method's smoothed agreement Dice falls below this times "
        "its early level (its mean over the first epoch's steps; 0: off).",
    )

    def __post_init__(self):
        for spec in describe(type(self)):
            check_value(spec, getattr(self, spec.name))


@dataclass
class Signals:
    """Label-free signals of one evaluation (and reference Dice for QA)."""

    mean_entropy: float
    foreground_fraction: list[float]
    change_since_start: float
    dice_with_start: float
    reference_dice: list[float] | None = None


#: Voxels whose signals are computed at a time: the temporaries (labels, entropy, codes) stay
#: a few megabytes instead of several copies of a whole 256^3 prediction.
SIGNAL_CHUNK_VOXELS = 1 << 20


def _pieces(rows: int, voxels: int, chunk: int) -> Iterator[tuple[slice, slice]]:
    """(rows, voxels) slices covering an (N, V) array in pieces of about ``chunk`` voxels:
    groups of whole rows when rows are small (2D slices), parts of a row when they are large
    (a whole 3D volume)."""
    if voxels >= chunk:
        for row in range(rows):
            for start in range(0, voxels, chunk):
                yield slice(row, row + 1), slice(start, min(start + chunk, voxels))
        return
    group = max(1, chunk // max(voxels, 1))
    for start in range(0, rows, group):
        yield slice(start, min(start + group, rows)), slice(0, voxels)


def _pair_counts(labels, other, valid, num_classes: int) -> torch.Tensor:
    """(C, C) counts of valid voxels with class ``p`` in ``labels`` and ``r`` in ``other``
    (voxels where ``other`` is not a class are left out)."""
    other = other.to(torch.int64)
    valid = valid & (other >= 0) & (other < num_classes)
    code = labels.to(torch.int64) * num_classes + other
    code = torch.where(valid, code, num_classes * num_classes)  # left out: an extra bin
    counts = torch.bincount(code.reshape(-1), minlength=num_classes * num_classes + 1)
    return counts[: num_classes * num_classes].reshape(num_classes, num_classes)


def confusion_in_pieces(
    labels: torch.Tensor,
    other: torch.Tensor,
    valid: torch.Tensor | None,
    num_classes: int,
    chunk: int = SIGNAL_CHUNK_VOXELS,
) -> torch.Tensor:
    """(C, C) counts of class pairs (``labels``, ``other``) over the ``valid`` voxels (None:
    all) of two (N, ...) label arrays, summed over pieces of ``chunk`` voxels (default
    :data:`SIGNAL_CHUNK_VOXELS`), so no full-size index or copy is made."""
    rows = labels.shape[0]
    labels, other = labels.reshape(rows, -1), other.reshape(rows, -1)
    valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid
    valid = valid.reshape(rows, -1)
    counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for row, part in _pieces(rows, labels.shape[1], chunk):
        counts += _pair_counts(labels[row, part], other[row, part], valid[row, part], num_classes)
    return counts


def compute_signals(
    probabilities: torch.Tensor,
    initial_labels: torch.Tensor,
    valid: torch.Tensor,
    reference: torch.Tensor | None = None,
    chunk: int = SIGNAL_CHUNK_VOXELS,
) -> Signals:
    """Label-free signals of (N, C, ...) probabilities; ``valid`` is (N, ...) boolean,
    ``initial_labels`` and ``reference`` (its first rows only: QA Dice of the first volume)
    integer (N, ...) labels.

    Summed over pieces of ``chunk`` voxels (default :data:`SIGNAL_CHUNK_VOXELS`): the same
    numbers as over the whole array at once, without its full-size temporaries."""
    rows, num_classes = probabilities.shape[:2]
    flat = probabilities.reshape(rows, num_classes, -1)
    initial, valid = initial_labels.reshape(rows, -1), valid.reshape(rows, -1)
    voxels = flat.shape[2]
    with_start = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with_reference = torch.zeros_like(with_start)
    entropy_sum = torch.zeros((), dtype=torch.float64)
    reference_rows = 0 if reference is None else int(reference.shape[0])
    reference = None if reference is None else reference.reshape(reference_rows, -1)
    for row, part in _pieces(rows, voxels, chunk):
        piece, ok = flat[row, :, part], valid[row, part]
        labels = class_labels(piece)
        entropy = normalized_entropy(piece, axis=1)
        entropy_sum += torch.where(ok, entropy, 0.0).sum(dtype=torch.float64)
        with_start += _pair_counts(labels, initial[row, part], ok, num_classes)
        if row.start < reference_rows:
            ref = reference[row.start : min(row.stop, reference_rows), part]
            upto = ref.shape[0]
            with_reference += _pair_counts(labels[:upto], ref, ok[:upto], num_classes)
    counts = with_start.sum(1).double()
    total = float(counts.sum())
    fg_dice = dice_from_counts(with_start.numpy())[1:]
    return Signals(
        mean_entropy=float(entropy_sum) / total if total else 0.0,
        foreground_fraction=[float(c) / max(total, 1.0) for c in counts],
        change_since_start=1.0 - float(with_start.trace()) / total if total else float("nan"),
        dice_with_start=float(np.mean(fg_dice)) if fg_dice else 1.0,
        reference_dice=None if reference is None else dice_from_counts(with_reference.numpy())[1:],
    )


def foreground_drift(
    signals: Signals,
    start: Signals,
    prior: list[float] | None,
    options: GuardOptions,
    early_fractions: Sequence[Sequence[float]] = (),
) -> list[float]:
    """Per foreground class, how far its fraction lies outside its reference range, as a log
    ratio (0 inside). The range spans its fraction at the start, its prior and
    ``early_fractions`` (the first epoch's); its top is at least ``min_reference_fraction``, and
    a class whose range starts below that floor is not tested for shrinking."""
    drifts = []
    for c in range(1, len(signals.foreground_fraction)):
        known = [start.foreground_fraction[c], *(f[c] for f in early_fractions)]
        if prior:
            known.append(prior[c])
        low, high = min(known), max([*known, options.min_reference_fraction])
        now = signals.foreground_fraction[c]
        if now > high:
            drifts.append(math.log(now / high))
        elif now < low and low >= options.min_reference_fraction:
            drifts.append(math.log(low / max(now, 1e-12)))
        else:
            drifts.append(0.0)
    return drifts


def collapse_reasons(
    signals: Signals,
    start: Signals,
    prior: list[float] | None,
    options: GuardOptions,
    class_names: list[str],
    agreement: float | None = None,
    early_agreement: float | None = None,
    early_fractions: Sequence[Sequence[float]] | None = None,
) -> list[str]:
    """Why the signals look like a collapsed model (empty: healthy).

    Args:
        signals, start: this evaluation's signals and the unadapted model's.
        prior: the source class ratios (None: unknown).
        agreement: the method's smoothed agreement Dice (None: the method has none).
        early_agreement: its early level (the mean over the first epoch's steps).
        early_fractions: class fractions of the first epoch's evaluations; None skips the
            drift rule (during the first epoch).
    """
    reasons = []
    drifts = (
        foreground_drift(signals, start, prior, options, early_fractions)
        if early_fractions is not None and options.drift_tolerance > 0
        else None
    )
    for c in range(1, len(signals.foreground_fraction)):
        name = class_names[c] if c < len(class_names) else f"class {c}"
        now, at_start = signals.foreground_fraction[c], start.foreground_fraction[c]
        known = [at_start] + ([prior[c]] if prior else [])
        low = min(known)
        high = max([*known, options.min_reference_fraction])
        if low > 1e-4 and now < options.foreground_vanish_ratio * low:
            reasons.append(f"{name} vanished ({now:.2%} of voxels, {at_start:.2%} at start)")
        elif now > options.foreground_explode_ratio * high:
            reasons.append(f"{name} exploded ({now:.2%} of voxels, {at_start:.2%} at start)")
        elif drifts is not None and drifts[c - 1] > math.log1p(options.drift_tolerance):
            prior_text = f", prior {prior[c]:.2%}" if prior else ""
            reasons.append(
                f"{name} drifted to {now:.2%} of voxels ({at_start:.2%} at start{prior_text}; "
                f"{math.expm1(drifts[c - 1]):.0%} outside the range of the start, the prior "
                f"and the first epoch)"
            )
    if (
        signals.mean_entropy < options.entropy_collapse_ratio * start.mean_entropy
        and signals.dice_with_start < options.entropy_collapse_agreement
    ):
        reasons.append(
            f"entropy collapsed ({signals.mean_entropy:.4f}, {start.mean_entropy:.4f} at start) "
            f"while the segmentation changed (Dice with the start {signals.dice_with_start:.2f})"
        )
    if (
        agreement is not None
        and early_agreement is not None
        and agreement < options.agreement_drop_ratio * early_agreement
    ):
        reasons.append(
            f"smoothed agreement Dice fell to {agreement:.2f} (early level {early_agreement:.2f})"
        )
    return reasons


class CollapseGuard:
    """The collapse rules over the evaluations of one run (label-free; see :class:`GuardOptions`).

    * vanish / explode: a foreground class's fraction leaves [vanish_ratio x the smaller,
      explode_ratio x the larger] of its fraction at the start and its source prior;
    * drift: after the first epoch, the fraction lies more than ``drift_tolerance`` outside the
      range of the start, the prior and the first epoch's fractions. The test is cumulative
      (against fixed references, not the previous evaluation), so a slow drift is caught;
    * entropy collapse: the entropy falls to a few percent of its start while the segmentation
      moves far from the start;
    * agreement: the method's per-step agreement Dice, averaged over the last
      ``agreement_smoothing`` epochs of steps, falls below ``agreement_drop_ratio`` times its
      early level (its mean over the first epoch). Noisy or dipping curves, such as UDAS's
      early/final Dice, do not trip it, however often the engine evaluates.
    """

    def __init__(
        self,
        start: Signals,
        prior,
        options: GuardOptions,
        class_names: list[str],
        steps_per_epoch: int = 1,
    ):
        self.start, self.prior, self.options, self.class_names = start, prior, options, class_names
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.early_fractions: list[list[float]] = []
        self.agreements: list[float] = []
        self.early_agreement: float | None = None
        self.smoothed_agreement: float | None = None
        self.drift: list[float] = []

    def check(self, signals: Signals, epoch: int, agreements: Sequence[float]) -> list[str]:
        """The reasons (empty: healthy) for an evaluation in ``epoch`` (1-based), given the
        method's per-step agreement values since the previous evaluation (during the first
        epoch the smoothed value is the early level itself, so the rule cannot fire)."""
        options = self.options
        if agreements:
            self.agreements.extend(float(a) for a in agreements)
            self.early_agreement = float(np.mean(self.agreements[: self.steps_per_epoch]))
            window = options.agreement_smoothing * self.steps_per_epoch
            self.smoothed_agreement = float(np.mean(self.agreements[-window:]))
        in_first_epoch = epoch <= 1
        if in_first_epoch:
            self.early_fractions.append(list(signals.foreground_fraction))
        self.drift = foreground_drift(
            signals, self.start, self.prior, options, self.early_fractions
        )
        if not options.collapse_guard:
            return []
        return collapse_reasons(
            signals,
            self.start,
            self.prior,
            options,
            self.class_names,
            self.smoothed_agreement,
            self.early_agreement,
            None if in_first_epoch else self.early_fractions,
        )

    def settled(self) -> bool:
        """Whether the latest evaluation's drift is within half the tolerance (a checkpoint
        that may be kept after a collapse: the drift had not begun)."""
        return max(self.drift, default=0.0) <= math.log1p(self.options.drift_tolerance / 2)

    def report(self) -> dict[str, Any]:
        return {
            "early_agreement": self.early_agreement,
            "smoothed_agreement": self.smoothed_agreement,
            "foreground_drift": [math.expm1(d) for d in self.drift],
        }
