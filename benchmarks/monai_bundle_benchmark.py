"""Benchmark a MONAI bundle in napari-uda: prediction against the bundle's own components, and
one-shot adaptation on a shifted head.

The bundle is a small one in the Model Zoo's layout (a MONAI ``UNet`` with BatchNorm, 8-32
features, 4 mm, Gaussian sliding windows of 32^3) trained for ``--steps`` Adam steps on the
demo's source head (cached in ``benchmarks/_work/monai_bundle``; the bundle writer is the tests'
``tests/monai_bundle_factory.py``). No real bundle ships with napari-uda, so the Dice values show
the mechanics on a model of the right kind.

Cases, each in a fresh process: ``bundle`` (the bundle's own components, MONAI's ConfigParser
evaluating the whole config), ``none`` (napari-uda's prediction), and the methods (one-shot on
the demo's new-scanner head through the engine, ``--epochs`` epochs).

Usage::

    .venv/bin/python benchmarks/monai_bundle_benchmark.py

Writes ``benchmarks/results/monai_bundle.json`` and the table in ``docs/model-adapters.md``
(between the ``monai-bundle-table`` markers), with the load average next to the times.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from _report import ROOT, machine, replace_marked_block, write_json
from nnunet_benchmark import dice, table

RESULTS = ROOT / "benchmarks" / "results" / "monai_bundle.json"
WORK = ROOT / "benchmarks" / "_work" / "monai_bundle"
DOCS = ROOT / "docs" / "model-adapters.md"
DEFAULT_METHODS = ("tent", "adabn", "adaent")


def bundle_folder(steps: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from monai_bundle_factory import train_bundle
    from napari_uda.core.volume import load_volume
    from napari_uda.data import demo_files

    folder = WORK / f"steps{steps}" / "brain_bundle"
    if (folder / "models" / "model.pt").exists():
        return folder
    files = demo_files()
    image, mask = load_volume(files.source_image), load_volume(files.source_mask)
    return train_bundle(folder, image, mask, steps=steps)


def run_case(folder: Path, method: str, seed: int, epochs: int) -> dict:
    import torch

    from napari_uda.core.volume import load_volume
    from napari_uda.data import demo_files

    torch.set_num_threads(2)
    files = demo_files()
    image, mask = load_volume(files.target_image), load_volume(files.target_mask)
    reference = np.asarray(mask.data) > 0
    row: dict = {"method": method, "load_before": os.getloadavg()[0]}
    started = time.perf_counter()
    if method == "bundle":
        sys.path.insert(0, str(ROOT / "tests"))
        from monai_bundle_factory import bundle_own_prediction

        labels, _ = bundle_own_prediction(folder, files.target_image)
        before = after = labels.numpy()
        np.save(WORK / "bundle_labels.npy", before)
    elif method == "none":
        from napari_uda.core.inference import predict_volume
        from napari_uda.core.models import load_model

        before = after = predict_volume(load_model(folder), image, device="cpu").labels
        theirs = WORK / "bundle_labels.npy"
        if theirs.exists():
            row["labels_differing_from_reference"] = int((np.load(theirs) != after).sum())
    else:
        from napari_uda.adaptation.engine import adapt
        from napari_uda.core.models import load_model

        settings = {"epochs": epochs} if method != "adabn" else {}
        result = adapt(
            load_model(folder), image, method, settings, reference=mask, seed=seed, device="cpu"
        )
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    parser.add_argument("--steps", type=int, default=150, help="training steps of the model")
    parser.add_argument("--epochs", type=int, default=1, help="adaptation epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true", help="do not update the docs table")
    args = parser.parse_args(argv)
    folder = bundle_folder(args.steps)
    rows = []
    for method in ["bundle", "none", *args.methods]:
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
        body = table(
            payload,
            script="monai_bundle_benchmark.py",
            model="MONAI bundle",
            reference="the bundle's own components",
        )
        replace_marked_block(DOCS, "monai-bundle-table", body, title="Model adapters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
