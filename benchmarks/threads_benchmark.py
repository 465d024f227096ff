"""Benchmark the thread policy against PyTorch's default, on an idle-ish and on a loaded machine.

The same ``napari-uda adapt`` (demo model, TENT, the demo's new-scanner head, reference mask for
Dice) runs in a fresh process in two configurations:

* ``default``: what napari-uda did before the policy: torch imported before napari-uda (so the
  OpenMP runtime starts with its own waiting policy: spin, then sleep) and one thread per core
  (``--threads`` = torch's default);
* ``policy``: the command as users run it (``--threads auto``, OpenMP told not to spin).

Each configuration runs ``--repeats`` times, alternating, with the machine as it is
(``idle``: on a shared machine never really idle, so the 1-minute load average is recorded
next to every time) and under a known competing load started here (``loaded``: one busy-loop
process per core, on top of whatever else runs, ended after the run). Recorded per run: wall
time of the process, the seconds the command reports for the adaptation, the threads it used,
Dice after adaptation (the result must not depend on the threads beyond float noise), and the
load average before the run. Medians per configuration and condition go into the table.

Usage::

    .venv/bin/python benchmarks/threads_benchmark.py                 # 3 repeats, 2 epochs
    .venv/bin/python benchmarks/threads_benchmark.py --repeats 5 --epochs 5

Writes ``benchmarks/results/threads.json`` and the table in ``docs/performance.md`` (between the
``threads-table`` markers); both come from a run, never by hand.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import ROOT, machine, publish

RESULTS = ROOT / "benchmarks" / "results" / "threads.json"
DOCS = ROOT / "docs" / "performance.md"
#: Seconds a competing busy loop runs at most (it is ended after each run anyway).
BUSY_LIMIT = 900.0
#: The launcher of the ``default`` configuration: torch first, then the CLI.
DEFAULT_LAUNCHER = (
    "import sys, torch; n = torch.get_num_threads(); from napari_uda.cli import main; "
    "sys.exit(main(sys.argv[1:] + ['--threads', str(n)]))"
)
POLICY_LAUNCHER = "import sys; from napari_uda.cli import main; sys.exit(main(sys.argv[1:]))"


def _busy(deadline: float) -> None:  # pragma: no cover - runs in a child
    while time.time() < deadline:
        pass


def _clean_environment() -> dict[str, str]:
    """This environment without the settings under test (thread counts, OpenMP waiting)."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")
    environment = {k: v for k, v in os.environ.items() if k not in names}
    environment["PYTHONPATH"] = str(ROOT / "src")
    return environment


def _adapt_command(launcher: str, work: Path, epochs: int) -> list[str]:
    from napari_uda.data import demo_files

    files = demo_files(require_model=True)
    return [
        sys.executable,
        "-c",
        launcher,
        "adapt",
        "--model",
        str(files.model),
        "--image",
        str(files.target_image),
        "--reference",
        str(files.target_mask),
        "--method",
        "tent",
        "--set",
        f"epochs={epochs}",
        "--out",
        str(work / "mask.nii.gz"),
        "--report",
        str(work / "report.json"),
    ]


