"""The cases of a batch: which scans, with which optional reference and corrections, under which
unique id (the name of the case's output folder and its key in the manifest).

Scans come from a glob pattern (``'scans/*.nii.gz'``), a folder (its NIfTI files), a list of
paths, or a CSV file with an ``image`` column and optional ``reference`` and ``corrections``
columns (relative paths are relative to the CSV's folder; empty cells mean none).
"""

from __future__ import annotations

import csv
import glob
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.volume import is_nifti_path

#: CSV columns: the scan (required) and optional per-scan files.
IMAGE_COLUMN, OPTIONAL_COLUMNS = "image", ("reference", "corrections")


class CaseError(ValueError):
    """The list of scans cannot be used (one line naming the file or pattern)."""


@dataclass(frozen=True)
class Case:
    """One scan of the batch.

    Attributes:
        case_id: unique, file-name safe (the scan's name without ``.nii.gz``; ``_2``... when
            two scans share a name).
        image: the scan.
        reference: a reference label map on the scan's grid (QA Dice only; never trained on).
        corrections: a correction label volume (-1 = not corrected) for adaptation.
    """

    case_id: str
    image: str
    reference: str | None = None
    corrections: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "image": self.image,
            "reference": self.reference,
            "corrections": self.corrections,
        }


def scan_stem(path: str | os.PathLike) -> str:
    """A file's name without its NIfTI suffix, made file-name safe."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scan"


def _unique_ids(rows: Sequence[dict[str, str | None]]) -> list[Case]:
    cases, taken = [], set()
    for row in rows:
        stem = base = scan_stem(row["image"])
        number = 2
        while stem in taken:
            stem, number = f"{base}_{number}", number + 1
        taken.add(stem)
        cases.append(Case(stem, **row))
    return cases


def _read_csv(path: Path) -> list[dict[str, str | None]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip().lower() for name in reader.fieldnames or []]
        if IMAGE_COLUMN not in columns:
            raise CaseError(
                f"{path}: needs an '{IMAGE_COLUMN}' column (found: {', '.join(columns)})"
            )
        rows = []
        for record in reader:
            record = {k.strip().lower(): (v or "").strip() for k, v in record.items() if k}
            if not record.get(IMAGE_COLUMN):
                continue
            row = {}
            for column in (IMAGE_COLUMN, *OPTIONAL_COLUMNS):
                value = record.get(column) or None
                if value is not None and not Path(value).is_absolute():
                    value = str(path.parent / value)
                row[column] = value
            rows.append(row)
    return rows


def _expand(images: str | os.PathLike) -> list[str]:
    text = str(images)
    if Path(text).is_dir():
        return sorted(str(p) for p in Path(text).iterdir() if is_nifti_path(p))
    if glob.has_magic(text):
        return sorted(p for p in glob.glob(text) if is_nifti_path(p))
    return [text]


def plan_cases(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Case]:
    """The cases for ``images``: a glob pattern, a folder, a CSV file, or a list of these; all
    paths made absolute.

    Every scan and every reference or corrections file must exist; scans must be NIfTI.

    Raises:
        CaseError: nothing matched, a file is missing or not NIfTI, a scan is listed twice.
    """
    sources = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    rows: list[dict[str, str | None]] = []
    for source in sources:
        if str(source).lower().endswith(".csv"):
            if not Path(source).is_file():
                raise CaseError(f"{source}: no such CSV file")
            rows += _read_csv(Path(source))
            continue
        expanded = _expand(source)
        if not expanded:
            raise CaseError(f"{source}: matches no .nii or .nii.gz file")
        rows += [{"image": path, "reference": None, "corrections": None} for path in expanded]
    if not rows:
        raise CaseError("no scans given")
    _check_rows(rows)
    absolute = [{k: v and str(Path(v).resolve()) for k, v in row.items()} for row in rows]
    return _unique_ids(absolute)  # absolute: workers may run in other folders or on other nodes


def _check_rows(rows: Sequence[dict[str, str | None]]) -> None:
    seen: set[Path] = set()
    for row in rows:
        for column, path in row.items():
            if path is None:
                continue
            if not Path(path).is_file():
                raise CaseError(f"{path}: no such file ({column})")
            if not is_nifti_path(path):
                raise CaseError(f"{path}: is not a .nii or .nii.gz file ({column})")
        resolved = Path(row["image"]).resolve()
        if resolved in seen:
            raise CaseError(f"{row['image']}: listed twice")
        seen.add(resolved)


def choose_site_cases(
    cases: Sequence[Case], chosen: Sequence[str] = (), count: int = 3, seed: int = 0
) -> list[Case]:
    """The scans a site model adapts on: those named in ``chosen`` (case ids, file names or
    paths), else ``count`` scans drawn with ``seed`` (all of them when there are fewer).

    Raises:
        CaseError: a chosen scan is not in the batch.
    """
    if chosen:
        picked = []
        for name in chosen:
            matches = [
                case
                for case in cases
                if name in (case.case_id, Path(case.image).name)
                or Path(name).resolve() == Path(case.image).resolve()
            ]
            if not matches:
                raise CaseError(f"{name}: is not one of the batch's scans")
            picked += [case for case in matches if case not in picked]
        return picked
    if count < 1:
        raise CaseError(f"the site sample needs at least 1 scan, not {count}")
    ordered = sorted(cases, key=lambda case: case.case_id)
    return sorted(random.Random(seed).sample(ordered, min(count, len(ordered))), key=ordered.index)
