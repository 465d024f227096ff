"""Benchmark correct-then-adapt with a simulated user, against doing nothing and "just paint".

A simulated user looks at the current mask (the latest round's, corrections kept) and each round

* ``slices``: scrolls to the axial slice with the most wrong voxels, at least ``GAP`` slices
  away from the ones it already corrected, and corrects it fully (the reference on that slice);
* ``stroke``: in that slice, draws one stroke along the middle of the largest wrong region (its
  skeleton, 3 voxels wide) with the right label, nothing else.

Then one round adapts the *current* model (the previous round's) with all corrections so far
(:func:`napari_uda.adaptation.engine.adapt` with ``corrections=``), and the final mask keeps the
corrections (:func:`napari_uda.adaptation.rounds.keep_corrections`). Recorded per round: Dice,
surface Dice, volume against the reference (ml and ratio), seconds, the process's peak memory and
the load average; after the last round: carry-over (the adapted model on another head under the
same scanner) and forgetting (on a clean head). Baselines: no adaptation, the best label-free
method of the case, and "just paint" (the same corrections pasted into the unadapted mask).

Cases (``--cases``):

* ``demo``: the demo bundle on the demo's new-scanner head; carry-over on the demo's source
  head under the same ``new_scanner`` profile, forgetting on the target head before the
  scanner simulation;
* ``deepbet_<head>``: deepbet on a real head (``mni152``, ``robex``: see deepbet_benchmark.py)
  under :data:`BREAKING_PROFILE`, a scanner that breaks it (Dice 0.80 / 0.62); carry-over
  on the other head under the same profile, forgetting on the clean head.

Usage::

    .venv/bin/python benchmarks/corrections_benchmark.py --cases demo --rounds 10
    .venv/bin/python benchmarks/corrections_benchmark.py --cases deepbet_mni152 --rounds 5

Writes ``benchmarks/results/corrections.json`` and the tables in ``docs/corrections.md``
(between the ``corrections-table`` markers); both come from a run, never by hand.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from _report import ROOT, TOLERANCE_MM, machine, replace_marked_block, write_json

RESULTS = ROOT / "benchmarks" / "results" / "corrections.json"
DOCS = ROOT / "docs" / "corrections.md"
REPORTED_ROUNDS = (1, 2, 3, 5, 10)
#: Slices between two corrected slices of the simulated user, at least.
GAP = 3
#: The simulated scanner that breaks deepbet (napari_uda.simulation's ``inverted`` profile).
BREAKING_PROFILE = "inverted"


@dataclass
class Scan:
    image: object
    reference: np.ndarray


@dataclass
class Case:
    name: str
    model: object
    target: Scan
    carry_over: Scan
    clean: Scan
    label_free: str
    settings: dict
    label_free_settings: dict


def _axial(volume) -> int:
    return next(i for i, code in enumerate(volume.axcodes) if str(code).upper() in "SI")


def _demo_case() -> Case:
    from napari_uda.core.models import load_model
    from napari_uda.core.volume import load_volume
    from napari_uda.data import demo_files
    from napari_uda.simulation import simulate_scanner

    files = demo_files()

    def scan(image, mask) -> Scan:
        return Scan(image, (np.asarray(load_volume(mask).data) > 0).astype(np.int64))

    source = simulate_scanner(load_volume(files.source_image), "new_scanner", seed=7)
    return Case(
        "demo",
        load_model(files.model),
        scan(load_volume(files.target_image), files.target_mask),
        scan(source, files.source_mask),
        scan(load_volume(files.target_clean_image), files.target_mask),
        "tent",
        {},
        {},
    )


def _deepbet_case(head: str) -> Case:
    import deepbet_benchmark

    from napari_uda.core.models import load_model
    from napari_uda.core.volume import load_volume
    from napari_uda.simulation import simulate_scanner

    profile = BREAKING_PROFILE
    other = "robex" if head == "mni152" else "mni152"

    def scan(name: str, shifted: bool) -> Scan:
        image_path, mask_path = deepbet_benchmark.HEADS[name]()
        image = load_volume(image_path)
        image = simulate_scanner(image, profile, seed=0) if shifted else image
        return Scan(image, (np.asarray(load_volume(mask_path).data) > 0).astype(np.int64))

    return Case(
        f"deepbet_{head}",
        load_model("deepbet"),
        scan(head, True),
        scan(other, True),
        scan(head, False),
        "adaent",
        {},  # deepbet's recommended_settings("corrections")
        {},
    )


def load_case(name: str) -> Case:
    if name == "demo":
        return _demo_case()
    return _deepbet_case(name.removeprefix("deepbet_"))


# -- the simulated user --------------------------------------------------------------------------
def worst_slice(labels: np.ndarray, reference: np.ndarray, axis: int, taken: list[int]) -> int:
    """The slice along ``axis`` with the most wrong voxels, ``GAP`` slices from every taken one."""
    others = tuple(a for a in range(labels.ndim) if a != axis)
    wrong = (labels != reference).sum(axis=others).astype(np.int64)
    for index in taken:
        wrong[max(0, index - GAP) : index + GAP + 1] = -1
    return int(np.argmax(wrong))


def stroke(labels: np.ndarray, reference: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Boolean mask of one stroke (3 voxels wide) along the skeleton of the largest wrong
    region of slice ``index``."""
    from scipy.ndimage import binary_dilation, label
    from skimage.morphology import skeletonize

    cut = [slice(None)] * labels.ndim
    cut[axis] = index
    wrong = np.take(labels, index, axis=axis) != np.take(reference, index, axis=axis)
    regions, count = label(wrong)
    mask = np.zeros(labels.shape, dtype=bool)
    if count:
        sizes = np.bincount(regions.ravel())[1:]
        region = regions == 1 + int(np.argmax(sizes))
        line = binary_dilation(skeletonize(region), iterations=1) & region
        mask[tuple(cut)] = line
    return mask


