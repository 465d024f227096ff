"""The CLI's promises under failure: one line and a non-zero exit for any error, the traceback
only behind --debug, and outputs that appear all together or not at all (also on Ctrl-C)."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_uda.cli import adapt_command, main
from napari_uda.core.volume import save_volume

QUICK = ["--method", "tent", "--set", "epochs=1", "--set", "batch_size=8", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model, tiny_target, tiny_reference):
    folder = tmp_path_factory.mktemp("cli_reliability")
    model = tiny_model.bundle.save(folder / "model.safetensors")
    image = save_volume(tiny_target, folder / "target.nii.gz")
    reference = save_volume(tiny_reference, folder / "reference.nii.gz")
    return {"model": str(model), "image": str(image), "reference": str(reference)}


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def adapt_args(files, out: Path) -> list:
    return [
        "adapt", "--model", files["model"], "--image", files["image"], *QUICK, "--quiet",
        "--out", out / "mask.nii.gz", "--entropy-out", out / "entropy.nii.gz",
        "--save-model", out / "adapted.safetensors", "--report", out / "report.json",
    ]  # fmt: skip


def test_ctrl_c_between_outputs_leaves_nothing(files, tmp_path, capsys, monkeypatch):
    """The mask and entropy map are written, then Ctrl-C comes before the report."""

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapt_command, "write_json", interrupted)
    code, lines = run_cli(capsys, *adapt_args(files, tmp_path / "out"))
    assert code == 130 and lines == ["napari-uda adapt: interrupted; nothing was written"]
    assert everything_under(tmp_path) == []


def test_all_outputs_appear_together(files, tmp_path, capsys):
    code, lines = run_cli(capsys, *adapt_args(files, tmp_path))
    assert code == 0 and lines == []
    assert everything_under(tmp_path) == [
        "adapted.safetensors", "entropy.nii.gz", "mask.nii.gz", "report.json"
    ]  # fmt: skip


def test_impossible_output_folder_is_refused_before_the_work(files, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the folder should be")

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(adapt_command, "load_model", must_not_run)
    args = adapt_args(files, tmp_path)
    args[args.index("--report") + 1] = blocker / "report.json"
    code, lines = run_cli(capsys, *args)
    assert code == 2 and len(lines) == 1
    assert lines[0] == (
        f"napari-uda adapt: error: --report: cannot use folder {blocker}: {blocker} is a file"
    )
    assert everything_under(tmp_path) == ["results"]


def test_unexpected_error_is_one_line_and_the_traceback_is_behind_debug(
    files, tmp_path, capsys, monkeypatch
):
    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(adapt_command, "load_model", broken)
    args = adapt_args(files, tmp_path)
    code, lines = run_cli(capsys, *args)
    assert code == 1 and len(lines) == 1
    assert "unexpected error: ZeroDivisionError: division by zero" in lines[0]
    assert "--debug" in lines[0]
    code, lines = run_cli(capsys, *args, "--debug")
    assert code == 1 and lines[0].startswith("Traceback") and "ZeroDivisionError" in lines[-1]
    monkeypatch.setenv("NAPARI_UDA_DEBUG", "1")
    code, lines = run_cli(capsys, *args)
    assert code == 1 and lines[0].startswith("Traceback")
    assert everything_under(tmp_path) == []


def test_messages_keep_their_quotes(files, tmp_path, capsys):
    code, lines = run_cli(capsys, *adapt_args(files, tmp_path), "--method", "nonsense")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("napari-uda adapt: error: unknown method 'nonsense'; methods are:")
    code, lines = run_cli(capsys, "evaluate", "--pred", "'missing'.nii", "--ref", "x'...'.nii")
    assert code == 2 and len(lines) == 1 and lines[0].endswith("'missing'.nii: no such file")


def test_option_errors_are_one_line(capsys):
    code, lines = run_cli(capsys, "evaluate", "--pred", "a.nii", "--ref", "b.nii",
                          "--tolerance-mm", "wide")  # fmt: skip
    assert code == 2 and len(lines) == 1 and "--tolerance-mm: invalid float value" in lines[0]
