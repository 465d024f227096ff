"""``napari-uda adapt`` and ``napari-uda methods``: outputs, report, progress, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_uda.adaptation.base import available_methods
from napari_uda.cli import main
from napari_uda.core.models import ModelBundle, UNet2D, UNetConfig
from napari_uda.core.volume import save_volume

QUICK = ["--set", "epochs=2", "--set", "batch_size=8"]


def test_adapt_writes_mask_entropy_model_and_report(files, tmp_path, capsys):
    out, entropy = tmp_path / "seg.nii.gz", tmp_path / "ent.nii.gz"
    adapted, report = tmp_path / "adapted.safetensors", tmp_path / "report.json"
    code = main(
        [
            "adapt",
            "--model", files["model"],
            "--image", files["image"],
            "--method", "tent",
            *QUICK,
            "--out", str(out),
            "--entropy-out", str(entropy),
            "--save-model", str(adapted),
            "--report", str(report),
            "--reference", files["reference"],
            "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    source = nib.load(files["image"])
    mask = nib.load(out)
    np.testing.assert_allclose(mask.affine, source.affine)
    assert mask.shape == source.shape and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    entropy_data = np.asarray(nib.load(entropy).dataobj)
    assert entropy_data.shape == source.shape and 0 <= entropy_data.min() <= entropy_data.max() <= 1
    bundle = ModelBundle.load(adapted)
    assert bundle.provenance["adapted"]["method"] == "tent"
    data = json.loads(report.read_text())
    assert data["method"] == "tent" and data["settings"]["epochs"] == 2
    assert len(data["history"]) == data["extra"]["steps_done"] > 0
    assert set(data["checkpoint"]) == {"step", "reason", "score"}
    assert len(data["dice_before"]) == len(data["dice_after"]) == 1 and data["seconds"] > 0
    assert data["inputs"]["command"] == "napari-uda adapt"  # the same report as the Export widget
    volumes = data["metrics"]["volume_ml"]
    assert set(volumes) == {"before", "after"} and all(v > 0 for v in volumes["after"].values())
    after = data["metrics"]["reference"]["after"]
    assert after[list(after)[-1]]["dice"] == pytest.approx(data["dice_after"][0], abs=1e-6)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in lines] == ["1", "2"]  # one progress line per epoch
    assert "Dice" in lines[-1]


def test_adapt_several_images(files, tmp_path, tiny_target):
    second = save_volume(tiny_target.with_data(tiny_target.data[::-1].copy()), tmp_path / "b.nii")
    outs = [tmp_path / "a_seg.nii.gz", tmp_path / "b_seg.nii.gz"]
    code = main(
        ["adapt", "--model", files["model"], "--image", files["image"], str(second),
         "--method", "adaent", *QUICK, "--out", *map(str, outs), "--device", "cpu", "--quiet"]
    )  # fmt: skip
    assert code == 0 and all(p.exists() for p in outs)


def _bad(files, tmp_path, **change):
    args = {
        "--model": files["model"],
        "--image": files["image"],
        "--method": "tent",
        "--out": str(tmp_path / "seg.nii.gz"),
    }
    args.update(change)
    argv = ["adapt", "--device", "cpu", *QUICK]
    for key, value in args.items():
        if value is not None:
            argv += [key, *([value] if isinstance(value, str) else value)]
    return argv


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--image": "missing.nii.gz"}, "no such file"),
        ({"--model": "missing.safetensors"}, "missing.safetensors"),
        ({"--method": "nonsense"}, "unknown method"),
        ({"--set": "nonsense=1"}, "unknown setting"),
        ({"--set": "epochs=0"}, "below the minimum"),
        ({"--out": "seg.png"}, "must end in .nii"),
        ({"--out": ["a.nii.gz", "b.nii.gz"]}, "one path per --image"),
        ({"--reference": "WRONG_SHAPE"}, "not on the grid of"),
        ({"--out": "INPUT"}, "inputs are never overwritten"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    files, tmp_path, capsys, change, message
):
    if change.get("--reference") == "WRONG_SHAPE":
        reference = nib.load(files["reference"])
        wrong = nib.Nifti1Image(np.asarray(reference.dataobj)[:-1], reference.affine)
        nib.save(wrong, tmp_path / "wrong.nii.gz")
        change = {"--reference": str(tmp_path / "wrong.nii.gz")}
    if change.get("--out") == "INPUT":
        change = {"--out": files["image"]}
    elif isinstance(change.get("--out"), str):
        change = {"--out": str(tmp_path / change["--out"])}
    elif isinstance(change.get("--out"), list):
        change = {"--out": [str(tmp_path / p) for p in change["--out"]]}
    before = sorted(tmp_path.iterdir())
    input_bytes = Path(files["image"]).read_bytes()
    code = main(_bad(files, tmp_path, **change))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("napari-uda adapt: error:") and message in err[0]
    assert sorted(tmp_path.iterdir()) == before
    assert Path(files["image"]).read_bytes() == input_bytes


def test_method_the_model_cannot_use_is_refused(files, tmp_path, tiny_model, capsys):
    bundle = tiny_model.bundle
    config = UNetConfig(**{**bundle.architecture.to_dict(), "norm": "group", "groups": 2})
    group = ModelBundle.from_model(UNet2D(config), bundle.class_names, bundle.preprocessing)
    path = group.save(tmp_path / "group.safetensors")
    code = main(_bad({**files, "model": str(path)}, tmp_path, **{"--method": "adabn"}))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs BatchNorm layers" in err and "\n" not in err
    assert not (tmp_path / "seg.nii.gz").exists()


def test_methods_lists_every_method_with_settings_and_needs(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name, method in available_methods().items():
        assert f"{name}: {method.title}" in text
    assert "kl_weight (float, default 0.01)" in text
    assert "Needs: BatchNorm layers" in text


def test_methods_json_and_model_applicability(files, capsys):
    assert main(["methods", "--json", "--model", files["model"]]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(records) == set(available_methods())
    tent = records["tent"]
    assert tent["applies"] and tent["requires"] == ["norm_affine"]
    lr = next(s for s in tent["settings"] if s["name"] == "learning_rate")
    assert lr["default"] == 1e-3 and lr["help"]
    assert records["adabn"]["applies"]  # the tiny model uses BatchNorm
    assert records["cbst"]["settings"][-1]["name"] == "max_portion"
