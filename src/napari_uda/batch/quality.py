"""A case's numbers and its keep-or-roll-back decision.

:func:`case_metrics` gives the report's per-case numbers (foreground volume in ml, mean entropy,
Dice against a reference where one exists, before and after, and how much the mask changed).

:func:`gate_decision` is the one seam to the keep-or-roll-back gate. Until the gate module exists
every case keeps the adapted result and records ``n/a`` (the engine's collapse guard has already
kept a healthy checkpoint, so "after" is never a collapsed model).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.inference import Prediction
from ..core.metrics import dice_per_class, volume_ml

#: Decisions: the adapted mask is kept, the source model's mask is kept (rolled back), or no gate.
KEEP, ROLL_BACK, NOT_AVAILABLE = "keep", "roll back", "n/a"


def case_metrics(
    before: Prediction,
    after: Prediction,
    num_classes: int,
    reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """Flat numbers of one case: ``volume_ml_before/after`` (all foreground classes),
    ``mean_entropy_before/after``, ``change_dice`` (foreground Dice between the masks before and
    after: 1 = unchanged), ``volume_change`` (after / before - 1) and, with a ``reference``,
    ``dice_before/after`` (mean over foreground classes)."""
    spacing = before.source.spacing
    metrics: dict[str, Any] = {}
    for stage, prediction in (("before", before), ("after", after)):
        metrics[f"volume_ml_{stage}"] = sum(
            volume_ml(prediction.labels, spacing, num_classes).values()
        )
        metrics[f"mean_entropy_{stage}"] = float(prediction.entropy.mean())
        if reference is not None:
            dice = dice_per_class(prediction.labels, reference, num_classes)[1:]
            metrics[f"dice_{stage}"] = float(np.mean(dice))
    metrics["change_dice"] = float(
        np.mean(dice_per_class(before.labels, after.labels, num_classes)[1:])
    )
    before_ml = metrics["volume_ml_before"]
    metrics["volume_change"] = metrics["volume_ml_after"] / before_ml - 1 if before_ml else None
    return metrics


def gate_decision(before: Prediction, after: Prediction, model) -> dict[str, Any]:
    """Keep the adapted mask or roll back to the source model's: ``{"decision", "reason",
    "volume_check"}``. No gate yet: always ``n/a`` (the adapted mask is kept)."""
    return {"decision": NOT_AVAILABLE, "reason": "no gate", "volume_check": NOT_AVAILABLE}


def keeps_adapted(gate: dict[str, Any]) -> bool:
    return gate.get("decision") != ROLL_BACK
