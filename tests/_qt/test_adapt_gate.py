"""The Adapt widget states the keep-or-roll-back decision and flags an implausible volume."""

from __future__ import annotations

from qtpy.QtCore import Qt

from napari_uda._qt.layers import SEGMENTATION_AFTER
from napari_uda._qt.state import RunStatus, get_state


def test_a_run_ends_with_the_gate_decision_and_a_loud_volume_flag(
    docked, qtbot, notifications, wait_for_run
):
    viewer, widgets = docked
    viewer.open_sample("napari-uda", "target_head")
    widgets["Model"].demo_button.click()
    adapt = widgets["Adapt"]
    adapt.method_combo.setCurrentIndex(adapt.method_combo.findData("tent"))
    adapt.form.set_values({"epochs": 1, "batch_size": 32})

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