def next_corrections(user, corrections, labels, reference, axis, taken) -> np.ndarray:
    """The user's corrections after one more round (a new array)."""
    from napari_uda.core.corrections import NOT_CORRECTED

    index = worst_slice(labels, reference, axis, taken)
    taken.append(index)
    corrections = corrections.copy()
    if user == "slices":
        cut = [slice(None)] * labels.ndim
        cut[axis] = index
        corrections[tuple(cut)] = reference[tuple(cut)]
    else:
        mask = stroke(labels, reference, axis, index)
        corrections[mask] = reference[mask]
    assert (corrections != NOT_CORRECTED).any() or user == "stroke"
    return corrections


# -- measuring ---------------------------------------------------------------------------------
def scores(labels: np.ndarray, scan: Scan) -> dict:
    from napari_uda.core.metrics import compute_metrics, volume_ml

    metrics = compute_metrics(labels, scan.reference, scan.image.spacing, tolerance_mm=TOLERANCE_MM)
    volume = volume_ml(labels, scan.image.spacing, 2)[1]
    truth = volume_ml(scan.reference, scan.image.spacing, 2)[1]
    return {
        "dice": metrics[1]["dice"],
        "surface_dice": metrics[1]["surface_dice"],
        "volume_ml": volume,
        "volume_ratio": volume / truth if truth else None,
    }


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _predict(model, scan: Scan) -> np.ndarray:
    from napari_uda.core.inference import predict_volume

    return predict_volume(model, scan.image, device="cpu").labels


def no_adaptation(case: Case) -> dict:
    """The unadapted model on the target, the carry-over head and the clean head."""
    return {
        "target": scores(_predict(case.model, case.target), case.target),
        "carry_over": scores(_predict(case.model, case.carry_over), case.carry_over),
        "clean": scores(_predict(case.model, case.clean), case.clean),
    }


def label_free(case: Case) -> dict:
    """The case's best label-free method on the target (the model's recommended settings)."""
    from napari_uda.adaptation.engine import adapt
    from napari_uda.core.models import load_model

    model = load_model("deepbet") if case.name.startswith("deepbet") else case.model
    load, started, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    result = adapt(model, case.target.image, case.label_free, case.label_free_settings,
                   seed=0, device="cpu")  # fmt: skip
    return {
        "method": case.label_free,
        "target": scores(result.prediction.labels, case.target),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "load": load,
    }


