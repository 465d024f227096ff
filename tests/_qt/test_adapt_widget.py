"""The Adapt widget driven as a user does: demo model, new-scanner sample, Run (then Export),
Stop, close."""

from __future__ import annotations

import gc

import nibabel as nib
import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

from napari_uda._qt.layers import (
    ENTROPY_AFTER,
    ENTROPY_BEFORE,
    RESULT_LAYERS,
    SEGMENTATION_AFTER,
    SEGMENTATION_BEFORE,
)
from napari_uda._qt.state import RunStatus, get_state
from napari_uda.adaptation import available_methods
from napari_uda.data import demo_files

TARGET = "head (new scanner)"
REFERENCE = "brain mask (new scanner)"


def choose_method(adapt, name: str, **settings) -> None:
    adapt.method_combo.setCurrentIndex(adapt.method_combo.findData(name))
    adapt.form.set_values(settings)


@pytest.fixture
def demo_session(docked, qtbot):
    """The user opens the new-scanner head and its mask from File > Open Sample and clicks
    "Demo model"."""
    viewer, widgets = docked
    viewer.open_sample("napari-uda", "target_head")
    viewer.open_sample("napari-uda", "target_mask")
    widgets["Model"].demo_button.click()
    assert get_state(viewer).model is not None
    return viewer, widgets


def test_run_shows_before_and_after_layers_on_the_target(
    demo_session, qtbot, notifications, wait_for_run, tmp_path
):
    viewer, widgets = demo_session
    adapt = widgets["Adapt"]
    assert adapt.target.value.name == TARGET
    choose_method(adapt, "tent", epochs=1, batch_size=32)
    adapt.reference.value = viewer.layers[REFERENCE]
    adapt.preview_every.value = 2
    qtbot.mouseClick(adapt.run_button, Qt.MouseButton.LeftButton)
    assert not adapt.run_button.isEnabled() and adapt.stop_button.isEnabled()
    # the before layers come from the engine's first event (the unadapted model), before
    # the run ends
    qtbot.waitUntil(lambda: SEGMENTATION_BEFORE in viewer.layers, timeout=60_000)
    assert adapt.plots.points("entropy") >= 1
    wait_for_run(adapt)

    state = get_state(viewer)
    result = state.result
    assert state.status == RunStatus.FINISHED and result is not None and not notifications["error"]
    target = viewer.layers[TARGET]
    for name in RESULT_LAYERS:
        layer = viewer.layers[name]
        assert layer.data.shape == target.data.shape
        np.testing.assert_allclose(layer.scale, target.scale)
        np.testing.assert_allclose(layer.translate, target.translate)
        np.testing.assert_allclose(layer.metadata["affine"], target.metadata["affine"])
    for name in ("entropy (before)", ENTROPY_AFTER):
        assert viewer.layers[name].colormap.name == "magma"
        assert tuple(viewer.layers[name].contrast_limits) == (0.0, 1.0)
    np.testing.assert_array_equal(viewer.layers[SEGMENTATION_AFTER].data, result.prediction.labels)
    np.testing.assert_array_equal(
        viewer.layers[SEGMENTATION_BEFORE].data, result.initial_prediction.labels
    )
    np.testing.assert_array_equal(
        viewer.layers[ENTROPY_BEFORE].data, result.initial_prediction.entropy
    )
    assert adapt.plots.data["entropy"][0][0] == 0  # the curves start at step 0
    # after started as a copy of before (made in the worker): painting one leaves the other
    assert viewer.layers[SEGMENTATION_AFTER].data is not viewer.layers[SEGMENTATION_BEFORE].data
    assert gc.get_freeze_count() == 0  # the collector is thawed once the run ended
    steps = len(result.history)
    assert adapt.plots.points("loss") == steps >= 1
    assert adapt.plots.points("entropy") >= 1 and adapt.plots.points("reference") >= 1
    assert result.reference_dice_after is not None
    assert "Dice vs reference" in adapt.status.text()
    assert adapt.run_button.isEnabled() and not adapt.stop_button.isEnabled()
    # the result layers are not offered as inputs of the next run
    assert [layer.name for layer in adapt.target.choices] == [TARGET]
    assert [layer.name for layer in adapt.reference.choices if layer] == [REFERENCE]

    # then the user exports the mask and opens it elsewhere: it lies on the scan's grid
    export = widgets["Export"]
    export.folder.value = tmp_path
    qtbot.mouseClick(export.export_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "Exported" in export.plan.text(), timeout=60_000)
    saved = nib.load(str(tmp_path / f"{export.stem.value}_mask.nii.gz"))
    scan = nib.load(str(demo_files().target_image))
    np.testing.assert_allclose(saved.affine, scan.affine)
    assert saved.shape == scan.shape
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), result.prediction.labels)


