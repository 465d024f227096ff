"""Benchmark ``napari-uda batch``: scans per minute with 1 and 2 local worker processes.

The archive is the two demo heads (``robex``, the demo's target anatomy, and ``mni152``, the
demo model's training anatomy) under the built-in simulated scanners (:mod:`napari_uda.simulation`)
with different seeds, 20 scans by default, with their reference brain masks; they are written to
``benchmarks/_work/batch/scans`` (made once, reused). Each configuration runs the whole batch
(``per-scan``, the demo model, ``adabn`` by default) into a fresh output folder through
:func:`napari_uda.batch.run.run_archive`, exactly as the CLI does, and records

* the wall time from starting the cluster to the written report, and scans per minute;
* the scaling: scans per minute with N workers divided by that with 1;
* the mean Dice against the reference before and after, and failures;
* the machine's 1-minute load average before and after each run (``os.getloadavg``, what
  ``uptime`` shows): on a shared machine other work takes cores away and the scaling is lower
  than the workers alone would give.

Usage::

    .venv/bin/python benchmarks/batch_benchmark.py                 # 20 scans, 1 and 2 workers
    .venv/bin/python benchmarks/batch_benchmark.py --scans 6 --workers 1 2 --method tent

Writes ``benchmarks/results/batch.json`` and the table in ``docs/batch.md`` (between the
``batch-table`` markers); both come from a run, never by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from _report import ROOT, machine, replace_marked_block, write_json

RESULTS = ROOT / "benchmarks" / "results" / "batch.json"
DOCS = ROOT / "docs" / "batch.md"
WORK = ROOT / "benchmarks" / "_work" / "batch"
PROFILES = ("new_scanner", "t2_like", "bias_noise", "thick_slices", "motion")


def make_archive(count: int) -> Path:
    """``count`` scans (heads x profiles x seeds) with references, and the CSV listing them."""
    from napari_uda.core.volume import load_volume, save_volume
    from napari_uda.data import demo_files
    from napari_uda.simulation import simulate_scanner

    files = demo_files()
    heads = {
        "robex": (files.target_clean_image, files.target_mask),
        "mni152": (files.source_image, files.source_mask),
    }
    folder = WORK / "scans"
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,reference"]
    combos = itertools.product(range(count), heads.items(), PROFILES)
    for seed, (head, (image, mask)), profile in itertools.islice(combos, count):
        path = folder / f"{head}_{profile}_{seed}.nii.gz"
        if not path.exists():
            save_volume(simulate_scanner(load_volume(image), profile, seed=seed), path)
        rows.append(f"{path.name},{mask}")
    listing = folder / f"archive_{count}.csv"
    listing.write_text("\n".join(rows) + "\n")
    return listing


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def run_config(
    listing: Path, workers: int, method: str, mode: str, time_limit: float | None = None
) -> dict:
    """One batch into a fresh folder, stopped after ``time_limit`` seconds if given (the cases
    not finished by then stay pending); the measurements."""
    from napari_uda.batch.cases import plan_cases
    from napari_uda.batch.job import BatchJob
    from napari_uda.batch.manifest import read_manifest
    from napari_uda.batch.run import run_archive
    from napari_uda.data import demo_files

    out = WORK / f"out_{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cases = plan_cases(listing)
    job = BatchJob(
        model=str(demo_files().model), method=method, out_dir=str(out), mode=mode, device="cpu"
    )
    load_before = load_average()
    started = time.perf_counter()
    limit = time_limit or float("inf")
    outcome = run_archive(
        job, cases, workers=workers, should_stop=lambda: time.perf_counter() - started > limit
    )
    seconds = time.perf_counter() - started
    records = read_manifest(out)["cases"].values()
    done = [r for r in records if r["state"] == "done"]
    dice = {
        stage: statistics.mean(r["metrics"][f"dice_{stage}"] for r in done) if done else None
        for stage in ("before", "after")
    }
    return {
        "workers": workers,
        "scans": len(cases),
        "time_limit": time_limit,
        "done": outcome.progress.done,
        "failed": outcome.progress.failed,
        "seconds": round(seconds, 1),
        "scans_per_minute": round(len(done) / seconds * 60, 2),
        "mean_case_seconds": round(statistics.mean(r["seconds"] for r in done), 1) if done else 0,
        "dice_before": dice["before"],
        "dice_after": dice["after"],
        "load_before": load_before,
        "load_after": load_average(),
    }


def table(payload: dict) -> str:
    base = payload["runs"][0]["scans_per_minute"]
    lines = [
        f"{payload['scans']} scans (2 demo heads x {len(PROFILES)} simulated scanners), "
        f"`{payload['mode']}` with `{payload['method']}`, demo model, CPU; {payload['machine']}; "
        f"{payload['date']}.",
        "",
        "| workers | scans done | wall time (s) | scans / min | scaling | mean s / scan (in a "
        "worker) | mean Dice before → after | failed | load average before / after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in payload["runs"]:
        scaling = run["scans_per_minute"] / base if base else float("nan")
        lines.append(
            f"| {run['workers']} | {run['done']} of {run['scans']} | {run['seconds']:.0f} | "
            f"{run['scans_per_minute']:.2f} | "
            f"{scaling:.2f}x | {run['mean_case_seconds']} | "
            f"{run['dice_before']:.3f} → {run['dice_after']:.3f} | {run['failed']} | "
            f"{run['load_before']} / {run['load_after']} |"
        )
    lines += ["", payload["note"]]
    cores = os.cpu_count() or 1
    # the load after a run counts its own workers; the load before one counts other work (and
    # what is left of the previous run's, which the 1-minute average forgets within minutes)
    if any(run["load_before"] > cores for run in payload["runs"]):
        lines += [
            "",
            f"**Other work kept the load average above the {cores} cores when a run "
            "started (a shared machine): the scans per minute and the scaling measure that "
            "load, not the batch; rerun on an idle machine for the batch's own scaling.**",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="adabn")
    parser.add_argument("--mode", default="per-scan", choices=("per-scan", "site"))
    parser.add_argument(
        "--time-limit", type=float, help="stop each configuration after this many seconds"
    )
    parser.add_argument(
        "--docs-only", action="store_true", help="rewrite the docs table from the results"
    )
    args = parser.parse_args()
    if args.docs_only:
        replace_marked_block(
            DOCS, "batch-table", table(json.loads(RESULTS.read_text())), title="Batch"
        )
        return 0
    listing = make_archive(args.scans)
    runs = []
    for workers in args.workers:
        runs.append(run_config(listing, workers, args.method, args.mode, args.time_limit))
        print(runs[-1], flush=True)
    payload = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "scans": args.scans,
        "method": args.method,
        "mode": args.mode,
        "runs": runs,
        "note": (
            "Wall time includes starting the worker processes and writing every output and the "
            "report; with a time limit, a run stops there and scans / min counts the scans done "
            "by then. Each worker's PyTorch uses the cores divided by the workers. The load "
            "average counts other work on the machine: above the number of cores, the workers "
            "wait for CPU and the scaling says more about that load than about the batch."
        ),
    }
    write_json(RESULTS, payload)
    replace_marked_block(DOCS, "batch-table", table(payload), title="Batch")
    print(table(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
