"""What every benchmark script shares: the machine line, atomic JSON results, the table of
adaptation cases, and replacing a marked block of a docs page with a freshly generated one.

Scripts in this folder run as ``python benchmarks/<name>.py``, so they import this module as
``_report``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Surface Dice tolerance of every adaptation benchmark (mm).
TOLERANCE_MM = 2.0


def machine() -> str:
    """A one-line description of this machine (architecture, CPU, cores, accelerator)."""
    import torch

    accelerator = "CUDA" if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {os.cpu_count()} cores, {accelerator}"


def case_scores(before, after, reference, spacing) -> dict[str, float]:
    """Foreground Dice and surface Dice (at :data:`TOLERANCE_MM`) of the label maps ``before``
    and ``after`` against the boolean ``reference``, as a case's ``dice_before`` ... fields, with
    this process's peak resident memory (MB)."""
    import resource

    from napari_uda.core.metrics import compute_metrics

    fields: dict[str, float] = {}
    for stage, labels in (("before", before), ("after", after)):
        metrics = compute_metrics(labels, reference, spacing, tolerance_mm=TOLERANCE_MM)[1]
        fields[f"dice_{stage}"] = metrics["dice"]
        fields[f"surface_dice_{stage}"] = metrics["surface_dice"]
    fields["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return fields


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file in the folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
        json.dump(payload, file, indent=2)
    os.replace(file.name, path)


def replace_marked_block(doc: Path, marker: str, body: str, *, title: str) -> None:
    """Put ``body`` between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` in ``doc``.

    The block is appended when the markers are missing; a missing ``doc`` starts with ``title``.
    """
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else f"# {title}\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def case_table(rows: list[dict]) -> str:
    """Markdown table of adaptation cases (head, scanner, method, Dice and surface Dice before
    and after, seconds, peak memory, kept checkpoint); rows with ``error`` say why they did not
    run."""
    lines = [
        "| head | scanner | method | Dice before | Dice after | surface Dice before | "
        "surface Dice after | seconds | peak memory (MB) | kept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        case = f"| {row['head']} | {row['profile']} | {row['method']} |"
        if "error" in row:
            lines.append(f"{case} – | – | – | – | – | – | not run: {row['error']} |")
            continue
        lines.append(
            f"{case} {row['dice_before']:.3f} | **{row['dice_after']:.3f}** | "
            f"{row['surface_dice_before']:.3f} | {row['surface_dice_after']:.3f} | "
            f"{row['seconds']:.1f} | {row['peak_memory_mb']:.0f} | {row['kept_checkpoint']} |"
        )
    return "\n".join(lines)


def publish(results: Path, payload: dict, doc: Path, marker: str, body: str) -> None:
    """Write ``payload`` to ``results``, ``body`` between ``marker``'s markers in ``doc``
    (a new doc is titled "Performance"), and print ``body``."""
    write_json(results, payload)
    replace_marked_block(doc, marker, body, title="Performance")
    print(body)
