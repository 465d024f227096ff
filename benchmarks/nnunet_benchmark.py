"""Benchmark an nnU-Net v2 model in napari-uda: prediction against nnunetv2's own, and one-shot
adaptation on a shifted head.

The model is a small nnU-Net v2 trained-model folder in nnU-Net's exact format (a
``PlainConvUNet`` of 3 stages, 8-32 features, ``3d_fullres`` at 4 mm, patch 32^3, one fold,
mirroring on) trained for ``--steps`` Adam steps on the demo's source head (cached in
``benchmarks/_work/nnunet``; the folder writer is the tests' ``tests/nnunet_factory.py``). No
real nnU-Net model ships with napari-uda, so the Dice values show the mechanics on a model of
the right kind, not nnU-Net's accuracy.

Cases, each in a fresh process (so the peak memory is its own):

* ``nnunetv2``: nnunetv2's ``nnUNetPredictor`` on the demo's new-scanner head (time and
  memory of the reference tool, and the voxels whose label differs from napari-uda's);
* ``none``: napari-uda's prediction on the same head;
* ``tent``, ``adaent``, ``mean_teacher``: one-shot adaptation on that head through the engine
  (default settings except ``--epochs``; collapse guard on), Dice before and after.

Usage::

    .venv/bin/python benchmarks/nnunet_benchmark.py              # writes results and docs
    .venv/bin/python benchmarks/nnunet_benchmark.py --methods tent --no-docs

Writes ``benchmarks/results/nnunet.json`` and the table in ``docs/model-adapters.md`` (between
the ``nnunet-table`` markers), with the machine's load average (``uptime``) next to the times.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from _report import ROOT, machine, replace_marked_block, write_json

RESULTS = ROOT / "benchmarks" / "results" / "nnunet.json"
WORK = ROOT / "benchmarks" / "_work" / "nnunet"
DOCS = ROOT / "docs" / "model-adapters.md"
DEFAULT_METHODS = ("tent", "adaent", "mean_teacher")
PLAN = {"spacing": (4.0, 4.0, 4.0), "patch": (32, 32, 32), "features": (8, 16, 32)}


def model_folder(steps: int) -> Path:
    """The trained-model folder (trained once, then reused)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from napari_uda.core.volume import load_volume
    from napari_uda.data import demo_files
    from nnunet_factory import train_folder

    folder = (
        WORK / f"steps{steps}" / "Dataset901_DemoHead" / ("nnUNetTrainer__nnUNetPlans__3d_fullres")
    )
    if (folder / "fold_0" / "checkpoint_final.pth").exists():
        return folder
    files = demo_files()
    image, mask = load_volume(files.source_image), load_volume(files.source_mask)
    return train_folder(folder.parents[1], image, mask, steps=steps, **PLAN)


def dice(labels: np.ndarray, reference: np.ndarray) -> float:
    a, b = labels > 0, reference > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def measure_case(
    folder: Path, method: str, seed: int, epochs: int, *, tool: str, tool_labels, work: Path
) -> dict:
    """One case in this (fresh) process on the demo's new-scanner head: ``tool`` (the model's
    own tool, ``tool_labels(folder, image_path)``), ``none`` (napari-uda's prediction) or an
    adaptation method; Dice, volume, seconds, load and peak memory."""
    import torch

    from napari_uda.core.volume import load_volume
    from napari_uda.data import demo_files

    torch.set_num_threads(2)
    files = demo_files()
    image, mask = load_volume(files.target_image), load_volume(files.target_mask)
    reference = np.asarray(mask.data) > 0
    row: dict = {"method": method, "load_before": os.getloadavg()[0]}
    started = time.perf_counter()
    if method == tool:
        before = after = tool_labels(folder, files.target_image)
        np.save(work / f"{tool}_labels.npy", before)
    elif method == "none":
        from napari_uda.core.inference import predict_volume
        from napari_uda.core.models import load_model

        before = after = predict_volume(load_model(folder), image, device="cpu").labels
        theirs = work / f"{tool}_labels.npy"
        if theirs.exists():
            row["labels_differing_from_reference"] = int((np.load(theirs) != after).sum())
    else:
        from napari_uda.adaptation.engine import adapt
        from napari_uda.core.models import load_model

        settings = {"epochs": epochs}
        model = load_model(folder)
        result = adapt(model, image, method, settings, reference=mask, seed=seed, device="cpu")
        before, after = result.initial_prediction.labels, result.prediction.labels
        row["kept_checkpoint"] = f"step {result.checkpoint.step}: {result.checkpoint.reason}"
    row.update(
        seconds=time.perf_counter() - started,
        load_after=os.getloadavg()[0],
        peak_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        dice_before=dice(before, reference),
        dice_after=dice(after, reference),
        volume_ratio_after=float((after > 0).sum() / max(reference.sum(), 1)),
    )
    return row