def test_stop_halfway_keeps_layers_consistent(demo_session, qtbot, wait_for_run):
    viewer, widgets = demo_session
    adapt = widgets["Adapt"]
    choose_method(adapt, "tent", epochs=5, batch_size=8)
    adapt.preview_every.value = 0
    adapt.run_button.click()
    qtbot.waitUntil(lambda: adapt.plots.points("loss") >= 2, timeout=120_000)
    seen = adapt.last_event.step  # the newest step received (the plots refresh once a second)
    progress = adapt._progress  # napari's progress bar (activity dock), with the planned total
    assert progress is not None and progress.n >= 1 and progress.total > seen
    qtbot.mouseClick(adapt.stop_button, Qt.MouseButton.LeftButton)
    assert get_state(viewer).status == "stopping" and not adapt.stop_button.isEnabled()
    wait_for_run(adapt)

    result = get_state(viewer).result
    assert get_state(viewer).status == RunStatus.STOPPED
    assert result.stopped and result.stop_reason == "stopped by user"
    total = result.history[-1]["total_steps"]
    assert seen <= len(result.history) <= seen + 2 < total  # honoured within a step
    assert adapt.plots.points("loss") == len(result.history)  # every step is plotted at the end
    np.testing.assert_array_equal(viewer.layers[SEGMENTATION_AFTER].data, result.prediction.labels)
    assert viewer.layers[ENTROPY_AFTER].data.shape == viewer.layers[TARGET].data.shape
    assert adapt.run_button.isEnabled() and adapt._progress is None


def test_closing_the_viewer_stops_the_run(demo_session, qtbot):
    viewer, widgets = demo_session
    adapt = widgets["Adapt"]
    choose_method(adapt, "tent", epochs=20, batch_size=8)
    adapt.run_button.click()
    qtbot.waitUntil(lambda: adapt.plots.points("loss") >= 1, timeout=120_000)
    runner = adapt.runner
    # napari's close prompt lists running tasks: ours says what closing does
    prompt = "\n".join(viewer.window._task_status_manager.get_status())
    assert "napari-uda adaptation (tent)" in prompt and "nothing is saved" in prompt
    assert "press Stop" in prompt and "<function" not in prompt
    viewer.close()
    assert runner._stop.is_set()
    assert not runner.running  # the engine ended before close() returned
    assert gc.get_freeze_count() == 0


def test_methods_the_model_cannot_use_are_disabled(docked, group_norm_bundle_path):
    viewer, widgets = docked
    widgets["Model"].load_path(group_norm_bundle_path)
    adapt = widgets["Adapt"]
    model = get_state(viewer).model
    methods = available_methods()
    combo = adapt.method_combo
    for index in range(combo.count()):
        name = combo.itemData(index)
        reasons = methods[name].unmet_needs(model.capabilities)
        item = combo.model().item(index)
        assert item.isEnabled() == (not reasons)
        tip = item.data(Qt.ItemDataRole.ToolTipRole)
        assert all(reason in tip for reason in reasons)
    assert not combo.model().item(combo.findData("adabn")).isEnabled()
    assert "BatchNorm" in combo.model().item(combo.findData("adabn")).toolTip()
    assert not combo.model().item(combo.findData("udas")).isEnabled()
    assert combo.model().item(combo.currentIndex()).isEnabled()


def test_settings_form_follows_the_method(docked, tiny_bundle_path):
    viewer, widgets = docked
    widgets["Model"].load_path(tiny_bundle_path)
    adapt = widgets["Adapt"]
    for name, method in available_methods().items():
        if method.unmet_needs(get_state(viewer).model.capabilities):
            continue
        adapt.method_combo.setCurrentIndex(adapt.method_combo.findData(name))
        assert adapt.form.settings_class is method.Settings
        assert set(adapt.form.values()) == set(adapt.form.specs)
        assert adapt.method_summary.text() == method.summary


