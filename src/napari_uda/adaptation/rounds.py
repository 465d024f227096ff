"""Rounds of correct-then-adapt, headless: what the Adapt widget's undo and the report use.

* :func:`keep_corrections` / :func:`corrected_prediction`: the final mask always keeps the
  corrected voxels exactly as the user made them (pasted over the model's answer); the CLI and
  the UI both call these.
* :func:`corrected_slices`: which slices (axis, index) are fully corrected, for the slice list and
  the report.
* :class:`RoundHistory`: one :class:`CorrectionRound` per adaptation (the adapted weights as a
  CPU state dict, the corrections used, stored sparsely, the final mask as uint8); ``undo``
  drops the last round, :meth:`RoundHistory.model` rebuilds the model of any round.
* :func:`check_other_scans`: the adapted model on other scans, each gated against the source
  model with the end-of-run gate (:mod:`~napari_uda.adaptation.gate`), with a warning where the
  gate would keep the source model there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.inference import Prediction
from ..core.metrics import dice_per_class
from ..core.models.adapter import ModelAdapter
from ..core.plausibility import ExpectedVolumes, merge_expected
from ..core.volume import Volume
from .corrections import NOT_CORRECTED
from .events import AdaptationResult
from .gate import GateDecision, GateOptions, predict_and_gate

AXIS_NAMES = ("sagittal", "coronal", "axial")


def _array(corrections: Volume | np.ndarray) -> np.ndarray:
    return np.asarray(corrections.data if isinstance(corrections, Volume) else corrections)


def corrected_mask(corrections: Volume | np.ndarray) -> np.ndarray:
    """Boolean array: True where the user corrected."""
    return np.rint(_array(corrections)).astype(np.int64) != NOT_CORRECTED


def keep_corrections(labels: np.ndarray, corrections: Volume | np.ndarray) -> np.ndarray:
    """``labels`` with every corrected voxel replaced by the user's label (a new array)."""
    values = np.rint(_array(corrections)).astype(np.int64)
    if values.shape != labels.shape:
        raise ValueError(
            f"corrections of shape {values.shape} do not match the mask's {labels.shape}"
        )
    return np.where(values != NOT_CORRECTED, values, labels).astype(labels.dtype)


def corrected_prediction(prediction: Prediction, corrections: Volume | np.ndarray) -> Prediction:
    """``prediction`` with the corrected voxels kept exactly: their labels are the user's, their
    probabilities one-hot and their entropy 0 (the user is certain there)."""
    values = np.rint(_array(corrections)).astype(np.int64)
    labels = keep_corrections(prediction.labels, values)
    corrected = values != NOT_CORRECTED
    if not corrected.any():
        return prediction
    probabilities = prediction.probabilities.copy()
    probabilities[:, corrected] = 0.0
    for label in np.unique(values[corrected]):
        probabilities[int(label)][corrected & (values == label)] = 1.0
    entropy = np.where(corrected, 0.0, prediction.entropy).astype(prediction.entropy.dtype)
    return Prediction(probabilities, labels, entropy, prediction.source)


@dataclass(frozen=True)
class CorrectedSlice:
    """A slice the user corrected completely: array ``axis`` of the image and its ``index``."""

    axis: int
    index: int

    @property
    def axis_name(self) -> str:
        """sagittal / coronal / axial for a canonical (RAS) array, else ``axis N``."""
        return AXIS_NAMES[self.axis] if self.axis < 3 else f"axis {self.axis}"


def corrected_slices(corrections: Volume | np.ndarray) -> list[CorrectedSlice]:
    """Fully corrected slices along every array axis, sorted by axis then index."""
    corrected = corrected_mask(corrections)
    found = []
    for axis in range(corrected.ndim):
        others = tuple(a for a in range(corrected.ndim) if a != axis)
        full = np.flatnonzero(corrected.all(axis=others))
        found += [CorrectedSlice(axis, int(i)) for i in full]
    return found


def describe_corrections(corrections: Volume | np.ndarray) -> dict[str, Any]:
    """JSON-able summary: corrected slices per axis, corrected voxels, voxels outside them."""
    corrected = corrected_mask(corrections)
    slices = corrected_slices(corrections)
    in_slices = np.zeros_like(corrected)
    for item in slices:
        index = [slice(None)] * corrected.ndim
        index[item.axis] = item.index
        in_slices[tuple(index)] = True
    by_axis: dict[int, list[int]] = {}
    for item in slices:
        by_axis.setdefault(item.axis, []).append(item.index)
    return {
        "slices": {
            (AXIS_NAMES[a] if a < 3 else f"axis {a}"): idx for a, idx in sorted(by_axis.items())
        },
        "corrected_voxels": int(corrected.sum()),
        "stroke_voxels": int((corrected & ~in_slices).sum()),
    }


@dataclass
class SparseCorrections:
    """Corrections stored as the flat indices of corrected voxels and their labels."""

    shape: tuple[int, ...]
    indices: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_dense(cls, corrections: Volume | np.ndarray) -> SparseCorrections:
        values = np.rint(_array(corrections)).astype(np.int64)
        flat = np.flatnonzero(values != NOT_CORRECTED)
        return cls(values.shape, flat, values.reshape(-1)[flat].astype(np.int16))

    def dense(self) -> np.ndarray:
        """int16 array, :data:`NOT_CORRECTED` where not corrected."""
        values = np.full(int(np.prod(self.shape)), NOT_CORRECTED, dtype=np.int16)
        values[self.indices] = self.labels
        return values.reshape(self.shape)


