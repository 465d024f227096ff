"""The report of an adaptation run, as the CLI (``adapt --report``) and the Export widget write
it: settings, history and metrics as JSON, and the per-step history as CSV. Both are written
atomically."""

from __future__ import annotations

import csv
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.metrics import compute_metrics, volume_ml
from ..core.volume import atomic_output
from .events import AdaptationResult


def jsonable(value: Any) -> Any:
    """Numbers, lists and dicts JSON can hold (NaN/inf become None, arrays and tensors lists,
    anything else its ``str``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def run_metrics(
    result: AdaptationResult,
    class_names: list[str],
    spacing: tuple[float, ...],
    reference: np.ndarray | None = None,
    tolerance_mm: float = 1.0,
) -> dict[str, Any]:
    """Volumes (ml), mean entropy and, with a reference, every metric before and after."""
    count = len(class_names)
    before, after = result.initial_prediction, result.prediction
    metrics: dict[str, Any] = {
        "volume_ml": {
            stage: {class_names[k]: v for k, v in volume_ml(p.labels, spacing, count).items()}
            for stage, p in (("before", before), ("after", after))
        },
        "mean_entropy": {
            "before": float(before.entropy.mean()),
            "after": float(after.entropy.mean()),
        },
    }
    if reference is not None:
        metrics["reference"] = {
            stage: {
                class_names[k]: v
                for k, v in compute_metrics(
                    p.labels, reference, spacing, num_classes=count, tolerance_mm=tolerance_mm
                ).items()
            }
            for stage, p in (("before", before), ("after", after))
        }
        metrics["reference"]["tolerance_mm"] = tolerance_mm
    return metrics


def run_report(
    result: AdaptationResult,
    *,
    inputs: dict[str, Any],
    metrics: dict[str, Any],
    corrections: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report: what ran on what, with which settings, what came out; with
    ``corrections`` (the corrected slices and the rounds of correct-then-adapt), those too."""
    extra = {} if corrections is None else {"corrections": corrections}
    return jsonable(
        {
            "napari_uda_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": inputs,
            "method": result.method,
            "settings": result.settings,
            "seed": result.seed,
            "device": result.device,
            "stopped": result.stopped,
            "stop_reason": result.stop_reason,
            "seconds": result.seconds,
            "checkpoint": vars(result.checkpoint),
            # the keep-or-roll-back decision with its reasons and loud warnings (None: not gated)
            "gate": result.gate.to_dict() if result.gate is not None else None,
            "dice_before": result.reference_dice_before,
            "dice_after": result.reference_dice_after,
            "extra": result.extra,
            "metrics": metrics,
            **extra,
            "history": result.history,
        }
    )


def history_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows (one per step): losses become ``loss_<name>``, lists ``<name>_<i>``."""
    rows = []
    for record in history:
        row: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(value, dict):
                row.update(
                    {f"loss_{k}" if key == "losses" else f"{key}_{k}": v for k, v in value.items()}
                )
            elif isinstance(value, (list, tuple)):
                row.update({f"{key}_{i}": v for i, v in enumerate(value)})
            else:
                row[key] = value
        rows.append(row)
    return rows


def write_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    with atomic_output(path) as temporary:
        Path(temporary).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return Path(path)


def write_history_csv(history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    rows = history_rows(history)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