def test_worker_error_reaches_the_user_as_one_line(
    docked, tiny_bundle_path, qtbot, notifications, monkeypatch, synthetic_scan, wait_for_run
):
    viewer, widgets = docked
    image, _, affine = synthetic_scan
    viewer.add_image(image, name="scan", scale=(2, 2, 2), metadata={"affine": affine})
    widgets["Model"].load_path(tiny_bundle_path)

    def broken_engine(*args, **kwargs):
        raise ValueError("the target volume holds no head\nsecond line of detail")
        yield  # a generator, like the engine

    monkeypatch.setattr("napari_uda.adaptation.engine.run_adaptation", broken_engine)
    adapt = widgets["Adapt"]
    adapt.separate_process = False  # the patched engine exists in this process only
    adapt.run_button.click()
    wait_for_run(adapt)
    assert notifications["error"] == ["Adaptation failed: the target volume holds no head"]
    assert get_state(viewer).status == RunStatus.FAILED and get_state(viewer).result is None
    assert adapt.run_button.isEnabled()
    assert not any(name in viewer.layers for name in RESULT_LAYERS)  # nothing half-made


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_error_in_the_adaptation_process_reaches_the_user(
    docked, tiny_bundle_path, notifications, synthetic_scan, wait_for_run
):
    """The engine runs in a separate process by default; its errors come back as one line."""
    viewer, widgets = docked
    image, _, affine = synthetic_scan
    viewer.add_image(image, name="scan", scale=(2, 2, 2), metadata={"affine": affine})
    widgets["Model"].load_path(tiny_bundle_path)
    get_state(viewer).device = "cuda"  # chosen on a machine without CUDA: fails in the child
    adapt = widgets["Adapt"]
    assert adapt.separate_process
    adapt.run_button.click()
    wait_for_run(adapt)
    [message] = notifications["error"]
    assert message.startswith("Adaptation failed: device 'cuda' is not available here")
    assert "\n" not in message
    assert get_state(viewer).status == RunStatus.FAILED and get_state(viewer).result is None
    assert not any(name in viewer.layers for name in RESULT_LAYERS)


def test_bad_settings_and_mismatched_reference_never_start(
    docked, tiny_bundle_path, notifications, synthetic_scan
):
    viewer, widgets = docked
    image, mask, affine = synthetic_scan
    viewer.add_image(image, name="scan", metadata={"affine": affine})
    viewer.add_labels(mask[:-2], name="other mask")
    widgets["Model"].load_path(tiny_bundle_path)
    adapt = widgets["Adapt"]
    choose_method(adapt, "tent")
    adapt.form["learning_rate"].value = "quick"
    adapt.run_button.click()
    assert "learning_rate" in notifications["error"][-1]
    adapt.form["learning_rate"].value = "0.001"
    adapt.reference.value = viewer.layers["other mask"]
    adapt.run_button.click()
    assert "differ in shape" in notifications["error"][-1]
    assert not adapt.runner.running and get_state(viewer).status == "idle"


@pytest.mark.parametrize("separate_process", [True, False])
def test_training_and_predictions_never_run_on_the_gui_thread(
    docked, tiny_bundle_path, qtbot, monkeypatch, synthetic_scan, wait_for_run, separate_process
):
    """By default they run in a separate process (none in napari's); else in the worker."""
    import threading

    viewer, widgets = docked
    image, _, affine = synthetic_scan
    viewer.add_image(image, name="scan", metadata={"affine": affine})
    widgets["Model"].load_path(tiny_bundle_path)
    tent = available_methods()["tent"]
    original_step, threads = tent.step, []

    def recording_step(self, *args, **kwargs):
        threads.append(threading.current_thread())
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(tent, "step", recording_step)
    from napari_uda.adaptation import engine

    original_predict, predicting = engine.predict_batches, []

    def recording_predict(*args, **kwargs):
        predicting.append(threading.current_thread())
        return original_predict(*args, **kwargs)

    monkeypatch.setattr(engine, "predict_batches", recording_predict)
    adapt = widgets["Adapt"]
    adapt.separate_process = separate_process
    choose_method(adapt, "tent", epochs=1, batch_size=8)
    adapt.run_button.click()
    wait_for_run(adapt)
    steps = len(get_state(viewer).result.history)
    assert steps >= 2
    if separate_process:
        assert threads == [] and predicting == []  # nothing of it ran in napari's process
        return
    assert len(threads) == steps
    assert all(thread is not threading.main_thread() for thread in threads)
    # the unadapted prediction ("before") and the evaluations happen in the worker too
    assert predicting and all(thread is not threading.main_thread() for thread in predicting)


def test_events_are_plotted_in_batches(docked, qtbot):
    """Events arriving faster than the refresh interval are plotted together: one redraw (one
    composition of the window) per refresh, not per event."""
    from napari_uda._qt.adapt_widget import REFRESH_MS
    from napari_uda.adaptation.events import AdaptationEvent

    _, widgets = docked
    adapt = widgets["Adapt"]
    batches = []
    add_events = adapt.plots.add_events
    adapt.plots.add_events = lambda events: (batches.append(len(events)), add_events(events))
    for step in range(1, 9):
        adapt._on_yield(AdaptationEvent(step, 8, 1, {"total": 1.0 / step}, 0.1 * step))
    assert adapt.plots.points("loss") == 0 and adapt.last_event.step == 8
    qtbot.waitUntil(lambda: adapt.plots.points("loss") == 8, timeout=10 * REFRESH_MS)
    assert batches == [8]
    assert list(adapt.plots.curves["loss"].getData()[0]) == list(range(1, 9))