def run_once(config: str, condition: str, epochs: int) -> dict:
    """One ``napari-uda adapt`` in a fresh process; its times, threads, Dice and the load."""
    launcher = DEFAULT_LAUNCHER if config == "default" else POLICY_LAUNCHER
    busy = []
    if condition == "loaded":
        context = multiprocessing.get_context("spawn")
        deadline = time.time() + BUSY_LIMIT
        busy = [context.Process(target=_busy, args=(deadline,)) for _ in range(os.cpu_count())]
        for process in busy:
            process.start()
        time.sleep(2.0)  # let the loops take the cores before the command chooses its threads
    load = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory() as folder:
            command = _adapt_command(launcher, Path(folder), epochs)
            started = time.perf_counter()
            done = subprocess.run(
                command, env=_clean_environment(), capture_output=True, text=True, check=False
            )
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"{config}/{condition} failed: {done.stderr.strip()[-400:]}")
            report = json.loads((Path(folder) / "report.json").read_text())
    finally:
        for process in busy:
            process.terminate()
            process.join()
    threads = re.search(r"threads (\d+)[^\n]*", done.stderr)
    adapt_seconds = re.search(r"in ([0-9.]+) s; kept step", done.stderr)
    dice = [round(d, 4) for d in report["dice_after"] or []]
    return {
        "config": config,
        "condition": condition,
        "wall_seconds": round(wall, 2),
        "adapt_seconds": float(adapt_seconds.group(1)) if adapt_seconds else None,
        "threads": int(threads.group(1)) if threads else None,
        "threads_reason": threads.group(0) if threads else None,
        "dice_after": dice,
        "load_1min_before": round(load, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
    }


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for condition in ("idle", "loaded"):
        for config in ("default", "policy"):
            mine = [r for r in runs if r["config"] == config and r["condition"] == condition]
            if not mine:
                continue
            rows.append(
                {
                    "condition": condition,
                    "config": config,
                    "runs": len(mine),
                    "median_wall_seconds": statistics.median(r["wall_seconds"] for r in mine),
                    "wall_seconds": [r["wall_seconds"] for r in mine],
                    "threads": sorted({r["threads"] for r in mine if r["threads"]}),
                    "loads": [r["load_1min_before"] for r in mine],
                    "dice_after": sorted({json.dumps(r["dice_after"]) for r in mine}),
                }
            )
    return rows


def table(rows: list[dict], payload: dict) -> str:
    lines = [
        f"Measured on {payload['machine']}, {payload['date']}, {payload['epochs']} TENT epochs "
        "on the demo head; each run a fresh `napari-uda adapt` process, configurations "
        "alternating. The machine was shared with other work throughout: `load` is the "
        "1-minute load average before each run (the competing load of *loaded*, one busy loop "
        "per core, comes on top of it). Times vary with that load; compare within a condition.",
        "",
        "| condition | configuration | threads | median wall s | wall s (each run) | "
        "load before each run | policy speed-up |",
        "|---|---|---|---:|---|---|---:|",
    ]
    medians = {(r["condition"], r["config"]): r["median_wall_seconds"] for r in rows}
    for row in rows:
        default = medians.get((row["condition"], "default"))
        ratio = (
            f"{default / row['median_wall_seconds']:.2f}x"
            if row["config"] == "policy" and default
            else ""
        )
        lines.append(
            f"| {row['condition']} | {row['config']} | "
            f"{', '.join(map(str, row['threads']))} | {row['median_wall_seconds']:.1f} | "
            f"{', '.join(f'{s:.0f}' for s in row['wall_seconds'])} | "
            f"{', '.join(f'{x:.1f}' for x in row['loads'])} | {ratio} |"
        )
    lines += [
        "",
        "*default*: torch's one thread per core, OpenMP's own waiting (spin, then "
        "sleep); *policy*: `--threads auto` with OpenMP told not to spin (napari-uda's "
        "default now).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--conditions", nargs="+", default=["idle", "loaded"])
    parser.add_argument(
        "--from-log",
        type=Path,
        help="summarise the runs printed (one JSON line each) by an interrupted run instead",
    )
    args = parser.parse_args(argv)
    runs = []
    if args.from_log:
        lines = args.from_log.read_text().splitlines()
        runs = [json.loads(line) for line in lines if line.startswith('{"config"')]
    for repeat in range(0 if args.from_log else args.repeats):
        for condition in args.conditions:
            configs = ("default", "policy") if repeat % 2 == 0 else ("policy", "default")
            for config in configs:
                run = run_once(config, condition, args.epochs)
                runs.append(run)
                print(json.dumps(run), flush=True)
    payload = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "epochs": args.epochs,
        "runs": runs,
    }
    payload["summary"] = summarise(runs)
    publish(RESULTS, payload, DOCS, "threads-table", table(payload["summary"], payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