def nnunet_labels(folder: Path, image_path: Path) -> np.ndarray:
    """nnunetv2's ``nnUNetPredictor`` on the scan (its defaults: mirroring, Gaussian)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from napari_uda.core.volume import load_volume

    image = load_volume(image_path)
    predictor = nnUNetPredictor(
        perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
    data = np.asarray(image.data, np.float32).transpose(2, 1, 0)[None]
    spacing = {"spacing": list(reversed(image.spacing))}
    labels = predictor.predict_single_npy_array(data, spacing, None, None, False)
    return labels.transpose(2, 1, 0)


def run_case(folder: Path, method: str, seed: int, epochs: int) -> dict:
    """One case (``nnunetv2``, ``none`` or a method) in this (fresh) process."""
    return measure_case(
        folder, method, seed, epochs, tool="nnunetv2", tool_labels=nnunet_labels, work=WORK
    )


def table(
    payload: dict,
    *,
    script: str = "nnunet_benchmark.py",
    model: str = "nnU-Net v2 model",
    reference: str = "nnunetv2's nnUNetPredictor",
) -> str:
    """The docs table of a run (also the MONAI bundle benchmark's)."""
    lines = [
        f"_Generated by `benchmarks/{script}` on {payload['date']} "
        f"({payload['machine']}, shared: load average {payload['load']}); the demo's "
        f"new-scanner head, a small {model} trained {payload['steps']} steps on the "
        f"source head; adaptation {payload['epochs']} epoch(s), seed {payload['seed']}._",
        "",
        "| case | Dice before | Dice after | volume / reference after | seconds (load) | "
        "peak memory (MB) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        if "error" in row:
            lines.append(f"| {row['method']} | – | – | – | – | – | not run: {row['error']} |")
            continue
        note = row.get("kept_checkpoint", "")
        differing = row.get("labels_differing_from_reference")
        if differing is not None:
            note = f"{differing} voxels labelled unlike {reference}"
        if row["method"] in ("nnunetv2", "bundle"):
            note = reference
        load = f"{row['load_before']:.0f}-{row['load_after']:.0f}"
        lines.append(
            f"| {row['method']} | {row['dice_before']:.3f} | **{row['dice_after']:.3f}** | "
            f"{row['volume_ratio_after']:.2f} | {row['seconds']:.1f} ({load}) | "
            f"{row['peak_memory_mb']:.0f} | {note} |"
        )
    return "\n".join(lines)


def arguments(
    description: str, methods: tuple[str, ...], results: Path, argv
) -> argparse.Namespace:
    """The command line both folder-model benchmarks take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--methods", nargs="*", default=list(methods))
    parser.add_argument("--steps", type=int, default=150, help="training steps of the model")
    parser.add_argument("--epochs", type=int, default=1, help="adaptation epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=results)
    parser.add_argument("--no-docs", action="store_true", help="do not update the docs table")
    parser.add_argument(
        "--only-methods",
        action="store_true",
        help="run only the methods; keep the other rows already in --out",
    )
    return parser.parse_args(argv)


def run_benchmark(run_case, folder: Path, cases: list[str], args, marker: str, **names) -> None:
    """Each case in a fresh process (its own peak memory), then the results file and the docs
    table between ``marker`` markers (``names``: :func:`table`'s wording)."""
    rows = []
    if args.only_methods and args.out.exists():
        cases = cases[2:]
        rows = [r for r in json.loads(args.out.read_text())["rows"] if r["method"] not in cases]
    for method in cases:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            try:
                row = pool.submit(run_case, folder, method, args.seed, args.epochs).result()
            except Exception as error:  # report and go on with the next case
                row = {"method": method, "error": str(error).splitlines()[0]}
        rows.append(row)
        print(row, flush=True)
    loads = [r[k] for r in rows if "error" not in r for k in ("load_before", "load_after")]
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "load": f"{min(loads):.0f}-{max(loads):.0f}" if loads else "?",
        "steps": args.steps,
        "epochs": args.epochs,
        "seed": args.seed,
        "rows": rows,
    }
    write_json(args.out, payload)
    if not args.no_docs:
        replace_marked_block(DOCS, marker, table(payload, **names), title="Model adapters")


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], DEFAULT_METHODS, RESULTS, argv)
    folder = model_folder(args.steps)
    run_benchmark(run_case, folder, ["nnunetv2", "none", *args.methods], args, "nnunet-table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
