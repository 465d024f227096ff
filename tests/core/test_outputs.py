"""OutputSet: outputs are checked before the work and appear all together or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_uda.core import outputs as outputs_module
from napari_uda.core.outputs import STAGING_PREFIX, OutputError, OutputSet


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_commit_moves_all_files_into_place_and_leaves_no_staging(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    with OutputSet() as outputs:
        outputs.add(first, "--a")
        outputs.add(second, "--b")
        outputs.write(first, lambda path: path.write_text("one"))
        outputs.staged(second).write_text("two")
        assert not first.exists() and not second.exists()  # nothing visible before commit
        outputs.commit()
    assert first.read_text() == "one" and second.read_text() == "two"
    assert everything_under(tmp_path) == ["a.txt", "sub", "sub/b.txt"]


def test_error_before_commit_leaves_nothing_not_even_created_folders(tmp_path):
    target = tmp_path / "new" / "deeper" / "mask.txt"
    with pytest.raises(KeyboardInterrupt), OutputSet() as outputs:
        outputs.add(target)
        outputs.staged(target).write_text("half")
        raise KeyboardInterrupt  # Ctrl-C during the work
    assert everything_under(tmp_path) == []


def test_failed_move_restores_replaced_files_and_removes_moved_ones(tmp_path, monkeypatch):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("old a")
    real_replace = os.replace

    def replace(source, destination):
        if Path(destination) == second:
            raise OSError(28, "No space left on device")
        return real_replace(source, destination)

    with OutputSet() as outputs:
        for path in (first, second):
            outputs.add(path)
            outputs.staged(path).write_text("new")
        monkeypatch.setattr(outputs_module.os, "replace", replace)
        with pytest.raises(OutputError, match=r"b\.txt: cannot be written.*nothing was written"):
            outputs.commit()
    assert first.read_text() == "old a" and not second.exists()
    assert everything_under(tmp_path) == ["a.txt"]


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("input", "would overwrite an input"),
        ("twice", "is also given as"),
        ("folder", "is a folder"),
        ("existing", "exists already"),
        ("parent_is_file", "is a file"),
    ],
)
def test_bad_locations_are_refused_when_added_naming_the_path(tmp_path, case, fragment):
    scan, old = tmp_path / "scan.nii.gz", tmp_path / "old.nii.gz"
    scan.write_text("scan")
    old.write_text("old")
    outputs = OutputSet(overwrite=case != "existing", protected=[scan])
    path = {
        "input": scan,
        "twice": tmp_path / "out.nii.gz",
        "folder": tmp_path,
        "existing": old,
        "parent_is_file": scan / "out.nii.gz",
    }[case]
    if case == "twice":
        outputs.add(path, "--out")
    with pytest.raises(OutputError, match=fragment) as raised:
        outputs.add(path, "--entropy-out")
    outputs.discard()
    assert "--entropy-out" in str(raised.value) and STAGING_PREFIX not in str(raised.value)
    assert everything_under(tmp_path) == ["old.nii.gz", "scan.nii.gz"]  # nothing new


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_is_refused_when_added(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=f"cannot write to folder {folder}"):
            OutputSet().add(folder / "mask.nii.gz", "--out")
    finally:
        folder.chmod(0o755)


def test_unwritable_folder_is_refused_when_added(tmp_path, monkeypatch):
    """What a read-only folder does (also as root): making the staging folder fails."""

    def refuse(**_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs_module.tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputError, match=f"--out: cannot write to folder {tmp_path}"):
        OutputSet().add(tmp_path / "mask.nii.gz", "--out")


def test_write_error_names_the_output_not_the_hidden_staged_file(tmp_path):
    target = tmp_path / "mask.nii.gz"
    with OutputSet() as outputs:
        outputs.add(target)

        def fail(path: Path) -> None:
            raise OSError(f"{path}: disk full")

        with pytest.raises(OutputError) as raised:
            outputs.write(target, fail)
    assert str(raised.value) == f"{target}: disk full"
    assert everything_under(tmp_path) == []
