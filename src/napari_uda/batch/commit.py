"""A case's outputs appear all together or not at all: they are written into a hidden staging
folder next to the case's folder, which is renamed into place at the end (one atomic rename on
the same file system). A staging folder left by a killed worker is removed by the next run
(:func:`remove_stale_staging`); the case then runs again.
"""

from __future__ import annotations

import os
import shutil
from contextlib import AbstractContextManager
from pathlib import Path

from ..core.outputs import staged_folder as core_staged_folder

#: Prefix of the hidden staging folders (never a case id: case ids do not start with a dot).
STAGING_PREFIX = ".staging-"


def staged_folder(final: str | os.PathLike) -> AbstractContextManager[Path]:
    """Yield an empty hidden folder beside ``final``; on success it replaces ``final`` (an
    existing ``final``, from an older run of the case, is removed first); on any error or
    interruption it is deleted and ``final`` is left as it was
    (:func:`napari_uda.core.outputs.staged_folder` with this module's prefix)."""
    return core_staged_folder(final, prefix=STAGING_PREFIX, replace=True)


def remove_stale_staging(folder: str | os.PathLike) -> int:
    """Delete staging folders left in ``folder`` by an interrupted run; how many there were."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [path for path in folder.iterdir() if path.name.startswith(STAGING_PREFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)