def run_user(case_name: str, user: str, rounds: int, method: str, threads: int) -> dict:
    """One simulated user on one case, ``rounds`` rounds; rows per round and the final checks."""
    import torch

    from napari_uda.adaptation.engine import adapt
    from napari_uda.adaptation.rounds import RoundHistory, keep_corrections
    from napari_uda.core.corrections import NOT_CORRECTED

    torch.set_num_threads(threads)
    case = load_case(case_name)
    target = case.target
    axis = _axial(target.image)
    unadapted = _predict(case.model, target)
    history = RoundHistory(case.model)
    corrections = np.full(target.reference.shape, NOT_CORRECTED, dtype=np.int16)
    labels, taken, rows = unadapted, [], []
    for number in range(1, rounds + 1):
        corrections = next_corrections(user, corrections, labels, target.reference, axis, taken)
        load, started, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
        given = target.image.with_data(corrections)
        result = adapt(history.model(), target.image, method, case.settings,
                       corrections=given, seed=number, device="cpu")  # fmt: skip
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        history.record(result, corrections)
        labels = keep_corrections(result.prediction.labels, corrections)
        row = {
            "round": number,
            "slice": taken[-1],
            "seconds": seconds,
            "cpu_seconds": cpu,
            "load": load,
        }
        row.update(scores(labels, target))
        row["model_only_dice"] = scores(result.prediction.labels, target)["dice"]
        row["just_paint"] = scores(keep_corrections(unadapted, corrections), target)
        row["peak_memory_mb"] = _peak_mb()
        rows.append(row)
        print(f"{case_name} {user} round {number}: Dice {row['dice']:.3f} (paint "
              f"{row['just_paint']['dice']:.3f}) volume x{row['volume_ratio']:.2f} "
              f"{seconds:.1f} s load {load:.1f}", flush=True)  # fmt: skip
    final = history.model()
    run = {"case": case_name, "user": user, "method": method, "rounds": rows}
    run.update(other_scans(final, case))
    return run


def other_scans(final, case: Case) -> dict:
    """The final model on the carry-over and the clean head, as *Apply to other scans* gives
    it: the adapted mask's scores and whether the check warned (it gates each scan against
    the unadapted model, label-free)."""
    from napari_uda.adaptation.rounds import check_other_scans

    scans = {"carry_over": case.carry_over, "clean": case.clean}
    checks = check_other_scans(final, case.model, [scan.image for scan in scans.values()])
    found = {}
    for (key, scan), check in zip(scans.items(), checks):
        found[key] = scores(check.prediction.labels, scan)
        found[key]["check"] = {
            "warned": bool(check.warning),
            "gate_keeps": check.decision.keep,
            "warning": check.warning,
        }
    return found


