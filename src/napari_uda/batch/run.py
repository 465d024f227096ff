"""The batch driver on ``dask.distributed``.

:func:`open_client` starts a ``LocalCluster`` of worker *processes* (PyTorch holds the GIL while
it computes, so threads would not run cases in parallel; one thread per worker, PyTorch threads =
the cores shared among the workers) or connects to an existing scheduler. :func:`run_batch`
submits one task per unfinished case with Dask's ``retries`` and collects them with
``as_completed``, writing the manifest after every case; :func:`run_archive` does both and
writes the report. Scheduling, retries and worker failures are Dask's; the driver only records.

Stopping (``should_stop`` returning True, e.g. the napari Stop button) and Ctrl-C cancel the
futures not yet finished, put their cases back to ``pending`` and leave a consistent manifest; a
rerun with the same settings resumes.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.volume import one_line
from .case_task import adapt_site_model, process_case
from .cases import Case, choose_site_cases
from .commit import remove_stale_staging
from .job import BatchJob
from .manifest import MANIFEST_NAME, Manifest, now
from .threads import openmp_environment, threads_for_cluster, threads_per_worker, usable_cores

#: Dask retries of a case whose task raised an unexpected error (bad input is not retried).
DEFAULT_RETRIES = 1
#: How often the driver checks for a stop while no case finishes (seconds).
STOP_POLL_SECONDS = 0.2


@dataclass
class BatchProgress:
    """Where a batch stands, sent to ``on_progress`` after every finished case."""

    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    elapsed: float = 0.0
    last_case: str = ""
    last_state: str = ""
    message: str = ""
    stopped: bool = False

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped

    @property
    def remaining_seconds(self) -> float | None:
        """Time left at the pace of this run's finished cases (None before the first)."""
        ran = self.done + self.failed
        if ran == 0:
            return None
        return self.elapsed / ran * (self.total - self.finished)


@dataclass
class BatchOutcome:
    """The end of a run: counts, whether it was stopped, and the report's paths."""

    progress: BatchProgress
    manifest: Path
    report: dict[str, Path] = field(default_factory=dict)


def dashboard_available() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def open_client(
    workers: int = 1, scheduler: str | None = None, dashboard: bool = False
) -> Iterator[Any]:
    """A ``distributed.Client``: on ``scheduler`` (an address) if given, else on a new
    ``LocalCluster`` of ``workers`` processes with one thread each (dashboard on a free port
    when ``dashboard`` and bokeh is installed). The local cluster is closed on leaving."""
    import logging

    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with warnings.catch_warnings(), _children_ignore_ctrl_c():
        # "port 8787 in use, using another": the printed link says which
        warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":8787" if dashboard and dashboard_available() else None,
            silence_logs=logging.ERROR,
            env=openmp_environment(threads_per_worker(usable_cores(), workers)),
        )
    with cluster, Client(cluster) as client:
        yield client


@contextmanager
def _children_ignore_ctrl_c() -> Iterator[None]:
    """Start worker processes with Ctrl-C ignored (they inherit it): Ctrl-C in a terminal goes
    to the whole process group, and the driver alone should handle it (cancel, record, close
    the cluster, which ends the workers) instead of every worker printing a traceback. Only
    possible from the main thread; elsewhere (napari's thread worker) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cluster_torch_threads(client: Any, local_workers: int | None) -> int:
    """PyTorch threads per worker: the local cores shared by ``local_workers``, or, on an
    existing cluster, the smallest share of its host's cores any worker gets."""
    if local_workers:
        return threads_per_worker(usable_cores(), local_workers)
    workers = client.scheduler_info()["workers"]
    cores = client.run(usable_cores)
    return threads_for_cluster(cores, {address: info["host"] for address, info in workers.items()})


def _site_job(
    client, job: BatchJob, manifest: Manifest, cases: list[Case], retries: int
) -> BatchJob:
    """In ``site`` mode, adapt the site model once (as a Dask task) unless the manifest says it
    exists; the job that predicts with it."""
    site = manifest.site
    path = Path(job.out_dir) / site.get("model", "-")
    if site.get("state") != "done" or not path.is_file():
        chosen = choose_site_cases(cases, job.site_scans, seed=job.seed)
        future = client.submit(adapt_site_model, job, chosen, retries=retries, pure=False)
        try:
            manifest.site = future.result()
        except ValueError as error:
            raise ValueError(f"the site model could not be adapted: {one_line(error)}") from None
        manifest.save()
        path = Path(job.out_dir) / manifest.site["model"]
    return replace(job, site_model=str(path))


