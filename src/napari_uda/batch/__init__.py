"""Batch adaptation and prediction of a whole archive on ``dask.distributed``.

Headless; the CLI (``napari-uda batch``) and the Export widget's *Apply to folder...* drive it.

* :mod:`.cases`: which scans form the batch (a glob or a CSV with optional reference and
  corrections columns), each with a unique case id; the seeded choice of a site mode's scans.
* :mod:`.manifest`: the resumable record of every case's state in the output folder.
* :mod:`.commit`: a case's outputs appear together (one folder renamed into place) or not at all.
* :mod:`.job`: what to run (model, method, mode, settings) as one picklable dataclass.
* :mod:`.case_task`: the work of one case, run inside a Dask worker process.
* :mod:`.montage`, :mod:`.report`: the QA montage per case, the CSV and the HTML report.
* :mod:`.run`: the driver: a ``LocalCluster`` of processes (or a given scheduler), futures,
  ``as_completed``, Dask's retries, progress, stop and Ctrl-C.

Nothing in ``core`` or ``adaptation`` imports this package; ``dask.distributed`` is imported only
where a cluster is used (the ``batch`` extra).
"""
