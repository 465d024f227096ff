"""The manifest: ``manifest.json`` in the output folder records the batch's settings and every
case's state, so that a rerun resumes where the last run stopped.

States: ``pending`` (not run yet, or interrupted), ``running``, ``done`` (its outputs are in
``cases/<id>/``), ``failed`` (with a one-line ``reason``). The file is rewritten atomically after
every change of state, so it is always a consistent snapshot. A case's own ``cases/<id>/case.json``
is committed together with its outputs; on opening, the manifest trusts those folders: a case
whose folder exists is done (even if the run died before the manifest said so), a ``done`` case
whose folder is gone runs again, and ``running`` cases (the run was interrupted) run again.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..core.volume import atomic_output
from .cases import Case
from .job import BatchJob

MANIFEST_NAME = "manifest.json"
CASE_RECORD = "case.json"
STATES = ("pending", "running", "done", "failed")
VERSION = 1


class ManifestError(ValueError):
    """The output folder holds another batch, or an unreadable manifest (one line)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """Every case's state in a batch's output folder (see the module's docstring)."""

    def __init__(self, path: Path, identity: dict[str, Any], cases: dict[str, dict[str, Any]]):
        self.path = path
        self.identity = identity
        self.cases = cases
        self.site: dict[str, Any] = {}

    @classmethod
    def open(cls, job: BatchJob, cases: list[Case]) -> Manifest:
        """The manifest of ``job.out_dir``, created or resumed, with ``cases`` added as pending
        where new, and reconciled with the case folders on disk. Not saved yet.

        Raises:
            ManifestError: the folder holds a batch with other settings, or a broken manifest.
        """
        path = Path(job.out_dir) / MANIFEST_NAME
        identity = job.identity()
        manifest = cls(path, identity, {})
        if path.exists():
            manifest._load(identity)
        for case in cases:
            record = manifest.cases.setdefault(case.case_id, {"state": "pending"})
            record.update(case.as_dict())
        manifest._reconcile(job)
        return manifest

    def _load(self, identity: dict[str, Any]) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            stored, cases = data["batch"], data["cases"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ManifestError(f"{self.path}: not a readable batch manifest ({error})") from None
        different = [key for key in identity if stored.get(key) != identity[key]]
        if different:
            key = different[0]
            raise ManifestError(
                f"{self.path.parent}: holds a batch with another {key} ({stored.get(key)!r}, "
                f"now {identity[key]!r}); choose another output folder"
            )
        self.cases = {str(k): dict(v) for k, v in cases.items()}
        self.site = dict(data.get("site") or {})

    def _reconcile(self, job: BatchJob) -> None:
        for case_id, record in self.cases.items():
            committed = job.case_dir(case_id) / CASE_RECORD
            if committed.is_file() and record.get("state") != "done":
                try:
                    record.update(json.loads(committed.read_text(encoding="utf-8")))
                    record["state"] = "done"
                    record.pop("reason", None)
                except (OSError, ValueError):
                    record.update(state="pending", reason="its outputs were unreadable")
            elif record.get("state") == "done" and not committed.is_file():
                record.update(state="pending", reason="its outputs were missing")
            elif record.get("state") == "running":
                record.update(state="pending", reason="interrupted")

    # -- states ---------------------------------------------------------------------------------
    def ids(self, *states: str) -> list[str]:
        """Case ids in one of ``states`` (all when none given), in the manifest's order."""
        return [k for k, v in self.cases.items() if not states or v.get("state") in states]

    def counts(self) -> dict[str, int]:
        counted = Counter(record.get("state", "pending") for record in self.cases.values())
        return {state: counted.get(state, 0) for state in STATES}

    def mark(self, case_id: str, state: str, **fields: Any) -> None:
        """Set a case's state (and fields such as ``reason``) and save the manifest."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        record = self.cases[case_id]
        if state == "running":
            record.pop("reason", None)
            record["started"] = now()
        record.update(fields, state=state)
        if state in ("done", "failed"):
            record["finished"] = now()
        self.save()

    def save(self) -> Path:
        """Write the manifest atomically (a reader sees the old or the new one, never half)."""
        payload = {
            "version": VERSION,
            "batch": self.identity,
            "updated": now(),
            "counts": self.counts(),
            "site": self.site,
            "cases": self.cases,
        }
        with atomic_output(self.path) as temporary:
            Path(temporary).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        return self.path


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The saved manifest of ``out_dir`` as a dict (for reports and tests)."""
    return json.loads((Path(out_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
