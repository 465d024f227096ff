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

import sys
from pathlib import Path

import numpy as np
from _report import ROOT
from nnunet_benchmark import arguments, measure_case, run_benchmark

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


def bundle_labels(folder: Path, image_path: Path) -> np.ndarray:
    """The bundle's own components (MONAI's ConfigParser evaluating the whole config)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from monai_bundle_factory import bundle_own_prediction

    return bundle_own_prediction(folder, image_path)[0].numpy()


def run_case(folder: Path, method: str, seed: int, epochs: int) -> dict:
    """One case (``bundle``, ``none`` or a method) in this (fresh) process."""
    return measure_case(
        folder, method, seed, epochs, tool="bundle", tool_labels=bundle_labels, work=WORK
    )


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], DEFAULT_METHODS, RESULTS, argv)
    folder = bundle_folder(args.steps)
    cases = ["bundle", "none", *args.methods]
    names = {
        "script": "monai_bundle_benchmark.py",
        "model": "MONAI bundle",
        "reference": "the bundle's own components",
    }
    run_benchmark(run_case, folder, cases, args, "monai-bundle-table", **names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
