"""The QA widget: per-slice table from the before/after layers, sorting, navigation, volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from napari.layers import Image

from napari_uda._qt.layers import show_entropy, show_labels
from napari_uda._qt.slice_stats import slice_dice, slice_table

SPACING = (2.0, 1.5, 3.0)
TRANSLATE = (-10.0, 4.0, 7.0)


def _case(seed=0, shape=(6, 9, 8)):
    rng = np.random.default_rng(seed)
    before = np.zeros(shape, np.uint8)
    before[1:5, 2:7, 2:6] = 1
    after = before.copy()
    after[3, 2:7, 2:7] = 1  # grows on slice 3 (axis 0)
    after[4, 2:4, 2:6] = 0  # shrinks on slice 4
    reference = np.zeros(shape, np.uint8)
    reference[1:5, 2:7, 2:7] = 1
    entropy_before = rng.uniform(0, 1, shape).astype(np.float32)
    entropy_after = entropy_before * 0.5
    return before, after, reference, entropy_before, entropy_after


def _dice(a, b):
    total = a.sum() + b.sum()
    return 2 * np.logical_and(a, b).sum() / total if total else math.nan


def test_slice_table_numbers_match_direct_computation():
    before, after, reference, e_before, e_after = _case()
    for axis in range(3):
        table = slice_table(before, after, e_before, e_after, axis, reference=reference)
        for index in range(before.shape[axis]):

            def take(array, index=index, axis=axis):
                return np.take(array, index, axis=axis)

            assert table.changed[index] == (take(before) != take(after)).sum()
            assert table.entropy_after[index] == pytest.approx(take(e_after).mean())
            expected = _dice(take(after) == 1, take(reference) == 1)
            assert table.dice_after[index] == pytest.approx(expected, nan_ok=True)


def test_slice_dice_averages_present_classes_only():
    prediction = np.zeros((2, 4, 4), np.uint8)
    reference = np.zeros((2, 4, 4), np.uint8)
    prediction[0, :2] = 1
    reference[0, :2] = 1
    prediction[0, 2:] = 2  # class 2 predicted, absent in the reference: Dice 0
    scores = slice_dice(prediction, reference, 0, 3)
    assert scores[0] == pytest.approx(0.5) and math.isnan(scores[1])


@pytest.fixture
def qa_session(docked):
    viewer, widgets = docked
    before, after, reference, e_before, e_after = _case()
    target = viewer.add_image(
        e_before * 100, name="scan", scale=SPACING, translate=TRANSLATE, metadata={}
    )
    viewer.add_labels(reference, name="reference", scale=SPACING, translate=TRANSLATE)
    show_labels(viewer, "segmentation (before)", before, target)
    show_labels(viewer, "segmentation (after)", after, target)
    show_entropy(viewer, "entropy (before)", e_before, target)
    show_entropy(viewer, "entropy (after)", e_after, target)
    qa = widgets["QA"]
    qa.refresh_button.click()
    return viewer, qa, (before, after, reference)


def test_table_lists_every_slice_with_and_without_reference(qa_session):
    viewer, qa, (before, after, reference) = qa_session
    assert qa.reference.value is None
    assert qa.table.rowCount() == before.shape[0] and qa.table.columnCount() == 4
    changed_column = 3
    assert [int(qa.table.item(row, changed_column).value) for row in range(6)] == [
        (before[i] != after[i]).sum() for i in range(6)
    ]
    qa.reference.value = viewer.layers["reference"]  # refreshes by itself
    assert qa.table.columnCount() == 6
    headers = [qa.table.horizontalHeaderItem(c).text() for c in range(6)]
    assert headers[4:] == ["Dice\nbefore", "Dice\nafter"]
    assert qa.table.item(3, 5).value == pytest.approx(_dice(after[3] == 1, reference[3] == 1))
    assert qa.table.item(0, 5).text() == "—"  # no foreground anywhere on slice 0


def test_sorting_is_numeric_and_clicking_moves_the_viewer(qa_session):
    viewer, qa, (before, after, _) = qa_session
    changed_column = 3
    qa.table.sortItems(changed_column)  # ascending
    values = [qa.table.item(row, changed_column).value for row in range(qa.table.rowCount())]
    assert values == sorted(values)
    qa.table.sortItems(changed_column, order=1)  # descending: most changed slice first
    top_slice = int(qa.table.item(0, 0).value)
    assert top_slice == int(np.argmax([(before[i] != after[i]).sum() for i in range(6)]))
    qa.table.cellClicked.emit(0, 2)
    assert viewer.dims.current_step[0] == top_slice
    assert viewer.dims.point[0] == pytest.approx(TRANSLATE[0] + SPACING[0] * top_slice)


def test_volume_summary_in_ml(qa_session):
    viewer, qa, (before, after, reference) = qa_session
    qa.reference.value = viewer.layers["reference"]
    voxel_ml = np.prod(SPACING) / 1000
    assert qa.summary.rowCount() == 1
    assert qa.summary.item(0, 0).text() == "class 1"
    assert qa.summary.item(0, 1).value == pytest.approx((before == 1).sum() * voxel_ml)
    assert qa.summary.item(0, 2).value == pytest.approx((after == 1).sum() * voxel_ml)
    assert qa.summary.item(0, 4).value == pytest.approx((reference == 1).sum() * voxel_ml)
    change = ((after == 1).sum() - (before == 1).sum()) / (before == 1).sum() * 100
    assert qa.summary.item(0, 3).text() == f"{change:+.1f} %"


def test_table_follows_the_slicing_axis(qa_session):
    viewer, qa, (before, _, _) = qa_session
    viewer.dims.order = (2, 0, 1)
    assert qa.slice_axis() == 2 and qa.table.rowCount() == before.shape[2]
    assert isinstance(viewer.layers["entropy (after)"], Image)
