"""The Adapt widget states the keep-or-roll-back decision and flags an implausible volume; after
a roll-back the user can keep the adapted result anyway."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from qtpy.QtCore import Qt

from napari_uda._qt.layers import ENTROPY_AFTER, SEGMENTATION_AFTER
from napari_uda._qt.state import RunStatus, get_state
from napari_uda.core.models import load_model


def _demo_tent(viewer, widgets):
    """The Adapt widget on the demo head and model, TENT for one epoch."""
    viewer.open_sample("napari-uda", "target_head")
    widgets["Model"].demo_button.click()
    adapt = widgets["Adapt"]
    adapt.method_combo.setCurrentIndex(adapt.method_combo.findData("tent"))
    adapt.form.set_values({"epochs": 1, "batch_size": 32})
    return adapt


def test_a_run_ends_with_the_gate_decision_and_a_loud_volume_flag(
    docked, qtbot, notifications, wait_for_run
):
    viewer, widgets = docked
    adapt = _demo_tent(viewer, widgets)

    adapt.expected_volume.value = "tumour=1:2"  # not a class of the model: never starts
    adapt.run_button.click()
    assert "'tumour' is not a class" in notifications["error"][-1]
    assert not adapt.runner.running

    adapt.expected_volume.value = "brain=10:20"  # no brain is this small
    adapt.separate_process = False  # the gate runs in the worker thread either way
    qtbot.mouseClick(adapt.run_button, Qt.MouseButton.LeftButton)
    wait_for_run(adapt, timeout_ms=900_000)  # a generous bound on a loaded machine

    state = get_state(viewer)
    result = state.result
    assert state.status == RunStatus.FINISHED and result.gate is not None
    assert result.gate.expected_ml == {"brain": [10.0, 20.0]}
    status = adapt.status.text()
    assert f"Gate: {result.gate.summary}" in status
    assert "⚠ implausible volume in the kept mask: brain:" in status
    assert any("above the expected 10-20 ml" in line for line in notifications["warning"])
    assert (viewer.layers[SEGMENTATION_AFTER].data == result.prediction.labels).all()
    qa = widgets["QA"]
    qa.refresh_button.click()
    assert "implausible volume in after: brain:" in qa.flags.text()


def _click(qtbot, button) -> None:
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def test_the_user_keeps_the_adapted_result_the_gate_rolled_back(
    docked, qtbot, notifications, wait_for_run, tmp_path
):
    viewer, widgets = docked
    adapt = _demo_tent(viewer, widgets)
    # the unadapted brain (about 1070 ml) is in this range, TENT's (about 1620 ml, with more
    # Dice) is not: the gate rolls the run back
    adapt.expected_volume.value = "brain=1000:1300"
    assert adapt.separate_process  # the engine in its own process, as for a user
    assert adapt.overrule_button.isHidden()
    state = get_state(viewer)
    for _run in range(2):  # a second run drops the first one's rolled-back result
        first = state.result
        _click(qtbot, adapt.run_button)
        assert adapt.overrule_button.isHidden()
        assert first is None or first.rolled_back is None
        wait_for_run(adapt, timeout_ms=900_000)  # a generous bound on a loaded machine
        result = state.result
        assert result.gate.rolled_back, result.gate.summary
        assert "adapted volume outside the expected range" in result.gate.summary
        assert not adapt.overrule_button.isHidden() and result.rolled_back is not None
        assert adapt.status.text().startswith("Gate: kept the unadapted model")

    after, entropy = viewer.layers[SEGMENTATION_AFTER], viewer.layers[ENTROPY_AFTER]
    np.testing.assert_array_equal(after.data, result.initial_prediction.labels)
    adapted = result.rolled_back
    weights = {k: v.clone() for k, v in adapted.model.network.state_dict().items()}
    assert (adapted.prediction.labels > 0).sum() > (after.data > 0).sum()
    qa = widgets["QA"]
    assert "kept the unadapted model" in qa.flags.text()

    _click(qtbot, adapt.overrule_button)
    assert adapt.overrule_button.isHidden() and state.result is result
    assert result.gate.overruled and result.rolled_back is None
    np.testing.assert_array_equal(after.data, adapted.prediction.labels)
    np.testing.assert_allclose(entropy.data, adapted.prediction.entropy)
    for name, value in result.model.network.state_dict().items():
        assert torch.equal(value, weights[name])
    for name, value in state.rounds.history.model(0).network.state_dict().items():
        assert torch.equal(value, weights[name])  # a round of corrections starts from it
    status = adapt.status.text()
    assert status.startswith("You kept the adapted result against the gate's advice")
    assert "Gate: the user kept the adapted model against the gate's advice" in status
    assert "adapted volume outside the expected range" in status  # the gate's reasons
    assert "⚠ implausible volume in the kept mask: brain:" in status  # the adapted mask's
    assert "above the expected 1000-1300 ml" in status
    assert any(w.startswith("Gate overruled: the user kept") for w in notifications["warning"])
    assert "the user kept the adapted model" in qa.flags.text()  # QA refreshed
    assert "implausible volume in after: brain:" in qa.flags.text()

    export = widgets["Export"]
    export.folder.value = tmp_path / "out"
    assert export.export() is not None
    qtbot.waitUntil(export.export_button.isEnabled, timeout=120_000)
    stem = export.stem.value
    report = json.loads((tmp_path / "out" / f"{stem}_report.json").read_text())
    assert report["gate"]["overruled"] and report["gate"]["keep"] == "adapted"
    assert report["dice_after"] == result.reference_dice_after
    saved = load_model(tmp_path / "out" / f"{stem}_model.safetensors")
    assert saved.bundle.provenance["adapted"]["gate"]["kept"] == "adapted"
    for name, value in saved.bundle.state_dict.items():
        assert torch.equal(value, weights[name])
    mask = nib.load(str(tmp_path / "out" / f"{stem}_mask.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), adapted.prediction.labels)
