"""The CLI's promises under failure: one line and a non-zero exit for any error, the traceback
only behind --debug, and outputs that appear all together or not at all (also on Ctrl-C)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from napari_uda.cli import adapt_command, main
from napari_uda.core.volume import save_volume

QUICK = ["--method", "tent", "--set", "epochs=1", "--set", "batch_size=8", "--device", "cpu"]


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
    assert code == 0 and all(line.startswith("napari-uda adapt: gate:") for line in lines)
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


# -- bad input, by kind: exit 2, one line naming the problem, nothing written --------------------
def nifti(path: Path, data, affine=None, **sform) -> Path:
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    if sform:
        image.header.set_sform(sform["sform"], code=1)
    nib.save(image, str(path))
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, files, tiny_target, tiny_model):
    """Files a new user or an attacker might hand over."""
    import gzip
    import json

    import nibabel as nib

    folder = tmp_path_factory.mktemp("bad_inputs")
    shape = tiny_target.shape
    made = {"folder": folder}
    made["zeros"] = nifti(folder / "zeros.nii.gz", np.zeros(shape, np.float32))
    made["constant"] = nifti(folder / "constant.nii.gz", np.full(shape, 37.0, np.float32))
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).header
    header.set_data_shape((1024, 1024, 256))  # 1 GB declared ...
    block = header.binaryblock + b"\0" * 4 + bytes(32)  # ... in a 384-byte file
    (folder / "huge.nii").write_bytes(block)
    (folder / "huge.nii.gz").write_bytes(gzip.compress(block))
    singular = np.eye(4)
    singular[:3, 2] = singular[:3, 1]
    made["singular"] = nifti(folder / "singular.nii", np.ones((4, 4, 4)), sform=singular)
    rng = np.random.default_rng(0)  # a small file of 60 mm voxels: a huge grid at 1 mm
    made["vast"] = nifti(
        folder / "vast.nii.gz", rng.random((40, 40, 40)), np.diag([60.0] * 3 + [1])
    )
    fine = dataclasses.replace(tiny_model.bundle.preprocessing, target_spacing=(1.0, 1.0, 1.0))
    made["fine_model"] = dataclasses.replace(tiny_model.bundle, preprocessing=fine).save(
        folder / "fine.safetensors"
    )
    labels = np.zeros(shape, np.int64)
    labels[1, 1, 1] = 70000
    made["label70000"] = nifti(
        folder / "label70000.nii.gz", labels.astype(np.int32), tiny_target.affine
    )
    labels[1, 1, 1] = 3
    made["label3"] = nifti(folder / "label3.nii.gz", labels.astype(np.uint8), tiny_target.affine)
    shifted = tiny_target.affine.copy()
    shifted[0, 3] += 10
    made["shifted"] = nifti(folder / "shifted.nii.gz", np.zeros(shape, np.uint8), shifted)
    (folder / "spec.json").write_text(json.dumps({"spatial_dims": 3, "class_names": ["a", "b"]}))
    made["hostile_spec"] = folder / "spec.json"
    (folder / "spec.json").write_text(
        json.dumps({"spatial_dims": 3, "class_names": ["a", "b"], "file": files["model"]})
    )
    return made


def bad_commands(files, bad, out: Path) -> list[tuple[list, str]]:
    """(arguments, words the one line must hold) for every kind of bad input."""
    image, model, reference = files["image"], files["model"], files["reference"]
    predict = ["predict", "--model", model, "--out", out / "seg.nii.gz", "--device", "cpu"]
    adapt = ["adapt", "--model", model, *QUICK, "--out", out / "seg.nii.gz"]
    evaluate = ["evaluate", "--ref", reference]
    return [
        ([*predict, "--image", bad["zeros"]], "every voxel is 0"),
        ([*predict, "--image", bad["constant"]], "every voxel is 37"),
        ([*adapt, "--image", bad["zeros"]], "every voxel is 0"),
        ([*predict, "--image", bad["folder"] / "huge.nii"], "the file is truncated"),
        ([*predict, "--image", bad["folder"] / "huge.nii.gz"], "compressed file can hold"),
        ([*predict, "--image", bad["singular"]], "singular"),
        ([*predict, "--image", bad["vast"], "--model", bad["fine_model"]],
         "vast.nii.gz: resampled to the model's 1x1x1 mm spacing it is 2400x2400x2400"),
        ([*predict, "--image", image, "--model", bad["hostile_spec"]], "outside the spec's"),
        ([*adapt, "--image", image, "--reference", bad["label3"]], "holds label 3 but the model"),
        ([*adapt, "--image", image, "--reference", bad["shifted"]], "not on the grid"),
        ([*evaluate, "--pred", bad["label70000"]], "holds label 70000"),
        ([*evaluate, "--pred", reference, "--num-classes", "0"], "--num-classes must be from 2"),
        ([*evaluate, "--pred", reference, "--tolerance-mm", "nan"], "--tolerance-mm must be"),
        ([*evaluate, "--pred", reference, "--num-classes", "2", "--ref", bad["label3"]],
         "labels go from 0 to 1 with --num-classes 2"),
        (["train", "--images", image, "--masks", reference, "--out", out / "m.safetensors",
          "--depth", "0"], "--depth: must be a whole number from 1"),
        (["train", "--images", image, "--masks", reference, "--out", out / "m.safetensors",
          "--base-channels", "0"], "--base-channels: must be a whole number from 1"),
        ([*predict, "--image", image, "--out", bad["zeros"] / "x.nii.gz"], "is a file"),
        ([*adapt, "--image", image, "--method", "tent", "--set", "epochs=-1"], "epochs"),
        (["demo", "--out-dir", bad["zeros"] / "out", "--device", "cpu"], "is a file"),
    ]  # fmt: skip


def test_every_kind_of_bad_input_is_one_line_exit_2_and_writes_nothing(
    files, bad_inputs, tmp_path, capsys
):
    out = tmp_path / "out"
    for argv, words in bad_commands(files, bad_inputs, out):
        code, lines = run_cli(capsys, *argv)
        assert code == 2, (argv, lines)
        assert len(lines) == 1 and "Traceback" not in lines[0], (argv, lines)
        assert words in lines[0], (argv, lines)
        assert not out.exists(), argv


def test_evaluate_json_is_standard_json_even_when_a_mask_is_empty(files, bad_inputs, capsys):
    """An empty prediction has no HD95: it is null, never the non-standard NaN / Infinity."""
    import json

    from napari_uda.core.volume import load_volume

    reference = load_volume(files["reference"])
    empty_on_grid = bad_inputs["folder"] / "empty_on_grid.nii.gz"
    save_volume(reference.with_data(np.zeros(reference.shape, np.uint8)), empty_on_grid)
    code = main(["evaluate", "--pred", str(empty_on_grid), "--ref", files["reference"], "--json"])
    out = capsys.readouterr().out
    assert code == 0

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    report = json.loads(out, parse_constant=refuse)
    assert report["classes"]["1"]["hd95"] is None and report["classes"]["1"]["dice"] == 0.0
