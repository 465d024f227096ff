"""The Corrections panel of the Adapt widget: edits of ``segmentation (after)`` made through the
layer's API as napari's label tools make them (brush, fill bucket, undo) become corrected slices
on the axis the viewer steps through; jump-to and un-mark."""

from __future__ import annotations

import numpy as np
import pytest

from napari_uda._qt.layers import SEGMENTATION_AFTER, show_labels
from napari_uda.corrected_slices import MARKED, NOT_CORRECTED, SliceRef


@pytest.fixture
def after_layer(docked, synthetic_scan):
    """A scan and a finished run's 'segmentation (after)' (made as the Adapt widget makes it)."""
    viewer, widgets = docked
    image, mask, affine = synthetic_scan
    scan = viewer.add_image(
        image, name="scan", scale=(2, 2, 2), metadata={"affine": affine, "axcodes": "LAS"}
    )
    layer = show_labels(viewer, SEGMENTATION_AFTER, mask.copy(), scan)
    panel = widgets["Adapt"].corrections
    panel.start_from(layer.data, keep=False)
    return viewer, panel, layer


def _view_axis(viewer, axis: int, index: int, layer) -> None:
    """The user steps through ``axis`` and moves the slider to ``index``."""
    rest = [a for a in range(3) if a != axis]
    viewer.dims.order = (axis, *rest)
    viewer.dims.set_point(axis, layer.translate[axis] + layer.scale[axis] * index)


def test_painted_slices_count_on_the_viewed_axis_and_undo_takes_them_out(after_layer, qtbot):
    viewer, panel, layer = after_layer
    assert panel.layer is layer and len(panel.slices) == 0
    _view_axis(viewer, 2, 12, layer)
    assert "axial</b> slices (axis 2)" in panel.where.text()
    layer.brush_size = 5
    layer.paint((20, 22, 12), 0)  # the eraser: a hole in the brain on axial slice 12
    qtbot.waitUntil(lambda: panel.slices.slices == [SliceRef(2, 12)], timeout=3000)
    assert "corrected ✓" in panel.where.text()

    _view_axis(viewer, 0, 30, layer)  # then a sagittal slice, with the fill bucket
    layer.fill((30, 5, 5), 1)  # the background of that slice becomes brain
    qtbot.waitUntil(lambda: len(panel.slices) == 2, timeout=3000)
    assert panel.slices.slices == [SliceRef(0, 30), SliceRef(2, 12)]
    texts = [panel.list.item(i).text() for i in range(panel.list.count())]
    assert texts[0].startswith("sagittal 30 (axis 0)") and texts[1].startswith("axial 12")
    assert panel.heading == "Corrections (2)"

    corrections = panel.slices.corrections(layer.data)
    assert (corrections[30] == 1).all()  # the whole slice, as the user left it
    np.testing.assert_array_equal(corrections[:, :, 12], layer.data[:, :, 12])
    assert (corrections[:29, :, :12] == NOT_CORRECTED).all()

    layer.undo()  # napari's undo (Ctrl+Z) emits no paint event: the panel compares again
    qtbot.waitUntil(lambda: panel.slices.slices == [SliceRef(2, 12)], timeout=3000)
    layer.redo()
    qtbot.waitUntil(lambda: len(panel.slices) == 2, timeout=3000)


def test_jump_to_unmark_and_mark(after_layer, qtbot):
    viewer, panel, layer = after_layer
    _view_axis(viewer, 2, 5, layer)
    layer.brush_size = 3
    layer.paint((20, 22, 5), 0)
    qtbot.waitUntil(lambda: panel.list.count() == 1, timeout=3000)
    _view_axis(viewer, 1, 10, layer)  # now looking at coronal slices
    panel.list.item(0).setSelected(True)
    panel.go_button.click()  # back to axial slice 5: the viewer steps along axis 2 again
    assert viewer.dims.order[0] == 2
    assert tuple(viewer.dims.current_step)[2] == 5
    assert panel.current_slice() == SliceRef(2, 5)

    panel.unmark_button.click()
    assert len(panel.slices) == 0 and panel.list.count() == 0
    assert layer.data[20, 22, 5] == 0  # un-marking keeps the user's labels

    _view_axis(viewer, 1, 22, layer)
    panel.mark_button.click()  # a slice the user checked and found right
    assert panel.slices.origins == {SliceRef(1, 22): MARKED}
    assert "marked as right" in panel.list.item(0).text()


def test_edits_during_a_run_do_not_count(after_layer, monkeypatch, qtbot):
    viewer, panel, layer = after_layer
    monkeypatch.setattr(type(panel.state), "running", property(lambda self: True))
    _view_axis(viewer, 2, 5, layer)
    layer.paint((20, 22, 5), 0)
    qtbot.wait(300)
    assert len(panel.slices) == 0 and not panel.slices.touched
