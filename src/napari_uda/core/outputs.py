"""Outputs that appear all together or not at all: :class:`OutputSet`.

A command or a widget that writes several files (a mask, an entropy map, a model with its spec, a
report) registers every one of them *before* the work starts. Registering checks the location at
once, so a bad one is reported in one line naming the folder the user gave, before minutes of
computation:

* the file is not an input (inputs are never overwritten), not given twice and not a folder;
* an existing file is refused unless ``overwrite`` is set;
* the folder exists or can be made (no part of it is a file) and can be written to: a hidden
  staging folder ``.napari-uda-*`` is created in it right away, which proves it.

The writers then write to :meth:`OutputSet.staged` paths (same file names, inside the staging
folder, so multi-file writers such as a TorchScript model with its ``.json`` spec work unchanged).
:meth:`OutputSet.commit` moves every file into place at the end; if one move fails, the files
already moved are removed again and any file they replaced is put back. On any error or Ctrl-C
before the commit (:meth:`OutputSet.discard`, also run on leaving the ``with`` block), the staging
folders and the folders the set created are removed: nothing half-made is left. A process killed
outright (``kill -9``) can leave a hidden ``.napari-uda-*`` folder behind, never a partial output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .volume import _current_umask, one_line

STAGING_PREFIX = ".napari-uda-"
T = TypeVar("T")


@contextlib.contextmanager
def staged_folder(
    final: str | os.PathLike, *, prefix: str = STAGING_PREFIX, replace: bool = False
) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final`` (named ``prefix`` + its name) to write a
    whole folder into; when the block ends it is renamed to ``final``, so the folder appears
    whole or not at all. With ``replace`` an existing ``final`` is removed first; without it
    (the default) ``final`` must not exist. On any error or interruption (Ctrl-C included) the
    staged folder is deleted and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{final.name}-", dir=final.parent))
    try:
        os.chmod(stage, 0o777 & ~_current_umask())  # mkdtemp makes 0o700
        yield stage
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{prefix}old-", dir=final.parent))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


class OutputError(ValueError):
    """An output location that cannot be used, or a set that could not be committed (one line)."""


class OutputSet:
    """Files written together: check first, stage, then move all into place (or none).

    Args:
        overwrite: whether an existing file may be replaced (default True, as the CLI does;
            the Export widget passes its "Replace existing files" box).
        protected: files that must never be written (the inputs).

    Use as a context manager; leaving the block without :meth:`commit` discards everything::

        with OutputSet(protected=[image]) as outputs:
            outputs.add(mask_path, "--out")
            ...  # the work
            save_volume(mask, outputs.staged(mask_path))
            outputs.commit()
    """

    def __init__(self, *, overwrite: bool = True, protected: Iterable[str | os.PathLike] = ()):
        self.overwrite = overwrite
        self.protected = {Path(p).resolve() for p in protected if p}
        self._files: dict[Path, Path] = {}  # destination (as given) -> staged path
        self._resolved: dict[Path, str] = {}  # resolved destination -> what it is
        self._stages: dict[Path, Path] = {}  # resolved folder -> its staging folder
        self._created: list[Path] = []  # folders made by the set, outermost first
        self.committed = False

    # -- checking ---------------------------------------------------------------------------
    def add(self, path: str | os.PathLike, what: str = "output") -> Path:
        """Register ``path`` (``what`` names it in messages, e.g. ``--out``) and check its
        location now. Returns the staged path to write to.

        Raises:
            OutputError: one line naming the file or folder the user gave.
        """
        path = Path(path)
        resolved = path.resolve()
        if resolved in self.protected:
            raise OutputError(
                f"{what} {path}: would overwrite an input; inputs are never overwritten"
            )
        if resolved in self._resolved:
            raise OutputError(f"{what} {path}: is also given as {self._resolved[resolved]}")
        if resolved.is_dir():
            raise OutputError(f"{what} {path}: is a folder; give a file name")
        if resolved.exists() and not self.overwrite:
            raise OutputError(
                f"{what} {path}: exists already; choose another name or allow replacing files"
            )
        stage = self._stage_for(path.parent, what)
        self._resolved[resolved] = f"{what} {path}"
        self._files[path] = stage / path.name
        return self._files[path]

    def _stage_for(self, folder: Path, what: str) -> Path:
        key = folder.resolve()
        if key in self._stages:
            return self._stages[key]
        self._make_folder(folder, what)
        try:
            stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=key))
        except OSError as error:
            reason = error.strerror or one_line(error)
            raise OutputError(f"{what}: cannot write to folder {folder} ({reason})") from None
        self._stages[key] = stage
        return stage

    def _make_folder(self, folder: Path, what: str) -> None:
        """Create ``folder`` (and missing parents) or say which part stands in the way."""
        missing = []
        existing = folder.resolve()
        while not existing.exists():
            missing.append(existing)
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"{what}: cannot use folder {folder}: {existing} is a file")
        for part in reversed(missing):
            try:
                part.mkdir()
            except OSError as error:
                reason = error.strerror or one_line(error)
                raise OutputError(f"{what}: cannot create folder {folder} ({reason})") from None
            self._created.append(part)

    # -- writing ----------------------------------------------------------------------------
    def staged(self, path: str | os.PathLike) -> Path:
        """Where to write the registered output ``path`` now (moved into place by commit)."""
        try:
            return self._files[Path(path)]
        except KeyError:
            raise KeyError(f"{path} was not registered with the output set") from None

    def write(self, path: str | os.PathLike, writer: Callable[[Path], T]) -> T:
        """``writer(staged path)``; a failure names ``path``, not the hidden staged file."""
        staged = self.staged(path)
        try:
            return writer(staged)
        except (OSError, ValueError) as error:
            message = one_line(error).replace(str(staged.parent), str(Path(path).parent))
            raise OutputError(message) from error

    @property
    def paths(self) -> list[Path]:
        """Every registered destination, in the order added."""
        return list(self._files)

    def commit(self) -> list[Path]:
        """Move every staged file into place. All appear, or (on failure) none does and every
        replaced file is back.

        Raises:
            OutputError: a file was not written, or could not be moved (one line).
        """
        for path, staged in self._files.items():
            if not staged.exists():  # a file, or a folder (a saved nnU-Net / MONAI model)
                self.discard()
                raise OutputError(f"{path}: was not written; nothing was written")
        done: list[tuple[Path, Path | None]] = []
        current = None
        try:
            for path, staged in self._files.items():
                current, backup = path, None
                if path.exists():
                    backup = staged.with_name(f"{staged.name}.replaced")
                    os.replace(path, backup)
                done.append((path, backup))
                os.replace(staged, path)
        except BaseException as error:
            self._roll_back(done)
            self.discard()
            if isinstance(error, OSError):
                reason = error.strerror or one_line(error)
                raise OutputError(
                    f"{current}: cannot be written ({reason}); nothing was written"
                ) from None
            raise
        self.committed = True
        self._remove_stages()
        return self.paths

    @staticmethod
    def _roll_back(done: list[tuple[Path, Path | None]]) -> None:
        for path, backup in reversed(done):
            with contextlib.suppress(OSError):  # best effort; the cause is what gets reported
                if backup is not None and backup.exists():
                    os.replace(backup, path)
                elif backup is None:
                    path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove everything staged and every folder the set created (when empty)."""
        if self.committed:
            return
        self._remove_stages()
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):  # not empty: someone else's files
                folder.rmdir()
        self._created.clear()

    def _remove_stages(self) -> None:
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._stages.clear()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.discard()
