"""The Export widget: mask and entropy on the scan's grid, the adapted model in its own kind (a
bundle, or TorchScript + JSON spec), the report; and never replacing a file unless asked."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from napari_uda._qt.layers import SEGMENTATION_AFTER, show_prediction
from napari_uda._qt.state import RunStatus, get_state
from napari_uda.core.inference import predict_volume
from napari_uda.core.models import load_model


def _finish_run(docked, model_path, synthetic_scan, tmp_path, method="tent", settings=None):
    """A short real run of the engine on a scan file, shown as the widgets would show it."""
    from napari_uda.adaptation.engine import adapt

    viewer, widgets = docked
    image, mask, affine = synthetic_scan
    scan_path = tmp_path / "scans" / "scan.nii.gz"
    scan_path.parent.mkdir()
    nib.save(nib.Nifti1Image(image, affine), str(scan_path))
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "scans" / "mask.nii.gz"))
    [target] = viewer.open(str(scan_path), plugin="napari-uda")
    [reference] = viewer.open(str(tmp_path / "scans" / "mask.nii.gz"), plugin="napari-uda")
    assert widgets["Model"].load_path(model_path)
    state = get_state(viewer)
    from napari_uda._qt.layers import layer_volume

    result = adapt(
        state.model,
        [layer_volume(target)],
        method,
        settings or {"epochs": 1, "batch_size": 8},
        reference=layer_volume(reference),
    )
    show_prediction(viewer, result.initial_prediction, target, after=False)
    show_prediction(viewer, result.prediction, target, after=True)
    state.target_layer, state.reference_layer = target.name, reference.name
    state.run_info = {"method": method, "settings": result.settings}
    state.result = result
    state.status = RunStatus.FINISHED
    export = widgets["Export"]
    export.folder.value = tmp_path / "out"
    return viewer, export, result, scan_path


@pytest.fixture
def finished_run(docked, tiny_bundle_path, synthetic_scan, tmp_path):
    """A viewer whose session holds a short real run of the engine on a scan file."""
    return _finish_run(docked, tiny_bundle_path, synthetic_scan, tmp_path)


def scripted_model(folder):
    """A small 2D TorchScript network (conv, BatchNorm, conv) with its JSON spec."""
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    folder.mkdir(parents=True)
    path = folder / "x_model.pt"
    torch.jit.save(torch.jit.script(network.eval()), str(path))
    spec = {"spatial_dims": 2, "class_names": ["background", "brain"], "normalization": "zscore"}
    path.with_suffix(".json").write_text(json.dumps(spec))
    return path


def _export(qtbot, export):
    assert export.export() is not None
    assert not export.export_button.isEnabled()  # until the worker reports back
    qtbot.waitUntil(lambda: export.export_button.isEnabled(), timeout=60_000)


def test_export_writes_mask_model_and_report(finished_run, qtbot, notifications):
    viewer, export, result, scan_path = finished_run
    assert export.stem.value == "scan_tent" and export.export_button.isEnabled()
    export.checks["entropy"].value = True
    edited = np.array(viewer.layers[SEGMENTATION_AFTER].data)
    edited[0, 0, 0] = 1  # the user corrected the mask by hand: that is what gets exported
    viewer.layers[SEGMENTATION_AFTER].data = edited
    _export(qtbot, export)
    assert not notifications["error"], notifications["error"]
    out = export.folder.value
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "scan_tent_entropy.nii.gz",
        "scan_tent_history.csv",
        "scan_tent_mask.nii.gz",
        "scan_tent_model.safetensors",
        "scan_tent_report.json",
    ]
    source = nib.load(str(scan_path))
    mask = nib.load(str(out / "scan_tent_mask.nii.gz"))
    np.testing.assert_allclose(mask.affine, source.affine)
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), edited)
    entropy = nib.load(str(out / "scan_tent_entropy.nii.gz"))
    np.testing.assert_allclose(entropy.affine, source.affine)
    np.testing.assert_allclose(entropy.get_fdata(), result.prediction.entropy, atol=1e-6)

    adapted = load_model(out / "scan_tent_model.safetensors")
    assert adapted.bundle.provenance["adapted"]["method"] == "tent"
    for key, value in adapted.bundle.state_dict.items():
        np.testing.assert_allclose(value.numpy(), result.model.network.state_dict()[key].numpy())

    report = json.loads((out / "scan_tent_report.json").read_text())
    assert report["method"] == "tent" and report["settings"]["epochs"] == 1
    assert len(report["history"]) == len(result.history)
    assert report["inputs"]["target_path"] == str(scan_path)
    dice_after = report["metrics"]["reference"]["after"]["brain"]["dice"]
    assert dice_after == pytest.approx(result.reference_dice_after[-1], abs=1e-6)
    assert set(report["metrics"]["volume_ml"]["after"]) == {"brain"}
    with open(out / "scan_tent_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.history) and "loss_total" in rows[0]


def test_existing_files_are_never_replaced_silently(finished_run, qtbot, notifications):
    _, export, _, _ = finished_run
    export.checks["model"].value = False
    export.checks["report"].value = False
    _export(qtbot, export)
    mask_path = export.folder.value / "scan_tent_mask.nii.gz"
    mask_path.write_bytes(b"the radiologist's own file")
    assert export.export() is None
    assert "already exist" in notifications["error"][-1]
    assert mask_path.read_bytes() == b"the radiologist's own file"
    export.replace.value = True
    _export(qtbot, export)
    assert nib.load(str(mask_path)).shape == get_state(export.viewer).result.prediction.labels.shape


def test_nothing_to_export_before_a_run(docked):
    _, widgets = docked
    export = widgets["Export"]
    assert not export.export_button.isEnabled()
    assert export.export() is None
    assert "run an adaptation first" in export.plan.text()


def test_export_an_adapted_torchscript_model(
    docked, synthetic_scan, tmp_path, qtbot, notifications
):
    """A TorchScript model is exported as TorchScript + spec; reopened, it predicts the same."""
    model_path = scripted_model(tmp_path / "models")
    _, export, result, _ = _finish_run(
        docked, model_path, synthetic_scan, tmp_path, "adaent", {"epochs": 1}
    )
    export.checks["report"].value = False
    assert "TorchScript" in export.checks["model"].text
    planned = [p.name for p in export.planned_files()["model"]]
    assert planned == ["scan_adaent_model.pt", "scan_adaent_model.json"]
    (export.folder.value / "scan_adaent_model.json").parent.mkdir(parents=True)
    (export.folder.value / "scan_adaent_model.json").write_text("{}")  # someone's file
    assert export.export() is None
    assert "scan_adaent_model.json already exist" in notifications["error"][-1]
    (export.folder.value / "scan_adaent_model.json").unlink()
    notifications["error"].clear()
    _export(qtbot, export)
    assert not notifications["error"], notifications["error"]
    saved = export.folder.value / "scan_adaent_model.pt"
    reopened = load_model(saved)
    spec = json.loads(saved.with_suffix(".json").read_text())
    assert spec["provenance"]["adapted"]["method"] == "adaent" and spec["file"] == saved.name
    volume = result.prediction.source
    np.testing.assert_allclose(
        predict_volume(reopened, volume, device="cpu").probabilities,
        result.prediction.probabilities,
        atol=1e-5,
    )
    # the input model itself is never written over, even with "Replace existing files"
    export.folder.value, export.stem.value = model_path.parent, "x"
    before = model_path.read_bytes()
    export.replace.value = True
    assert export.planned_files()["model"][0] == model_path
    assert export.export() is None
    assert "never overwritten" in notifications["error"][-1]
    assert model_path.read_bytes() == before


def test_apply_to_folder_runs_the_last_run_on_every_scan_in_the_background(
    finished_run, qtbot, notifications, tmp_path
):
    """A real batch on a LocalCluster (one worker process), started from the widget: the GUI
    thread only receives progress; the manifest and the report hold every scan of the folder."""
    pytest.importorskip("distributed")
    from napari_uda.batch.manifest import read_manifest

    _, export, _, scan_path = finished_run
    folder = tmp_path / "archive"
    folder.mkdir()
    for index in range(2):
        (folder / f"case{index}.nii.gz").write_bytes(scan_path.read_bytes())
    assert export.batch_button.isEnabled() and export.batch_button.text() == "Apply to folder..."
    batch = export.apply_to_folder(folder)
    assert batch is not None and export.batch_button.text() == "Stop batch"
    assert batch.job.method == "tent" and "epochs=1" in batch.job.settings
    statuses = []
    batch.progress.connect(lambda progress: statuses.append(progress.finished))
    qtbot.waitUntil(lambda: export.batch is None, timeout=900_000)  # a loaded machine
    assert not notifications["error"], notifications["error"]
    out = export.folder.value / "scan_tent_batch"
    cases = read_manifest(out)["cases"]
    assert {k: v["state"] for k, v in cases.items()} == {"case0": "done", "case1": "done"}
    assert (out / "report.html").is_file() and statuses[-1] == 2
    assert "2/2 scans" in export.batch_status.text() and "report.html" in notifications["info"][-1]
    assert export.batch_button.text() == "Apply to folder..."


def test_a_failed_export_leaves_nothing_and_a_blocked_folder_is_refused_first(
    finished_run, qtbot, notifications, monkeypatch
):
    """The report fails after the mask and the model are written: none of them appears."""
    from napari_uda._qt import export_widget

    _, export, _, _ = finished_run

    def failing_report(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(export_widget, "_save_report", failing_report)
    _export(qtbot, export)
    assert "Export failed, nothing was written: disk full" in notifications["error"][-1]
    assert not export.folder.value.exists()  # not even the folder it made
    blocker = export.folder.value.parent / "blocker"
    blocker.write_text("a file")
    export.folder.value = blocker / "out"
    assert export.export() is None
    assert f"{blocker} is a file" in notifications["error"][-1]
    assert f"{blocker} is a file" in export.plan.text()  # stays after the notification goes
