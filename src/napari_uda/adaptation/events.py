"""Typed events the adaptation engine yields, and the result it returns.

The UI and the CLI only ever see these: data flows volume -> preprocessing -> model -> method ->
events -> UI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.inference import Prediction
from ..core.models.adapter import ModelAdapter


@dataclass
class AdaptationEvent:
    """Progress after one optimiser step.

    The first event of a run has ``step == 0``: the unadapted model's signals, with its
    prediction (on the source grid of the first volume) as ``preview``; it is not part of the
    history.

    Attributes:
        step: steps done so far (1-based).
        total_steps: planned steps (the run may end earlier).
        epoch: current epoch (1-based).
        losses: named losses of this step (``total`` first).
        elapsed_seconds: wall time since the run started.
        mean_entropy: mean normalised entropy of the target prediction (last evaluation).
        agreement_dice: label-free agreement Dice (method-specific; last value).
        change_since_start: fraction of target voxels whose label changed since the start.
        foreground_fraction: per class, fraction of voxels predicted as that class.
        reference_dice: per foreground class, Dice against the reference (QA only), or None.
        evaluated: whether the label-free signals were recomputed at this step.
        preview: an intermediate prediction on the source grid (every N steps), or None.
        message: a short human note (e.g. "collapse detected: foreground vanished").
    """

    step: int
    total_steps: int
    epoch: int
    losses: dict[str, float]
    elapsed_seconds: float
    mean_entropy: float | None = None
    agreement_dice: float | None = None
    change_since_start: float | None = None
    foreground_fraction: list[float] | None = None
    reference_dice: list[float] | None = None
    evaluated: bool = False
    preview: Prediction | None = None
    message: str = ""

    @property
    def main_loss(self) -> float:
        """The loss to show: ``total``, else the first named loss (NaN before any step)."""
        return self.losses.get("total", next(iter(self.losses.values()), float("nan")))

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict without the preview (for histories and reports)."""
        record = asdict(self)
        record.pop("preview", None)
        return record


@dataclass
class CheckpointChoice:
    """Which weights the result holds, and why."""

    step: int
    reason: str
    score: float | None = None


@dataclass
class AdaptationResult:
    """What a finished (or stopped) run returns.

    Attributes:
        model: the adapted model (a copy; the user's model is untouched).
        prediction: final prediction with the kept checkpoint, on the source grid.
        initial_prediction: the unadapted model's prediction, on the source grid.
        history: one record per step (:meth:`AdaptationEvent.to_record`).
        checkpoint: which checkpoint was kept and why.
        stopped: the caller asked to stop before the planned end.
        stop_reason: why the run ended ("completed", "converged: ...", "stopped by user", ...).
        seconds: wall time of the run.
        method: the method's registry name.
        settings: the settings used, as a dict.
        reference_dice_before / reference_dice_after: Dice per class vs. the reference, if any.
        extra: JSON-able facts (signals at the start, of the kept checkpoint and at the end,
            collapse details, the method's own report such as AdaEnt's prior).
        predictions / initial_predictions: one prediction per target volume, in order
            (``prediction`` and ``initial_prediction`` are the first of each).
        gate: the keep-or-roll-back decision (:class:`~napari_uda.adaptation.gate.
            GateDecision`), or None when the run was not gated.
        rolled_back: what the gate rolled back (:class:`~napari_uda.adaptation.gate.
            RolledBack`: the adapted model, its predictions, checkpoint and reference Dice),
            kept for :func:`~napari_uda.adaptation.gate.overrule_gate`; None when nothing was
            rolled back or it was dropped. It travels with the result (pickled whole) from a
            separate engine process.
    """

    model: ModelAdapter
    prediction: Prediction
    initial_prediction: Prediction
    history: list[dict[str, Any]]
    checkpoint: CheckpointChoice
    stopped: bool
    stop_reason: str
    seconds: float
    method: str
    settings: dict[str, Any]
    seed: int | None = None
    device: str = "cpu"
    reference_dice_before: list[float] | None = None
    reference_dice_after: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list)
    initial_predictions: list[Prediction] = field(default_factory=list)
    gate: Any = None
    rolled_back: Any = None

    def summary(self) -> str:
        """One line for the user (CLI, widget status): how the run ended, which checkpoint it
        kept, and the reference Dice per class before and after when there was a reference."""
        text = (
            f"{self.method}: {self.stop_reason} in {self.seconds:.1f} s; kept step "
            f"{self.checkpoint.step} ({self.checkpoint.reason})"
        )
        if self.reference_dice_before is not None and self.reference_dice_after is not None:
            before = ", ".join(f"{d:.3f}" for d in self.reference_dice_before)
            after = ", ".join(f"{d:.3f}" for d in self.reference_dice_after)
            text += f"; Dice vs reference {before} -> {after}"
        return text