def _in_process(function, *args):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def _baseline_for(name: str, which: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    case = load_case(name)
    return no_adaptation(case) if which == "none" else label_free(case)


# -- report ------------------------------------------------------------------------------------
def rounds_to(rows: list[dict], level: float) -> int | None:
    return next((row["round"] for row in rows if row["dice"] >= level), None)


def _fmt(value, spec: str) -> str:
    """``value`` formatted, or a dash for a value the run did not record."""
    return "–" if value is None else format(value, spec)


def case_tables(payload: dict) -> str:
    parts = []
    for name, case in payload["cases"].items():
        none, free = case["baselines"]["none"], case["baselines"].get("label_free")
        line = (
            f"### {name}\n\nNo adaptation: Dice {none['target']['dice']:.3f} (volume x"
            f"{none['target']['volume_ratio']:.2f}); "
        )
        if free:
            line += (
                f"best label-free ({free['method']}): Dice {free['target']['dice']:.3f} (volume "
                f"x{free['target']['volume_ratio']:.2f}, {free['seconds']:.0f} s at load "
                f"{free['load']:.1f}).\n"
            )
        else:
            line += "label-free baseline not run.\n"
        parts.append(line)
        lines = [
            "| user | round | Dice | surface Dice | volume (ml) | volume ratio | just paint Dice"
            " | gain over paint | seconds | CPU seconds | load | peak memory (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run in case["users"]:
            for row in run["rounds"]:
                if row["round"] not in REPORTED_ROUNDS and row["round"] != len(run["rounds"]):
                    continue
                gain = row["dice"] - row["just_paint"]["dice"]
                lines.append(
                    f"| {run['user']} | {row['round']} | **{row['dice']:.3f}** | "
                    f"{_fmt(row.get('surface_dice'), '.3f')} | "
                    f"{_fmt(row.get('volume_ml'), '.0f')} | {row['volume_ratio']:.2f} | "
                    f"{row['just_paint']['dice']:.3f} | {gain:+.3f} | {row['seconds']:.1f} | "
                    f"{_fmt(row.get('cpu_seconds'), '.1f')} | "
                    f"{row['load']:.1f} | {_fmt(row.get('peak_memory_mb'), '.0f')} |"
                )
        parts.append("\n".join(lines))
        summary = [
            "| user | rounds to 0.90 | rounds to 0.95 | carry-over Dice (before -> after) | "
            "clean head Dice (before -> after) | *Apply to other scans* says (carry-over; "
            "clean) |",
            "|---|---|---|---|---|---|",
        ]
        for run in case["users"]:
            checks = []
            for key in ("carry_over", "clean"):
                before, after = none[key]["dice"], (run.get(key) or {}).get("dice")
                text = f"{before:.3f} -> {_fmt(after, '.3f')}"
                checks.append(text + (f" ({after - before:+.3f})" if after is not None else ""))
            warned = [_warned((run.get(key) or {}).get("check")) for key in ("carry_over", "clean")]
            summary.append(
                f"| {run['user']} | {rounds_to(run['rounds'], 0.90) or '-'} | "
                f"{rounds_to(run['rounds'], 0.95) or '-'} | {checks[0]} | {checks[1]} | "
                f"{'; '.join(warned)} |"
            )
            if run.get("note"):
                summary.append(f"| {run['user']} | {run['note']} | | | | |")
        parts.append("\n".join(summary))
    return "\n\n".join(parts)


def _warned(check: dict | None) -> str:
    """What *Apply to other scans* said on a scan: "may be worse" (the gate would keep the
    unadapted model there), "check the mask" (another warning), "no"; "-" for a run from
    before the check was measured."""
    if check is None:
        return "-"
    if check["gate_keeps"] == "source":
        return "may be worse"
    return "check the mask" if check["warned"] else "no"


def write_docs(payload: dict) -> None:
    body = (
        f"_Generated by `benchmarks/corrections_benchmark.py` on {payload['date']} "
        f"({payload['machine']}, {payload['threads']} threads, shared: the load average is "
        f"next to every time); surface Dice at {TOLERANCE_MM} mm; method "
        f"`{payload['method']}`._\n\n{case_tables(payload)}"
    )
    replace_marked_block(DOCS, "corrections-table", body, title="Correct, then adapt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["demo", "deepbet_mni152"])
    parser.add_argument("--users", nargs="*", default=["slices", "stroke"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--method", default="corrections")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=cast_path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--docs-only", action="store_true", help="rewrite the docs table from --out, run nothing"
    )
    parser.add_argument("--no-label-free", action="store_true", help="skip the label-free baseline")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep what --out holds beyond this run: other cases, other users, and the "
        "label-free baseline with --no-label-free",
    )
    args = parser.parse_args(argv)
    if args.docs_only:
        write_docs(json.loads(args.out.read_text()))
        return 0
    cases = {}
    if args.append and args.out.exists():
        cases = json.loads(args.out.read_text())["cases"]
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "threads": args.threads,
        "method": args.method,
        "gap": GAP,
        "breaking_profile": BREAKING_PROFILE,
        "deepbet_settings": _deepbet_recommendation(),
        "cases": cases,
    }
    for name in args.cases:
        none = _in_process(_baseline_for, name, "none", args.threads)
        kept = cases.get(name, {})  # --append: the users and baselines this run does not redo
        others = [run for run in kept.get("users", []) if run["user"] not in args.users]
        cases[name] = {"baselines": {**kept.get("baselines", {}), "none": none}, "users": others}
        write_json(args.out, payload)
        for user in args.users:
            run = _in_process(run_user, name, user, args.rounds, args.method, args.threads)
            cases[name]["users"].append(run)
            cases[name]["users"].sort(key=lambda run: run["user"] != "slices")
            write_json(args.out, payload)  # partial results survive a stop
        if not args.no_label_free:
            free = _in_process(_baseline_for, name, "label_free", args.threads)
            cases[name]["baselines"]["label_free"] = free
            write_json(args.out, payload)
    if not args.no_docs:
        write_docs(payload)
    print(f"wrote {args.out}")
    return 0


def _deepbet_recommendation() -> dict:
    """deepbet's recommended corrections settings (what the deepbet cases run with)."""
    from napari_uda.core.models.deepbet import RECOMMENDED_SETTINGS

    return dict(RECOMMENDED_SETTINGS["corrections"])


def cast_path(text: str):
    from pathlib import Path

    return Path(text)


if __name__ == "__main__":
    sys.exit(main())
