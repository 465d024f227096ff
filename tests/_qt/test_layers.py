"""Result layers: placed on the target, made once, later predictions copied in place."""

from __future__ import annotations

import numpy as np

from napari_uda._qt.gui_queue import GuiQueue
from napari_uda._qt.layers import (
    ENTROPY_AFTER,
    ENTROPY_LIMITS,
    SEGMENTATION_AFTER,
    show_entropy,
    show_labels,
)


def test_updates_copy_into_the_layer_made_first(make_napari_viewer):
    viewer = make_napari_viewer()
    like = viewer.add_image(np.zeros((6, 7, 8), np.float32), scale=(2, 2, 3), translate=(1, 2, 3))
    first = np.zeros((6, 7, 8), np.uint8)
    layer = show_labels(viewer, SEGMENTATION_AFTER, first, like)
    np.testing.assert_allclose(layer.scale, like.scale)
    np.testing.assert_allclose(layer.translate, like.translate)
    events = []
    layer.events.data.connect(events.append)
    update = np.ones_like(first)
    assert show_labels(viewer, SEGMENTATION_AFTER, update, like) is layer
    assert layer.data is first and np.array_equal(layer.data, update)  # copied, not swapped
    assert not events  # no dims / layer-list churn for a new prediction
    other = np.ones((6, 7, 9), np.uint8)  # a new shape replaces the array
    show_labels(viewer, SEGMENTATION_AFTER, other, like)
    assert layer.data is other

    entropy = show_entropy(viewer, ENTROPY_AFTER, np.zeros((6, 7, 8)), like)
    assert entropy.data.dtype == np.float32
    show_entropy(viewer, ENTROPY_AFTER, np.full((6, 7, 8), 0.5, np.float32), like)
    assert float(entropy.data.mean()) == 0.5
    assert tuple(entropy.contrast_limits) == ENTROPY_LIMITS


def test_gui_queue_runs_one_piece_of_work_at_a_time(qtbot):
    queue, done = GuiQueue(), []
    queue.put(lambda: done.append("a"), key="x")
    queue.put(lambda: done.append("b"), key="x")  # supersedes the pending "a"
    queue.put(lambda: done.append("c"))
    assert len(queue) == 2
    qtbot.waitUntil(lambda: len(queue) == 0, timeout=2000)
    assert done == ["b", "c"]
