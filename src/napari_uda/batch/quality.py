"""A case's numbers and its keep-or-roll-back decision.

:func:`case_metrics` gives the report's per-case numbers (foreground volume in ml, mean entropy,
Dice against a reference where one exists, before and after, and how much the mask changed).

The keep-or-roll-back gate is :mod:`napari_uda.adaptation.gate`: ``per-scan`` cases gate their
finished run (``apply_gate``, as ``napari-uda adapt`` does); ``site`` cases gate the site model
against the source on each scan (:func:`gate_site_case`). :func:`gate_record` is what the
manifest and the report keep of a decision.
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


def gate_record(decision) -> dict[str, Any]:
    """The report's summary of a :class:`~napari_uda.adaptation.gate.GateDecision`:
    ``decision`` (keep / roll back), ``reason``, ``volume_check`` (``ok``, ``out of range: ...``
    or ``n/a`` without an expected range) and the gate's ``warnings``."""
    if decision is None:
        return {"decision": NOT_AVAILABLE, "reason": "not gated", "volume_check": NOT_AVAILABLE}
    flags = [
        f"{f['class_name']} {f['volume_ml']:.0f} ml outside {f['low']:g}-{f['high']:g}"
        for f in decision.flags
    ]
    if flags:
        check = "out of range: " + "; ".join(flags)
    else:
        check = "ok" if decision.expected_ml else NOT_AVAILABLE
    return {
        "decision": ROLL_BACK if decision.rolled_back else KEEP,
        "reason": decision.summary,
        "volume_check": check,
        "warnings": list(decision.warnings),
    }


def gate_site_case(source_model, site_model, volume, *, expected, options, device, seed):
    """Predict ``volume`` with the source and the site model and gate them; (before, kept,
    the decision). Each model predicts once, on the model grid, for the gate and the masks."""
    from ..adaptation.gate import predict_and_gate

    gated = predict_and_gate(
        source_model,
        site_model,
        [volume],
        expected=expected,
        options=options,
        device=device,
        seed=seed,
    )
    return gated.before[0], gated.kept[0], gated.decision
