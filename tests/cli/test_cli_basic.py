"""``napari-uda train / predict / evaluate / demo``: outputs on the input's grid, readable numbers,
and bad input that exits 2 with one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_uda.cli import main
from napari_uda.core.models import ModelBundle, UNet2D, UNetConfig
from napari_uda.core.preprocessing import PreprocessingConfig
from napari_uda.core.volume import Volume, save_volume


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]


# -- predict ----------------------------------------------------------------------------------
def test_predict_on_the_demo_target_keeps_the_input_grid(demo_paths, tmp_path, capsys):
    out, entropy, probabilities = (tmp_path / n for n in ("seg.nii.gz", "ent.nii", "p.nii.gz"))
    code, stdout, _ = run_cli(
        capsys, "predict", "--model", demo_paths.model, "--image", demo_paths.target_image,
        "--out", out, "--entropy-out", entropy, "--probabilities-out", probabilities,
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0 and str(out) in stdout
    source = nib.load(demo_paths.target_image)
    mask = nib.load(out)
    np.testing.assert_allclose(mask.affine, source.affine)
    assert mask.shape == source.shape
    assert mask.get_data_dtype() == np.uint8
    labels = np.asarray(mask.dataobj)
    assert set(np.unique(labels)) == {0, 1}
    entropy_data = np.asarray(nib.load(entropy).dataobj)
    assert entropy_data.shape == source.shape and 0 <= entropy_data.min() <= entropy_data.max() <= 1
    probability_data = np.asarray(nib.load(probabilities).dataobj)
    assert probability_data.shape == (*source.shape, 2)
    np.testing.assert_allclose(probability_data.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probability_data.argmax(-1), labels)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 100, (12, 14, 10)).astype(np.float32)
    return save_volume(Volume(data, np.diag([2.0, 2.0, 2.0, 1.0])), folder / "small.nii.gz")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bundle")
    network = UNet2D(UNetConfig(base_channels=4, depth=2))
    bundle = ModelBundle.from_model(
        network, ["background", "brain"], PreprocessingConfig(target_spacing=None, pad_multiple=4)
    )
    return bundle.save(folder / "tiny.safetensors")


def bad_inputs(folder: Path, small_image: Path) -> dict[str, tuple[Path, str]]:
    """Broken inputs and a fragment of the error each must give."""
    text = folder / "notes.nii.gz"
    text.write_text("not an image")
    wrong_suffix = folder / "scan.txt"
    wrong_suffix.write_text("hello")
    four_d = save_volume(
        Volume(np.zeros((6, 6, 6, 3), np.float32), np.eye(4)), folder / "four_d.nii.gz"
    )
    nan_data = np.ones((6, 6, 6), np.float32)
    nan_data[1, 2, 3] = np.nan
    nans = folder / "nans.nii.gz"
    nib.save(nib.Nifti1Image(nan_data, np.eye(4)), nans)
    return {
        "missing": (folder / "missing.nii.gz", "no such file"),
        "not nifti": (wrong_suffix, "not a NIfTI file"),
        "corrupt": (text, "cannot be read"),
        "4D": (four_d, "3D"),
        "NaN": (nans, "NaN"),
    }


@pytest.mark.parametrize("case", ["missing", "not nifti", "corrupt", "4D", "NaN"])
def test_predict_bad_image_exits_2_and_writes_nothing(
    case, tiny_bundle, small_image, tmp_path, capsys
):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image, fragment = bad_inputs(inputs, small_image)[case]
    out = tmp_path / "out" / "seg.nii.gz"
    code, _stdout, err = run_cli(
        capsys, "predict", "--model", tiny_bundle, "--image", image, "--out", out,
        "--entropy-out", tmp_path / "out" / "ent.nii.gz", "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_predict_with_a_bundle_of_other_channels_exits_2(small_image, tmp_path, capsys):
    network = UNet2D(UNetConfig(in_channels=3, base_channels=4, depth=2))
    bundle = ModelBundle.from_model(
        network, ["background", "brain"], PreprocessingConfig(target_spacing=None, pad_multiple=4)
    ).save(tmp_path / "rgb.safetensors")
    out = tmp_path / "seg.nii.gz"
    code, _, err = run_cli(
        capsys, "predict", "--model", bundle, "--image", small_image, "--out", out
    )
    assert_one_line_error(code, err, "3 input channels")
    assert not out.exists()


def test_predict_with_a_foreign_model_file_exits_2(small_image, tmp_path, capsys):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x00" * 64)
    out = tmp_path / "seg.nii.gz"
    code, _, err = run_cli(capsys, "predict", "--model", fake, "--image", small_image, "--out", out)
    assert_one_line_error(code, err, "model.safetensors")
    assert not out.exists()


def test_predict_refuses_to_overwrite_its_input(tiny_bundle, small_image, capsys):
    before = small_image.read_bytes()
    code, _, err = run_cli(
        capsys, "predict", "--model", tiny_bundle, "--image", small_image, "--out", small_image
    )
    assert_one_line_error(code, err, "overwrite an input")
    assert small_image.read_bytes() == before


# -- evaluate ---------------------------------------------------------------------------------
def test_evaluate_prints_a_table_and_json(demo_paths, tmp_path, capsys):
    reference = nib.load(demo_paths.target_mask)
    shifted = np.roll(np.asarray(reference.dataobj), 2, axis=0)
    prediction = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(shifted, reference.affine, reference.header), prediction)

    code, table, _ = run_cli(
        capsys, "evaluate", "--pred", prediction, "--ref", demo_paths.target_mask
    )
    assert code == 0
    header, row = table.splitlines()[:2]
    assert header.split() == [
        "class", "dice", "iou", "precision", "recall", "specificity", "hd95", "surface_dice"
    ]  # fmt: skip
    values = [float(v) for v in row.split()[1:]]
    assert 0.7 < values[0] < 1.0  # a 4 mm shift costs some Dice
    assert values[5] == pytest.approx(4.0, abs=0.5)  # HD95 in mm: the shift (2 voxels of 2 mm)

    code, text, _ = run_cli(
        capsys, "evaluate", "--pred", prediction, "--ref", demo_paths.target_mask, "--json",
        "--tolerance-mm", "5",
    )  # fmt: skip
    report = json.loads(text)
    assert report["tolerance_mm"] == 5.0
    assert report["classes"]["1"]["dice"] == pytest.approx(values[0], abs=1e-4)
    assert report["classes"]["1"]["surface_dice"] == pytest.approx(1.0)  # within 5 mm

    code, text, _ = run_cli(
        capsys, "evaluate", "--pred", demo_paths.target_mask, "--ref", demo_paths.target_mask,
        "--json",
    )  # fmt: skip
    assert json.loads(text)["classes"]["1"]["dice"] == 1.0


def test_evaluate_refuses_masks_on_different_grids(demo_paths, capsys):
    code, _, err = run_cli(
        capsys, "evaluate", "--pred", demo_paths.source_mask, "--ref", demo_paths.target_mask
    )
    assert_one_line_error(code, err, "not on the same grid")


# -- train ------------------------------------------------------------------------------------
def test_train_writes_a_bundle_that_predicts(tmp_path, capsys):
    rng = np.random.default_rng(1)
    mask = np.zeros((16, 16, 8), np.uint8)
    mask[4:12, 5:13, 2:6] = 1
    image = (50 + 10 * rng.standard_normal(mask.shape) + 100 * mask).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image_path = save_volume(Volume(image, affine), tmp_path / "head.nii.gz")
    mask_path = save_volume(Volume(mask, affine), tmp_path / "head_mask.nii.gz")
    model = tmp_path / "model.safetensors"
    code, stdout, _ = run_cli(
        capsys, "train", "--images", image_path, "--masks", mask_path, "--out", model,
        "--classes", "background", "box", "--base-channels", "4", "--depth", "2",
        "--early-head-layers", "1",
        "--set", "epochs=2", "--set", "batch_size=4", "--set", "early_head_epochs=1",
        "--set", "source_pack_size=3", "--seed", "5", "--device", "cpu",
        "--expected-volume", "box=1:3.5",
    )  # fmt: skip
    assert code == 0
    assert "early_head epoch" in stdout and str(model) in stdout
    bundle = ModelBundle.load(model)
    assert bundle.class_names == ["background", "box"]
    assert bundle.architecture.base_channels == 4 and bundle.preprocessing.pad_multiple == 4
    command = bundle.provenance["command"]
    assert command.startswith("napari-uda train --images")
    assert "epochs=2" in command and "--seed 5" in command and "--early-head-layers 1" in command
    assert bundle.architecture.early_head_layers == 1
    assert bundle.source_statistics["expected_volume_ml"] == {"box": [1.0, 3.5]}
    assert len(bundle.source_pack) == 3
    features = bundle.source_tensors["aiva_source_features"]  # AIVA without source images
    assert features.shape[0] == mask.shape[2] and torch.isfinite(features).all()

    out = tmp_path / "seg.nii.gz"
    code, _, _ = run_cli(capsys, "predict", "--model", model, "--image", image_path, "--out", out)
    assert code == 0 and nib.load(out).shape == mask.shape


def test_train_with_unknown_setting_exits_2(demo_paths, tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    code, _, err = run_cli(
        capsys, "train", "--images", demo_paths.source_image, "--masks", demo_paths.source_mask,
        "--out", model, "--set", "speed=fast",
    )  # fmt: skip
    assert_one_line_error(code, err, "unknown setting 'speed'")
    assert not model.exists()


# -- demo -------------------------------------------------------------------------------------
def test_demo_prints_dice_before_and_writes_outputs(tmp_path, capsys):
    code, stdout, _ = run_cli(
        capsys, "demo", "--no-adapt", "--out-dir", tmp_path / "demo", "--device", "cpu"
    )
    assert code == 0
    line = next(line for line in stdout.splitlines() if line.startswith("Dice before"))
    dice = float(line.split(":")[1].split()[0])
    assert 0.3 < dice < 0.95  # the shift hurts but the model still finds the brain
    assert (tmp_path / "demo" / "target_before_labels.nii.gz").is_file()


def printed_dice(stdout: str, prefix: str) -> float:
    line = next(line for line in stdout.splitlines() if line.startswith(prefix))
    return float(line.split(":")[1].split()[0])


def test_demo_adapts_and_dice_rises(tmp_path, capsys):
    code, stdout, _ = run_cli(
        capsys, "demo", "--method", "adabn", "--out-dir", tmp_path, "--device", "cpu", "--quiet"
    )
    assert code == 0
    before, after = printed_dice(stdout, "Dice before"), printed_dice(stdout, "Dice after")
    assert after > before + 0.05  # the demo's point: label-free adaptation helps
    reference = nib.load(tmp_path / "target_before_labels.nii.gz")
    adapted = nib.load(tmp_path / "target_after_labels.nii.gz")
    np.testing.assert_allclose(adapted.affine, reference.affine)


def test_demo_with_an_unknown_method_exits_2_before_any_work(capsys):
    code, stdout, err = run_cli(capsys, "demo", "--method", "magic")
    assert_one_line_error(code, err, "unknown method 'magic'")
    assert "Dice" not in stdout
