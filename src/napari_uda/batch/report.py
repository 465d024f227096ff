"""The batch report, from the manifest: ``report.csv`` (one row per case) and ``report.html``
(self-contained page; each case's montage is the PNG in its folder), cases to check first.

A case is flagged, most urgent first: ``failed``; ``rolled back`` (the gate kept the source
model's mask); ``volume out of range`` (the gate's expected-volume check); ``large change``
(foreground volume changed by more than :data:`LARGE_VOLUME_CHANGE`); ``low agreement`` (Dice
between the masks before and after below :data:`LOW_AGREEMENT`); ``low Dice`` (against a
reference, below :data:`LOW_DICE`); ``not run``. Unflagged cases come last.
"""

from __future__ import annotations

import csv
import html
import os
from pathlib import Path
from typing import Any

from ..core.volume import atomic_output
from .manifest import MANIFEST_NAME, read_manifest
from .quality import ROLL_BACK

LARGE_VOLUME_CHANGE = 0.2
LOW_AGREEMENT = 0.8
LOW_DICE = 0.7
FLAGS = (
    "failed",
    "rolled back",
    "volume out of range",
    "large change",
    "low agreement",
    "low Dice",
    "not run",
)
COLUMNS = (
    "case",
    "state",
    "flags",
    "image",
    "reference",
    "gate",
    "gate_reason",
    "volume_check",
    "dice_before",
    "dice_after",
    "volume_ml_before",
    "volume_ml_after",
    "volume_change",
    "change_dice",
    "mean_entropy_before",
    "mean_entropy_after",
    "seconds",
    "peak_memory_mb",
    "error",
    "labels",
    "montage",
)


def case_flags(record: dict[str, Any]) -> list[str]:
    """The reasons to look at a case, most urgent first (see the module's docstring)."""
    state = record.get("state")
    if state == "failed":
        return ["failed"]
    if state != "done":
        return ["not run"]
    gate, metrics = record.get("gate") or {}, record.get("metrics") or {}
    flags = []
    if gate.get("decision") == ROLL_BACK:
        flags.append("rolled back")
    if str(gate.get("volume_check", "")).startswith("out"):
        flags.append("volume out of range")
    change = metrics.get("volume_change")
    if change is not None and abs(change) > LARGE_VOLUME_CHANGE:
        flags.append("large change")
    if metrics.get("change_dice", 1.0) < LOW_AGREEMENT:
        flags.append("low agreement")
    if metrics.get("dice_after") is not None and metrics["dice_after"] < LOW_DICE:
        flags.append("low Dice")
    return flags


def report_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case (:data:`COLUMNS`), the cases to check first."""
    rows = []
    for case_id, record in manifest["cases"].items():
        gate, metrics = record.get("gate") or {}, record.get("metrics") or {}
        outputs = record.get("outputs") or {}
        flags = case_flags(record)
        row = {
            "case": case_id,
            "state": record.get("state"),
            "flags": "; ".join(flags),
            "image": record.get("image"),
            "reference": record.get("reference") or "",
            "gate": gate.get("decision", ""),
            "gate_reason": gate.get("reason", ""),
            "volume_check": gate.get("volume_check", ""),
            "seconds": record.get("seconds"),
            "peak_memory_mb": record.get("peak_memory_mb"),
            "error": record.get("reason", "") if record.get("state") == "failed" else "",
            "labels": outputs.get("labels", ""),
            "montage": outputs.get("montage", ""),
        }
        row.update({key: metrics.get(key) for key in COLUMNS if key in metrics})
        row["_rank"] = (
            FLAGS.index(flags[0]) if flags else len(FLAGS),
            metrics.get("change_dice", 1.0),
        )
        rows.append(row)
    rows.sort(key=lambda row: (*row["_rank"], row["case"]))
    return [{key: row.get(key) for key in COLUMNS} for row in rows]


def write_report(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.csv`` and ``report.html`` into ``out_dir`` from its manifest (atomically);
    their paths (none when the folder has no manifest yet)."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).is_file():
        return {}
    manifest = read_manifest(out_dir)
    rows = report_rows(manifest)
    paths = {"csv": out_dir / "report.csv", "html": out_dir / "report.html"}
    with atomic_output(paths["csv"]) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: _text(v) for k, v in row.items()} for row in rows])
    with atomic_output(paths["html"]) as temporary:
        Path(temporary).write_text(_html(manifest, rows), encoding="utf-8")
    return paths


def _text(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
.flags { color: #b00; font-weight: bold; }
.ok { color: #070; }
.key span { display: inline-block; width: 1em; height: 0.6em; margin: 0 0.3em; }
img { width: 420px; image-rendering: pixelated; }
"""


def _summary(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    batch, counts = manifest["batch"], manifest.get("counts", {})
    flagged = sum(1 for row in rows if row["flags"])
    parts = [f"{counts.get(state, 0)} {state}" for state in ("done", "failed", "pending")]
    settings = " ".join(batch["settings"]) or "defaults"
    return (
        f"<h1>napari-uda batch: {html.escape(batch['method'])}, {html.escape(batch['mode'])}</h1>"
        f"<p>Model {html.escape(batch['model'])}; settings {html.escape(settings)}; "
        f"seed {batch['seed']}. Updated {html.escape(manifest.get('updated', ''))}.</p>"
        f"<p>{len(rows)} cases: {', '.join(parts)}; <b>{flagged} to check</b> (listed first).</p>"
        '<p class="key">Montage: middle axial, coronal and sagittal slices; '
        '<span style="background:#ff8c00"></span>source model (top row), '
        '<span style="background:#28dc3c"></span>kept mask (bottom row).</p>'
    )


def _case_row(row: dict[str, Any]) -> str:
    def numbers(key: str, unit: str = "") -> str:
        before, after = _text(row[f"{key}_before"]), _text(row[f"{key}_after"])
        return f"{before} &rarr; {after}{unit}" if before or after else ""

    flags = row["flags"] or "ok"
    details = [
        f"volume {numbers('volume_ml', ' ml')}",
        f"entropy {numbers('mean_entropy')}",
        f"Dice {numbers('dice')}" if row["dice_after"] is not None else "",
        f"change Dice {_text(row['change_dice'])}" if row["change_dice"] is not None else "",
        f"gate {html.escape(_text(row['gate']))} ({html.escape(_text(row['gate_reason']))})",
        f"{_text(row['seconds'], 1)} s, {_text(row['peak_memory_mb'], 0)} MB",
    ]
    if row["error"]:
        details = [f"error: {html.escape(row['error'])}"]
    montage = html.escape(row["montage"] or "")
    image = f'<a href="{montage}"><img src="{montage}" alt="montage"></a>' if montage else ""
    return (
        f"<tr><td><b>{html.escape(row['case'])}</b><br>{html.escape(Path(row['image'] or '').name)}"
        f'<br><span class="{"flags" if row["flags"] else "ok"}">{html.escape(flags)}</span></td>'
        f"<td>{'<br>'.join(d for d in details if d)}</td><td>{image}</td></tr>"
    )


def _html(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    body = "".join(_case_row(row) for row in rows)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>napari-uda batch report</title>'
        f"<style>{STYLE}</style></head><body>{_summary(manifest, rows)}"
        "<table><tr><th>case</th><th>numbers (before &rarr; after)</th><th>montage</th></tr>"
        f"{body}</table></body></html>\n"
    )
