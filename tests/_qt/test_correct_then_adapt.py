"""Correct, then adapt, driven as a user does: run the demo model, correct two slices of
``segmentation (after)`` with the label tools' API, adapt with corrections (a round), go back a
round, apply the model to another open scan, export the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_adapt_widget import REFERENCE, TARGET, choose_method, demo_session  # noqa: F401

from napari_uda._qt.layers import ENTROPY_AFTER, SEGMENTATION_AFTER
from napari_uda._qt.state import RunStatus, get_state
from napari_uda.adaptation.gate import GateOptions
from napari_uda.corrected_slices import KEPT, SliceRef


@pytest.fixture
def first_run(demo_session, wait_for_run):  # noqa: F811
    """The demo head and model, one short TENT run (round 0)."""
    viewer, widgets = demo_session
    adapt = widgets["Adapt"]
    adapt.reference.value = viewer.layers[REFERENCE]
    adapt.preview_every.value = 0
    choose_method(adapt, "tent", epochs=1, batch_size=64)
    adapt.run_button.click()
    wait_for_run(adapt)
    assert get_state(viewer).status == RunStatus.FINISHED
    return viewer, widgets


def correct_two_slices(viewer, panel, qtbot):
    """Erase a block of brain on one axial slice and fill a sagittal slice's background, as
    the eraser and the fill bucket do; the two slices' refs."""
    layer = viewer.layers[SEGMENTATION_AFTER]
    target = viewer.layers[TARGET]
    axial = next(i for i, code in enumerate(target.metadata["axcodes"]) if code in "SI")
    sagittal = next(i for i, code in enumerate(target.metadata["axcodes"]) if code in "LR")
    shape = layer.data.shape
    refs = []
    for axis, fraction in ((axial, 0.5), (sagittal, 0.3)):
        index = int(shape[axis] * fraction)
        rest = [a for a in range(3) if a != axis]
        viewer.dims.order = (axis, *rest)
        viewer.dims.set_point(axis, layer.translate[axis] + layer.scale[axis] * index)
        centre = [s // 2 for s in shape]
        centre[axis] = index
        if axis == axial:
            layer.brush_size = 15
            layer.paint(centre, 0)
        else:
            corner = [0, 0, 0]
            corner[axis] = index
            layer.fill(corner, 1)
        refs.append(SliceRef(axis, index))
    qtbot.waitUntil(lambda: len(panel.slices) == 2, timeout=5000)
    return refs


def test_a_round_learns_from_the_corrections_and_going_back_restores(
    first_run, qtbot, wait_for_run, notifications
):
    viewer, widgets = first_run
    adapt, state = widgets["Adapt"], get_state(viewer)
    assert len(state.rounds) == 1 and state.rounds.current.number == 0
    assert not adapt.corrections.back_button.isEnabled()
    assert not adapt.corrections.adapt_button.isEnabled()  # nothing corrected yet
    refs = correct_two_slices(viewer, adapt.corrections, qtbot)
    assert adapt.corrections.adapt_button.isEnabled()
    assert adapt.tabs.currentWidget() is adapt.corrections  # editing shows the list
    layer, entropy = viewer.layers[SEGMENTATION_AFTER], viewer.layers[ENTROPY_AFTER]
    start_labels, start_entropy = layer.data.copy(), entropy.data.copy()
    corrected = state.corrections.corrections(layer.data)
    mask = state.corrections.mask(layer.data.shape)
    first_model = state.result.model

    choose_method(adapt, "corrections", epochs=1, steps_per_epoch=3, batch_size=8)
    assert not adapt.run_button.isEnabled()  # Corrections only needs corrected slices
    assert "your corrections only" in adapt.corrections.round_method.text()
    adapt.corrections.adapt_button.click()
    assert adapt.tabs.currentWidget() is adapt.plots  # live plots as for Run
    wait_for_run(adapt)
    assert state.status == RunStatus.FINISHED and not notifications["error"]
    assert len(state.rounds) == 2 and state.rounds.current.number == 1
    assert len(state.rounds.history) == 1  # recorded in the headless round history too
    assert state.rounds.rounds[0].result.prediction.probabilities.size == 0  # kept light
    np.testing.assert_array_equal(state.rounds.history.latest.labels, layer.data)
    assert state.result.method == "corrections" and state.result.model is not first_model
    assert "Round 1" in adapt.status.text()
    # the after layers changed where nobody corrected, and the corrected slices are exact
    assert not np.array_equal(layer.data[~mask], start_labels[~mask])
    assert not np.array_equal(entropy.data, start_entropy)
    np.testing.assert_array_equal(layer.data[mask], corrected[mask])
    np.testing.assert_array_equal(layer.data, state.result.prediction.labels)
    assert state.corrections.slices == sorted(refs)

    assert adapt.corrections.back_button.isEnabled()
    adapt.corrections.back_button.click()  # undo the round
    np.testing.assert_array_equal(layer.data, start_labels)
    np.testing.assert_array_equal(entropy.data, start_entropy)
    assert len(state.rounds) == 1 and state.result.model is first_model
    assert len(state.rounds.history) == 0
    assert state.corrections.slices == sorted(refs)
    assert not adapt.corrections.back_button.isEnabled()

    choose_method(adapt, "tent", epochs=1, batch_size=64)
    adapt.run_button.click()  # a new start from the loaded model: round 0 again
    wait_for_run(adapt)
    np.testing.assert_array_equal(layer.data[mask], corrected[mask])  # kept exactly
    np.testing.assert_array_equal(layer.data, state.result.prediction.labels)
    assert state.corrections.slices == sorted(refs)
    assert set(state.corrections.origins.values()) == {KEPT}
    assert len(state.rounds) == 1


def test_demo_gui_opens_ready_to_correct(make_napari_viewer, qtbot, wait_for_run):
    from napari_uda._qt.demo_gui import open_demo

    viewer = make_napari_viewer()
    adapt = open_demo(viewer, method="tent", run=False)
    assert get_state(viewer).model is not None
    assert adapt.reference.value.name == REFERENCE and adapt.target.value.name == TARGET
    choose_method(adapt, "tent", epochs=1, batch_size=64)
    adapt.preview_every.value = 0
    adapt.run()
    wait_for_run(adapt)
    qtbot.waitUntil(lambda: viewer.layers.selection.active is not None, timeout=5000)
    layer = viewer.layers.selection.active
    assert layer.name == SEGMENTATION_AFTER and layer.mode == "paint"
    assert adapt.method_combo.currentData() == "corrections"  # ready for a round
    assert ENTROPY_AFTER in viewer.layers
    assert adapt.corrections.layer is getattr(layer, "__wrapped__", layer)


def test_apply_to_other_scans_then_export(first_run, qtbot, notifications, monkeypatch, tmp_path):
    from napari_uda._qt.other_scans import applied_layer_name
    from napari_uda.adaptation import rounds

    viewer, widgets = first_run
    viewer.open_sample("napari-uda", "source_head")  # another open scan
    target = viewer.layers[TARGET]
    viewer.add_image(target.data.copy(), name="next scan", scale=target.scale,
                     translate=target.translate, metadata=dict(target.metadata))  # fmt: skip
    # a gate that rolls back any change of volume or of the sure brain: the adapted model
    # differs on the new scanner's scan (that is what adapting did), so a warning must name it
    strict = GateOptions(max_volume_change=0.05, max_dropped=0.0, consistency_tolerance=0.0)
    monkeypatch.setattr(rounds, "GateOptions", lambda **_: strict)
    panel = widgets["Adapt"].corrections
    assert panel.apply_button.isEnabled()
    panel.apply_button.click()
    assert not panel.apply_button.isEnabled()  # one check at a time
    worker = widgets["Adapt"].other_scans
    qtbot.waitUntil(lambda: not worker.busy, timeout=120_000)
    assert panel.apply_button.isEnabled()
    for scan in ("head (source scanner)", "next scan"):
        layer = viewer.layers[applied_layer_name(scan, 0)]
        assert layer.data.shape == viewer.layers[scan].data.shape
        np.testing.assert_allclose(layer.scale, viewer.layers[scan].scale)
        assert layer.data.max() == 1  # a brain was found
    assert any(
        w.startswith("next scan: the adapted model may be worse") for w in notifications["warning"]
    )
    assert TARGET not in " ".join(notifications["warning"])  # the target itself is not re-done
    assert not notifications["error"]

    # then the user exports: the report lists the corrected slices and the rounds
    refs = correct_two_slices(viewer, panel, qtbot)
    export = widgets["Export"]
    export.folder.value = tmp_path
    for key in ("mask", "model"):
        export.checks[key].value = False
    export.export_button.click()
    qtbot.waitUntil(lambda: "Exported" in export.plan.text(), timeout=60_000)
    report = json.loads((tmp_path / f"{export.stem.value}_report.json").read_text())
    slices = report["corrections"]["slices"]
    assert [(s["axis"], s["index"]) for s in slices] == [(r.axis, r.index) for r in sorted(refs)]
    assert {s["plane"] for s in slices} == {"axial", "sagittal"}
    assert [r["round"] for r in report["corrections"]["rounds"]] == [0]
    assert report["corrections"]["rounds"][0]["method"] == "tent"
