"""The work of one case, run inside a Dask worker process (also callable directly).

:func:`process_case` reads the scan, predicts it with the source model ("before"), adapts a copy
one-shot (``per-scan``) or predicts with the site model (``site``), asks the gate whether to keep
the adapted mask, and commits the case's folder ``cases/<id>/`` (``labels.nii.gz``,
``entropy.nii.gz``, ``montage.png``, ``case.json``) in one rename.

Bad input (a corrupt or missing scan, a reference on another grid, a method the model cannot
take) is the case's own problem: it returns a ``failed`` record with one line and is not retried.
Any other exception propagates, so Dask retries the task (``retries``) and the driver records the
last error. :func:`adapt_site_model` adapts the site model of ``site`` mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..core.volume import Volume, load_volume, one_line, save_volume
from .cases import Case
from .commit import staged_folder
from .job import BatchJob
from .manifest import CASE_RECORD
from .quality import case_metrics, gate_record
from .threads import set_torch_threads

#: Files of a finished case, inside ``cases/<id>/``.
OUTPUT_FILES = {
    "labels": "labels.nii.gz",
    "entropy": "entropy.nii.gz",
    "montage": "montage.png",
    "record": CASE_RECORD,
}
SITE_FOLDER = "site_model"


class CaseInputError(ValueError):
    """A case that cannot run because of its input files (one line)."""


@lru_cache(maxsize=4)
def _cached_model(path: str, modified: float):
    from ..core.models import load_model

    return load_model(path)


def load_model_cached(path: str):
    """The model at ``path``, loaded once per worker process (reloaded when the file changes).
    Callers never modify it: the engine adapts copies."""
    return _cached_model(str(Path(path).resolve()), Path(path).stat().st_mtime)


def reset_peak_memory() -> None:
    """Start a new peak of resident memory for this process (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float:
    """This process's peak resident memory (MB) since :func:`reset_peak_memory` (Linux), or
    since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_inputs(case: Case) -> tuple[Volume, np.ndarray | None]:
    volume = load_volume(case.image)
    reference = None
    if case.reference:
        reference_volume = load_volume(case.reference)
        if reference_volume.shape != volume.shape:
            raise CaseInputError(
                f"{case.reference}: shape {reference_volume.shape} does not match the scan's "
                f"{volume.shape}"
            )
        reference = np.rint(np.asarray(reference_volume.data)).astype(np.int64)
    return volume, reference


def _gate_setup(job: BatchJob, model) -> dict[str, Any]:
    """The gate's expected volumes (the model's, with the job's ranges replacing them), its
    options and the resolved device."""
    from ..adaptation.gate import GateOptions
    from ..core.device import resolve_device
    from ..core.plausibility import merge_expected, parse_expected_volumes

    user = parse_expected_volumes(job.expected_volume, model.class_names, where="--expected-volume")
    return {
        "expected": merge_expected(model.expected_volumes(), user),
        "options": GateOptions(gate=job.gate),
        "device": resolve_device(job.device),
        "seed": job.seed,
    }


def _per_scan(case: Case, job: BatchJob, volume: Volume, model, gating: dict):
    """Adapt a copy of ``model`` one-shot to the scan (with its corrections, if any), then gate
    the run as ``napari-uda adapt`` does (unless the engine already gated it)."""
    from ..adaptation.engine import adapt
    from ..adaptation.gate import apply_gate

    corrections = load_volume(case.corrections) if case.corrections else None
    run = {"seed": job.seed, "device": gating["device"], "corrections": corrections}
    result = adapt(model, volume, job.method, list(job.settings), **run)
    decision = result.gate or apply_gate(result, model, [volume], **gating)
    details = {
        "stop_reason": result.stop_reason,
        "kept_step": result.checkpoint.step,
        "kept_reason": result.checkpoint.reason,
    }
    if corrections is not None:
        details["corrections"] = result.extra.get("corrections")
    return result.initial_prediction, result.prediction, decision, details


def _predictions(case: Case, job: BatchJob, volume: Volume):
    """(before, kept, gate decision, details) for the job's mode."""
    from .quality import gate_site_case

    model = load_model_cached(job.model)
    gating = _gate_setup(job, model)
    if job.mode == "site":
        site_model = load_model_cached(job.site_model)
        return (*gate_site_case(model, site_model, volume, **gating), {})
    return _per_scan(case, job, volume, model, gating)


def _commit(case: Case, job: BatchJob, volume: Volume, final, before, record: dict) -> dict:
    from .montage import write_montage

    outputs = {"labels": OUTPUT_FILES["labels"], "montage": OUTPUT_FILES["montage"]}
    if job.write_entropy:
        outputs["entropy"] = OUTPUT_FILES["entropy"]
    record["outputs"] = {key: f"cases/{case.case_id}/{name}" for key, name in outputs.items()}
    with staged_folder(job.case_dir(case.case_id)) as stage:
        save_volume(final.label_volume(), stage / outputs["labels"], dtype=np.uint8)
        if job.write_entropy:
            save_volume(final.entropy_volume(), stage / outputs["entropy"], dtype=np.float32)
        write_montage(volume, before.labels, final.labels, stage / outputs["montage"])
        (stage / CASE_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def process_case(case: Case, job: BatchJob) -> dict[str, Any]:
    """Run one case and commit its outputs; returns its manifest record (``state`` ``done`` or
    ``failed`` with ``reason``). See the module's docstring for what is retried."""
    set_torch_threads(job.torch_threads)
    reset_peak_memory()
    started = time.perf_counter()
    record: dict[str, Any] = {"worker": f"{socket.gethostname()}:{os.getpid()}"}
    try:
        volume, reference = _read_inputs(case)
        before, final, decision, details = _predictions(case, job, volume)
    except ValueError as error:  # VolumeError, AdaptationError, model errors: the input's fault
        reason = one_line(error)
        name = Path(case.image).name
        named = any(path and Path(path).name in reason for path in case.as_dict().values())
        reason = reason if named else f"{name}: {reason}"
        return {**record, "state": "failed", "reason": reason, "seconds": _since(started)}
    model = load_model_cached(job.model)
    record.update(details)
    record["gate"] = gate_record(decision)
    record["metrics"] = case_metrics(before, final, model.num_classes, reference)
    record.update(state="done", seconds=_since(started), peak_memory_mb=peak_memory_mb())
    return _commit(case, job, volume, final, before, record)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def adapt_site_model(job: BatchJob, site_cases: list[Case]) -> dict[str, Any]:
    """Adapt a copy of the model on the site scans together and commit it to
    ``<out>/site_model/`` (a bundle, or TorchScript with its spec); returns its record with the
    model's path relative to the output folder."""
    from ..adaptation.engine import adapt
    from ..adaptation.report import jsonable

    set_torch_threads(job.torch_threads)
    started = time.perf_counter()
    model = load_model_cached(job.model)
    if not model.can_save:
        raise CaseInputError(f"{job.model}: this kind of model cannot be saved as a site model")
    volumes = [load_volume(case.image) for case in site_cases]
    first = site_cases[0].corrections  # the engine takes corrections on the first volume
    corrections = load_volume(first) if first else None
    result = adapt(model, volumes, job.method, list(job.settings), seed=job.seed,
                   device=job.device, corrections=corrections)  # fmt: skip
    name = f"site_model{model.save_suffix}"
    provenance = {"method": job.method, "settings": result.settings, "seed": job.seed}
    provenance.update({"from": job.model, "scans": [case.image for case in site_cases]})
    with staged_folder(Path(job.out_dir) / SITE_FOLDER) as stage:
        result.model.save(stage / name, provenance={"adapted": jsonable(provenance)})
    return {
        "state": "done",
        "model": f"{SITE_FOLDER}/{name}",
        "scans": [case.case_id for case in site_cases],
        "seconds": _since(started),
        "stop_reason": result.stop_reason,
        "kept_step": result.checkpoint.step,
        "kept_reason": result.checkpoint.reason,
    }