@dataclass
class CorrectionRound:
    """One adaptation with corrections: its weights, what it learned from, what it gave."""

    number: int
    method: str
    settings: dict[str, Any]
    state: dict[str, torch.Tensor] = field(repr=False)
    corrections: SparseCorrections = field(repr=False)
    labels: np.ndarray = field(repr=False)
    seconds: float = 0.0
    stop_reason: str = ""
    reference_dice: float | None = None
    created: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for the report (no weights, no arrays)."""
        return {
            "round": self.number,
            "method": self.method,
            "settings": self.settings,
            "seconds": round(self.seconds, 2),
            "stop_reason": self.stop_reason,
            "reference_dice": self.reference_dice,
            "corrections": describe_corrections(self.corrections.dense()),
        }


class RoundHistory:
    """The rounds of one scan. Round 0 is the user's model; each round adapts the latest one.

    Memory: per round the network's state dict on the CPU, the corrected voxels (sparse) and
    the final mask (uint8).
    """

    def __init__(self, model: ModelAdapter):
        self.base = model
        self.rounds: list[CorrectionRound] = []

    def __len__(self) -> int:
        return len(self.rounds)

    @property
    def latest(self) -> CorrectionRound | None:
        return self.rounds[-1] if self.rounds else None

    def record(
        self,
        result: AdaptationResult,
        corrections: Volume | np.ndarray,
        *,
        reference: np.ndarray | None = None,
    ) -> CorrectionRound:
        """Add the round that ``result`` finished (a run with ``corrections``); its final mask
        is the result's first prediction with the corrections kept."""
        labels = keep_corrections(result.prediction.labels, corrections).astype(np.uint8)
        dice = None
        if reference is not None:
            truth = np.rint(np.asarray(reference)).astype(np.int64)
            dice = float(
                np.mean(
                    dice_per_class(labels.astype(np.int64), truth, result.model.num_classes)[1:]
                )
            )
        state = {
            k: v.detach().to("cpu", copy=True) for k, v in result.model.network.state_dict().items()
        }
        entry = CorrectionRound(
            number=len(self.rounds) + 1,
            method=result.method,
            settings=dict(result.settings),
            state=state,
            corrections=SparseCorrections.from_dense(corrections),
            labels=labels,
            seconds=result.seconds,
            stop_reason=result.stop_reason,
            reference_dice=dice,
        )
        self.rounds.append(entry)
        return entry

    def undo(self) -> CorrectionRound | None:
        """Drop the latest round; the new latest (None: back to the user's model)."""
        if self.rounds:
            self.rounds.pop()
        return self.latest

    def model(self, number: int | None = None) -> ModelAdapter:
        """A fresh copy of the model of round ``number`` (default: the latest; 0: the user's)."""
        number = len(self.rounds) if number is None else number
        if not 0 <= number <= len(self.rounds):
            raise IndexError(f"there is no round {number}; rounds are 0..{len(self.rounds)}")
        model = self.base.clone()
        if number:
            model.network.load_state_dict(self.rounds[number - 1].state)
        model.network.eval()
        return model

    def report(self) -> list[dict[str, Any]]:
        return [entry.summary() for entry in self.rounds]


# -- other scans -------------------------------------------------------------------------------
@dataclass
class ScanCheck:
    """The adapted model on another scan, gated against the source model there (label-free:
    the end-of-run gate's signals and rules, :func:`~napari_uda.adaptation.gate.predict_and_gate`).

    Attributes:
        prediction: the adapted model's prediction.
        decision: the gate's decision on this scan.
        warning: why the adapted model may be worse here, or what to check ("" when the gate
            keeps it without a warning).
    """

    prediction: Prediction
    decision: GateDecision
    warning: str = ""

    @property
    def agreement_dice(self) -> float:
        """Foreground Dice between the adapted and the source masks (model grid)."""
        return self.decision.change.agreement if self.decision.change else 1.0

    @property
    def volume_ratio(self) -> float:
        """Foreground volume of the adapted mask over the source mask's (model grid)."""
        return self.decision.change.volume_ratio if self.decision.change else 1.0


def _scan_warning(decision: GateDecision) -> str:
    if decision.rolled_back:
        return "the adapted model may be worse on this scan: " + "; ".join(decision.reasons)
    return "; ".join(decision.warnings)


def check_other_scans(
    adapted: ModelAdapter,
    source: ModelAdapter,
    volumes: Sequence[Volume],
    *,
    device: str = "cpu",
    options: GateOptions | None = None,
    expected: ExpectedVolumes | None = None,
) -> list[ScanCheck]:
    """Segment ``volumes`` with the adapted model and gate each scan against the source model
    (``expected``: the user's ranges over the model's; ``options`` default: the gate's, with
    ``min_agreement_gain`` 0). The adapted mask is returned either way
    (the user asked for it); a scan where the gate would keep the source model is named."""
    # the question on other scans is whether the adapted model may be worse there, not whether
    # it helps measurably: not worse is enough (min_agreement_gain 0)
    options = options or GateOptions(min_agreement_gain=0.0)
    expected = merge_expected(source.expected_volumes(), dict(expected or {}))
    checks = []
    for volume in volumes:
        gated = predict_and_gate(
            source, adapted, [volume], expected=expected, options=options, device=device
        )
        checks.append(ScanCheck(gated.after[0], gated.decision, _scan_warning(gated.decision)))
    return checks