def _record(future, case_id: str) -> dict[str, Any]:
    """A finished future's manifest record (an exception after Dask's retries is a failure)."""
    if future.status == "finished":
        return future.result()
    if future.status == "cancelled":
        return {"state": "pending", "reason": "cancelled"}
    return {"state": "failed", "reason": f"{case_id}: {one_line(future.exception())}"}


def run_batch(
    client: Any,
    job: BatchJob,
    cases: list[Case],
    *,
    retries: int = DEFAULT_RETRIES,
    on_progress: Callable[[BatchProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BatchOutcome:
    """Run every unfinished case of ``cases`` on ``client`` (see the module's docstring)."""
    from distributed import as_completed

    manifest = Manifest.open(job, cases)
    remove_stale_staging(job.cases_dir)
    remove_stale_staging(job.out_dir)
    manifest.save()
    progress = BatchProgress(total=len(cases), skipped=len(manifest.ids("done")))
    started = time.perf_counter()
    if job.mode == "site" and manifest.ids("pending", "failed"):
        progress.message = "adapting the site model"
        _notify(on_progress, progress)
        job = _site_job(client, job, manifest, cases, retries)
    todo = [case for case in cases if manifest.cases[case.case_id]["state"] != "done"]
    token = uuid.uuid4().hex[:8]
    futures = {}
    for case in todo:
        key = f"napari-uda-case-{case.case_id}-{token}"
        futures[client.submit(process_case, case, job, key=key, retries=retries, pure=False)] = case
        manifest.cases[case.case_id].update(state="running", submitted=now())
        manifest.cases[case.case_id].pop("reason", None)
    manifest.save()
    progress.message = f"{len(todo)} to run, {progress.skipped} finished before"
    _notify(on_progress, progress)
    try:
        _collect(
            as_completed(futures), futures, manifest, progress, started, on_progress, should_stop
        )
    finally:  # stop, Ctrl-C or an error: the unfinished cases go back to pending
        unfinished = [future for future in futures if not future.done()]
        client.cancel(unfinished)
        for case_id in manifest.ids("running"):
            manifest.cases[case_id].update(state="pending", reason="interrupted")
        manifest.save()
    progress.elapsed = time.perf_counter() - started
    return BatchOutcome(progress, manifest.path)


def _collect(completed, futures, manifest, progress, started, on_progress, should_stop) -> None:
    """Record the futures as Dask completes them; checks ``should_stop`` between them (every
    :data:`STOP_POLL_SECONDS`), so a stop does not wait for the next case to finish."""
    while not completed.is_empty():
        if should_stop is not None and should_stop():
            progress.stopped = True
            return
        finished = completed.next_batch(block=False)
        if not finished:
            time.sleep(STOP_POLL_SECONDS)
        for future in finished:
            case = futures[future]
            record = _record(future, case.case_id)
            manifest.mark(case.case_id, record.pop("state"), **record)
            state = manifest.cases[case.case_id]["state"]
            progress.done += state == "done"
            progress.failed += state == "failed"
            progress.elapsed = time.perf_counter() - started
            progress.last_case, progress.last_state = case.case_id, state
            progress.message = manifest.cases[case.case_id].get("reason", "")
            _notify(on_progress, progress)


def _notify(on_progress, progress: BatchProgress) -> None:
    if on_progress is not None:
        on_progress(progress)


def run_archive(
    job: BatchJob,
    cases: list[Case],
    *,
    workers: int = 1,
    scheduler: str | None = None,
    dashboard: bool = False,
    on_client: Callable[[Any], None] | None = None,
    **kwargs: Any,
) -> BatchOutcome:
    """Open the cluster (:func:`open_client`), run the batch (:func:`run_batch`, ``kwargs``),
    close the cluster and write the report (also after a stop or Ctrl-C). ``job.torch_threads``
    None is chosen from the cluster (:func:`cluster_torch_threads`). ``on_client`` gets the
    client once it runs (the CLI prints its dashboard link)."""
    from .report import write_report

    try:
        with open_client(workers, scheduler, dashboard) as client:
            if on_client is not None:
                on_client(client)
            if job.torch_threads is None:
                threads = cluster_torch_threads(client, None if scheduler else workers)
                job = replace(job, torch_threads=threads)
            outcome = run_batch(client, job, cases, **kwargs)
    finally:
        if not scheduler:  # the local workers are gone: nothing writes into the folder now
            remove_stale_staging(job.cases_dir)
            remove_stale_staging(job.out_dir)
            if (Path(job.out_dir) / MANIFEST_NAME).is_file():  # a case that finished while
                Manifest.open(job, cases).save()  # the cluster closed is done, not pending
        report = write_report(job.out_dir)
    outcome.report = report
    return outcome
