"""``napari-uda batch``: adapt and segment a whole archive on dask.distributed, resumably, with a
QA report (see docs/batch.md and :mod:`napari_uda.batch`).

Everything is checked before a worker starts (scans, model, method, settings, output folder, a
resumed folder's settings); bad input prints one line and exits 2. A scan that fails on a worker
is recorded in the manifest and the report and the others go on; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import CLIError, add_settings_option
from .expected_volume import add_expected_volume_option, expected_volumes


def add_parser(subparsers) -> None:
    from ..batch.job import MODES

    parser = subparsers.add_parser(
        "batch",
        help="adapt and segment many scans on a Dask cluster, resumably, with a QA report",
        description=(
            "Adapt MODEL to every scan (mode per-scan) or once to a few scans of the site and "
            "predict all of them with that site model (mode site), on a local cluster of "
            "worker processes or an existing Dask scheduler. DIR gets manifest.json (rerun to "
            "resume), cases/<case>/ (labels, entropy, montage) and report.csv / report.html."
        ),
    )
    parser.add_argument("--model", required=True, help="model (bundle .safetensors, .pt, deepbet)")
    parser.add_argument(
        "--images",
        required=True,
        nargs="+",
        help="scans: glob patterns ('scans/*.nii.gz', quoted), folders, files, or a CSV with an "
        "'image' column and optional 'reference' and 'corrections' columns",
    )
    parser.add_argument("--method", required=True, help="adaptation method (see `methods`)")
    parser.add_argument(
        "--out", required=True, help="output folder DIR (created; reused to resume)"
    )
    parser.add_argument("--mode", choices=MODES, default="per-scan", help="default per-scan")
    add_settings_option(parser, "settings", "a method setting, e.g. --set epochs=5 (repeatable)")
    parser.add_argument(
        "--site-scans", nargs="+", default=[], help="site mode: the scans to adapt on (names)"
    )
    parser.add_argument(
        "--site-sample",
        type=int,
        default=3,
        help="site mode: else this many scans drawn with --seed (default 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda", "mps"),
        help="compute device on each worker (default auto: CUDA, then MPS, then CPU)",
    )
    parser.add_argument(
        "--workers", type=int, help="local worker processes (default: one per GPU, else per core)"
    )
    parser.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)")
    parser.add_argument(
        "--torch-threads", type=int, help="PyTorch threads per worker (default: cores / workers)"
    )
    parser.add_argument(
        "--retries", type=int, default=1, help="Dask retries of a case that raised (default 1)"
    )
    add_expected_volume_option(parser)
    parser.add_argument(
        "--no-gate",
        action="store_true",
        help="keep every adapted mask (no keep-or-roll-back check against the source model)",
    )
    parser.add_argument("--no-entropy", action="store_true", help="do not write entropy maps")
    parser.add_argument(
        "--no-dashboard", action="store_true", help="no Dask dashboard (it needs bokeh)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def default_workers(device: str) -> int:
    """One worker per GPU on CUDA, else one per usable core."""
    from ..batch.threads import usable_cores

    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    return usable_cores()


def _check_model(args) -> None:
    from ..adaptation.plan import plan_run
    from ..core.models import load_model

    model = load_model(args.model)
    plan_run(model, args.method, args.settings, model_name=args.model)
    if args.mode == "site" and not model.can_save:
        raise CLIError(f"{args.model}: site mode saves the site model; this model cannot be saved")
    expected_volumes(args, model)  # checked against the model's classes now


def _check_out(args, cases) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: is a file, not a folder")
    outputs = (out / "cases").resolve()
    for case in cases:
        for path in filter(None, case.as_dict().values()):
            if outputs in Path(path).resolve().parents:
                raise CLIError(
                    f"{path}: lies inside the outputs {outputs}; inputs are never overwritten"
                )


def build_job(args, cases):
    """The :class:`BatchJob` of ``args`` after checking everything (one line on error)."""
    from ..batch.cases import choose_site_cases
    from ..batch.job import BatchJob

    for flag in ("workers", "torch_threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be at least 1")
    _check_model(args)
    _check_out(args, cases)
    site_scans: tuple[str, ...] = ()
    if args.mode == "site":
        chosen = choose_site_cases(cases, args.site_scans, args.site_sample, args.seed)
        site_scans = tuple(case.case_id for case in chosen)
    return BatchJob(
        model=str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        method=args.method,
        out_dir=str(Path(args.out).resolve()),
        mode=args.mode,
        settings=tuple(args.settings),
        seed=args.seed,
        device=args.device,
        torch_threads=args.torch_threads,
        write_entropy=not args.no_entropy,
        site_scans=site_scans,
        expected_volume=tuple(args.expected_volume),
        gate=not args.no_gate,
    )


class ProgressBar:
    """A tqdm bar on stderr (counts, rate, time left); failures are printed above it."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, progress) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=progress.total,
                initial=progress.skipped,
                unit="scan",
                desc="napari-uda batch",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        if progress.last_state == "failed":
            self.bar.write(f"napari-uda batch: {progress.last_case} failed: {progress.message}")
        elif progress.message and not progress.last_case:
            self.bar.write(f"napari-uda batch: {progress.message}")
        self.bar.n = progress.finished
        self.bar.set_postfix(done=progress.done, failed=progress.failed, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from ..batch.cases import plan_cases
    from ..batch.manifest import Manifest, read_manifest
    from ..batch.run import dashboard_available, run_archive

    cases = plan_cases(args.images)
    job = build_job(args, cases)
    Manifest.open(job, cases)  # a folder holding another batch is refused before any work
    workers = args.workers or default_workers(args.device)
    bar = ProgressBar(args.quiet)

    def announce(client) -> None:
        where = args.scheduler or f"a local cluster of {workers} worker process(es)"
        local_dashboard = not args.no_dashboard and dashboard_available()
        link = client.dashboard_link if args.scheduler or local_dashboard else None
        line = f"napari-uda batch: {len(cases)} scan(s), {job.mode}, {job.method} on {where}"
        if not args.quiet:
            print(line + (f"; dashboard {link}" if link else ""), file=sys.stderr, flush=True)

    try:
        outcome = run_archive(
            job,
            cases,
            workers=workers,
            scheduler=args.scheduler,
            dashboard=not args.no_dashboard,
            on_client=announce,
            retries=args.retries,
            on_progress=bar,
        )
    except KeyboardInterrupt:
        bar.close()
        try:
            counts = read_manifest(job.out_dir)["counts"]
        except (OSError, ValueError, KeyError):  # stopped before the manifest was written
            counts = {"done": 0, "pending": len(cases)}
        print(
            f"napari-uda batch: interrupted; {counts['done']} case(s) done are kept, "
            f"{counts['pending']} pending: rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        bar.close()
    progress = outcome.progress
    if not args.quiet:
        print(
            f"napari-uda batch: {progress.done} done, {progress.failed} failed, {progress.skipped} "
            f"finished before, in {progress.elapsed:.0f} s; report {outcome.report.get('html')}",
            file=sys.stderr,
        )
    return 1 if progress.failed else 0
