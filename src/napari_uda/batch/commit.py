"""A case's outputs appear all together or not at all: they are written into a hidden staging
folder next to the case's folder, which is renamed into place at the end (one atomic rename on
the same file system). A staging folder left by a killed worker is removed by the next run
(:func:`remove_stale_staging`); the case then runs again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Prefix of the hidden staging folders (never a case id: case ids do not start with a dot).
STAGING_PREFIX = ".staging-"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final``; on success it replaces ``final`` (an
    existing ``final``, from an older run of the case, is removed first); on any error or
    interruption it is deleted and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{final.name}-", dir=final.parent))
    try:
        os.chmod(stage, 0o777 & ~_UMASK)  # a normal folder once in place (mkdtemp makes 0o700)
        yield stage
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-", dir=final.parent))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def remove_stale_staging(folder: str | os.PathLike) -> int:
    """Delete staging folders left in ``folder`` by an interrupted run; how many there were."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [path for path in folder.iterdir() if path.name.startswith(STAGING_PREFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)
