"""*Apply to folder...* of the Export widget: the last run's method and settings, applied to every
scan of a folder with ``napari-uda batch``'s machinery (:mod:`napari_uda.batch`) on a local Dask
cluster of worker processes, from a napari thread worker so the viewer never waits.

Progress arrives through a Qt signal (emitted on the worker thread, delivered on the GUI
thread); :meth:`FolderBatch.stop` asks the driver to cancel the cases not yet finished, which
stay ``pending`` in the manifest: applying to the same folder again resumes.
"""

from __future__ import annotations

import functools
from pathlib import Path

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal

from ..batch.cases import plan_cases
from ..batch.job import BatchJob, settings_as_text
from ..batch.run import BatchOutcome, BatchProgress, run_archive
from ..batch.threads import usable_cores


def local_workers() -> int:
    """Worker processes for a batch started from napari: all cores but one for the viewer."""
    return max(1, usable_cores() - 1)


def folder_job(result, model_source: str, scans: Path, out_dir: Path, device: str) -> BatchJob:
    """The batch of a finished run (its method and settings) over the NIfTI files of ``scans``.

    Raises:
        ValueError: the folder holds no scans (one line).
    """
    from ..data import demo_files

    model = demo_files().model if model_source == "demo model" else Path(model_source)
    plan_cases(scans)  # checked now: one line if the folder holds no scans
    return BatchJob(
        model=str(model.resolve()) if model.is_file() else model_source,  # or a name: deepbet
        method=result.method,
        out_dir=str(out_dir.resolve()),
        settings=settings_as_text(result.settings),
        seed=result.seed if result.seed is not None else 0,
        device=device,
    )


class BatchCall(functools.partial):
    """The batch's function as napari's close prompt lists it ("Executing ...")."""

    def __str__(self) -> str:
        batch = self.args[0]
        return (
            f"the napari-uda batch of {batch.scans}.\nClosing the window stops it: finished "
            f"scans stay in {batch.job.out_dir}; Apply to folder again to resume."
        )

    __repr__ = __str__


class FolderBatch(QObject):
    """One batch in the background: ``progress`` (a :class:`BatchProgress`) on each case,
    ``worker.returned`` with the :class:`BatchOutcome`, ``worker.errored`` on failure."""

    progress = Signal(object)

    def __init__(self, job: BatchJob, scans: Path, workers: int | None = None):
        super().__init__()
        self.job, self.scans = job, scans
        self.workers = workers or local_workers()
        self.stop_requested = False
        self.worker = None

    def start(self, on_done, on_error):
        """Start the thread worker (returned): ``on_done(outcome)``, ``on_error(exception)``."""
        self.worker = create_worker(BatchCall(FolderBatch._run, self), _start_thread=False)
        self.worker.returned.connect(on_done)
        self.worker.errored.connect(on_error)
        self.worker.start()
        return self.worker

    def stop(self) -> None:
        self.stop_requested = True

    def _should_stop(self) -> bool:
        """Stop pressed, or napari quitting the worker (the viewer closes: napari then waits for
        the batch to cancel its cases and close its cluster)."""
        return self.stop_requested or bool(self.worker and self.worker.abort_requested)

    def _run(self) -> BatchOutcome:
        return run_archive(
            self.job,
            plan_cases(self.scans),
            workers=self.workers,
            on_progress=self._emit,
            should_stop=self._should_stop,
        )

    def _emit(self, progress: BatchProgress) -> None:
        self.progress.emit(BatchProgress(**vars(progress)))  # a copy: the driver goes on


def describe(progress: BatchProgress) -> str:
    """One status line: counts and time left."""
    counts = [f"{progress.done} done"]
    counts += [f"{progress.failed} failed"] if progress.failed else []
    counts += [f"{progress.skipped} finished before"] if progress.skipped else []
    line = f"Batch: {progress.finished}/{progress.total} scans ({', '.join(counts)})"
    left = progress.remaining_seconds
    if left is not None and progress.finished < progress.total:
        line += f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
    if progress.message and not progress.last_case:
        line += f": {progress.message}"
    return line
