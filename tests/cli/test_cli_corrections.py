"""``napari-uda adapt --corrections``: corrections raise Dice, are kept exactly, bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_uda.cli import main
from napari_uda.core.corrections import NOT_CORRECTED
from napari_uda.core.metrics import dice_per_class
from napari_uda.core.volume import save_volume

SLICES = (4, 10, 15)  # axial slices of the tiny target the "user" corrected
QUICK = ["--set", "epochs=2", "--set", "steps_per_epoch=5", "--set", "batch_size=8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model, tiny_target, tiny_reference):
    folder = tmp_path_factory.mktemp("cli_corrections")
    truth = np.asarray(tiny_reference.data).astype(np.int16)
    corrections = np.full(truth.shape, NOT_CORRECTED, dtype=np.int16)
    corrections[..., list(SLICES)] = truth[..., list(SLICES)]
    return {
        "model": str(tiny_model.bundle.save(folder / "model.safetensors")),
        "image": str(save_volume(tiny_target, folder / "target.nii.gz")),
        "reference": str(save_volume(tiny_reference, folder / "reference.nii.gz")),
        "corrections": str(save_volume(tiny_target.with_data(corrections), folder / "c.nii.gz")),
        "truth": truth,
    }


def _adapt(files, tmp_path, *extra) -> tuple[int, np.ndarray | None]:
    out = tmp_path / "seg.nii.gz"
    code = main(
        ["adapt", "--model", files["model"], "--image", files["image"], "--out", str(out),
         "--device", "cpu", "--quiet", *extra]
    )  # fmt: skip
    return code, (np.asarray(nib.load(out).dataobj) if out.exists() else None)


def test_corrections_alone_raise_dice_keep_slices_and_reach_the_report(files, tmp_path):
    report = tmp_path / "report.json"
    code, mask = _adapt(
        files, tmp_path, "--corrections", files["corrections"], *QUICK,
        "--reference", files["reference"], "--report", str(report),
    )  # fmt: skip
    assert code == 0
    truth = files["truth"]
    assert np.array_equal(mask[..., list(SLICES)], truth[..., list(SLICES)])
    data = json.loads(report.read_text())
    assert data["method"] == "corrections"
    assert data["inputs"]["corrections"]["slices"] == {"axial": list(SLICES)}
    before, after = data["dice_before"][0], data["dice_after"][0]
    assert after > before + 0.02, (before, after)
    untouched = [i for i in range(truth.shape[2]) if i not in SLICES]
    model_dice = dice_per_class(mask[..., untouched], truth[..., untouched], 2)[1]
    assert model_dice > before  # spread beyond the corrected slices, not only pasted


def test_ordinary_mask_with_corrected_slices(files, tmp_path):
    code, mask = _adapt(
        files, tmp_path, "--method", "tent", "--corrections", files["reference"],
        "--corrected-slices", "axial:4,15", "--set", "epochs=1",
    )  # fmt: skip
    assert code == 0
    assert np.array_equal(mask[..., [4, 15]], files["truth"][..., [4, 15]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shape", "does not match the first image"),
        ("affine", "affine differs"),
        ("label", "label 3 is not a class of the model"),
        ("empty", "no voxel is corrected"),
        ("mask", "looks like an ordinary mask"),
        ("axis", "unknown axis"),
        ("outside", "outside 0..19"),
        ("no_method", "--method is required"),
    ],
)
def test_bad_corrections_one_line_exit_2(files, tmp_path, capsys, tiny_target, change, message):
    corrections = nib.load(files["corrections"])
    data, affine = np.asarray(corrections.dataobj).astype(np.int16), corrections.affine
    extra: list[str] = []
    if change == "shape":
        data = data[:-1]
    elif change == "affine":
        affine = affine.copy()
        affine[0, 3] += 5.0
    elif change == "label":
        data[0, 0, 4] = 3
    elif change == "empty":
        data[:] = NOT_CORRECTED
    elif change == "mask":
        data = files["truth"].copy()
    elif change in ("axis", "outside"):
        data = files["truth"].copy()
        extra = ["--corrected-slices", "oblique:3" if change == "axis" else "axial:3,25"]
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    method = [] if change == "no_method" else ["--method", "corrections"]
    given = [] if change == "no_method" else ["--corrections", str(path)]
    code, mask = _adapt(files, tmp_path, *method, *given, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err
    assert mask is None
