"""The corrected-slices model (no Qt): which slices count, undo, un-mark, the corrections volume."""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from napari_uda.adaptation.rounds import keep_corrections
from napari_uda.corrected_slices import (
    KEPT,
    MARKED,
    NOT_CORRECTED,
    CorrectedSlices,
    Round,
    Rounds,
    SliceRef,
    plane_name,
    touched_slices,
)

# napari's mask-based history atom has these fields (duck-typed: no napari import here)
MaskedAtom = namedtuple("MaskedAtom", "slice_key mask old_values new_value")


def _prediction(shape=(6, 8, 10)):
    labels = np.zeros(shape, np.uint8)
    labels[1:5, 2:6, 3:8] = 1
    return labels


def _paint(labels, ref, value=1, at=2):
    """Paint a small square on slice ``ref`` as napari's brush does; the event's atoms."""
    key = list(ref.key(labels.ndim))
    other = [a for a in range(labels.ndim) if a != ref.axis]
    key[other[0]], key[other[1]] = slice(at, at + 2), slice(at, at + 2)
    old = labels[tuple(key)].copy()
    labels[tuple(key)] = value
    box = list(key)
    box[ref.axis] = slice(ref.index, ref.index + 1)
    return [MaskedAtom(tuple(box), None, old, value)], tuple(key), old


def test_edited_slices_count_and_undo_takes_them_out():
    labels = _prediction()
    slices = CorrectedSlices()
    slices.reset(labels)
    atoms, key, old = _paint(labels, SliceRef(0, 2))
    assert touched_slices(atoms, labels.shape, view_axis=0) == {SliceRef(0, 2)}
    assert slices.edited(labels, touched_slices(atoms, labels.shape, 0))
    atoms2, *_ = _paint(labels, SliceRef(2, 7), value=0, at=3)  # erasing on another axis
    slices.edited(labels, touched_slices(atoms2, labels.shape, 2))
    assert slices.slices == [SliceRef(0, 2), SliceRef(2, 7)]

    labels[key] = old  # napari's undo restores the values and emits no paint event
    assert slices.recheck(labels)
    assert slices.slices == [SliceRef(2, 7)]
    labels[key] = 1  # redo
    assert slices.recheck(labels) and SliceRef(0, 2) in slices


def test_painting_without_a_change_does_not_count_but_marking_does():
    labels = _prediction()
    slices = CorrectedSlices()
    slices.reset(labels)
    # a 3-tuple atom (data_setitem) that painted label 1 where there was 1 already
    atom = ((np.array([2, 2]), np.array([3, 4]), np.array([4, 4])), np.array([1, 1]), 1)
    assert not slices.edited(labels, touched_slices([atom], labels.shape, 0))
    assert len(slices) == 0
    slices.mark(SliceRef(0, 2))
    assert slices.origins[SliceRef(0, 2)] == MARKED
    assert not slices.recheck(labels) and SliceRef(0, 2) in slices  # marked stays


def test_unmark_keeps_a_slice_out_until_it_is_painted_again():
    labels = _prediction()
    slices = CorrectedSlices()
    slices.reset(labels)
    atoms, *_ = _paint(labels, SliceRef(1, 5))
    slices.edited(labels, touched_slices(atoms, labels.shape, 1))
    slices.unmark(SliceRef(1, 5))
    assert len(slices) == 0
    assert not slices.recheck(labels)  # still differs, but the user took it out
    atoms, *_ = _paint(labels, SliceRef(1, 5), value=0)
    assert slices.edited(labels, touched_slices(atoms, labels.shape, 1))
    assert slices.slices == [SliceRef(1, 5)]


def test_corrections_volume_and_paste_keep_the_users_slices_exactly():
    labels = _prediction()
    slices = CorrectedSlices()
    slices.reset(labels)
    for ref in (SliceRef(0, 1), SliceRef(2, 4)):
        atoms, *_ = _paint(labels, ref, value=2)
        slices.edited(labels, touched_slices(atoms, labels.shape, ref.axis))
    corrections = slices.corrections(labels)
    assert corrections.dtype == np.int16
    corrected = slices.mask(labels.shape)
    np.testing.assert_array_equal(corrections[corrected], labels[corrected])
    assert (corrections[~corrected] == NOT_CORRECTED).all()
    assert corrected[1].all() and corrected[:, :, 4].all() and corrected.sum() == 8 * 10 + 6 * 8 - 8

    new_prediction = np.zeros_like(labels)  # a round's prediction, pasted
    pasted = keep_corrections(new_prediction, corrections)
    np.testing.assert_array_equal(pasted[corrected], labels[corrected])
    assert (pasted[~corrected] == 0).all()

    slices.rebase(pasted)  # after the round the slices stay, as used
    assert set(slices.origins.values()) == {KEPT} and len(slices) == 2
    assert not slices.recheck(pasted) and len(slices) == 2


def test_a_3d_edit_touches_every_slice_it_spans_and_the_axis_defaults_to_the_thinnest():
    box = (slice(1, 4), slice(2, 3), slice(0, 5))
    atom = MaskedAtom(box, None, None, 1)
    assert touched_slices([atom], (6, 8, 10), 0) == {SliceRef(0, i) for i in (1, 2, 3)}
    assert touched_slices([atom], (6, 8, 10), None) == {SliceRef(1, 2)}


def test_plane_names_follow_the_orientation_codes():
    assert [plane_name(a, "LAS") for a in range(3)] == ["sagittal", "coronal", "axial"]
    assert plane_name(1, None) == "axis 1"


def result(seed: int, model=None):
    """A finished run's result on a random (2, 6, 8, 10) prediction (``model``: any object)."""
    from napari_uda.adaptation.events import AdaptationResult, CheckpointChoice
    from napari_uda.core.inference import Prediction
    from napari_uda.core.volume import Volume

    scores = np.random.default_rng(seed).random((2, 6, 8, 10)).astype(np.float32)
    probabilities = scores / scores.sum(0)
    volume = Volume(probabilities[0], np.eye(4))
    prediction = Prediction.from_probabilities(probabilities, volume)
    return AdaptationResult(
        model=object() if model is None else model, prediction=prediction,
        initial_prediction=prediction, history=[], checkpoint=CheckpointChoice(1, "final"),
        stopped=False, stop_reason="completed", seconds=1.0, method="corrections", settings={},
        predictions=[prediction],
    )  # fmt: skip


def test_earlier_rounds_keep_their_results_without_probabilities():
    class History:  # RoundHistory's recording part
        def record(self, *args, **kwargs):
            pass

    rounds = Rounds(history=History())
    first, second = result(0), result(1)
    first.rolled_back = "what the gate rolled back"
    rounds.rounds = [Round(0, first)]
    corrections = np.full((6, 8, 10), NOT_CORRECTED, np.int16)
    rounds.add(second, {}, corrections, _prediction(), CorrectedSlices())
    kept = rounds.rounds[0].result
    assert kept.prediction.probabilities.size == 0 and kept.model is first.model
    assert kept.predictions[0] is kept.prediction and kept.initial_prediction is kept.prediction
    np.testing.assert_array_equal(kept.prediction.labels, first.prediction.labels)
    np.testing.assert_array_equal(kept.prediction.entropy, first.prediction.entropy)
    assert rounds.current.result is second  # the latest round keeps everything
    assert second.prediction.probabilities.shape == (2, 6, 8, 10)
    assert kept.rolled_back is None  # a later round started: a roll-back there stands


def test_an_overruled_run_continues_the_rounds_from_the_adapted_model():
    import torch

    class Model:  # what the round history reads of a model
        def __init__(self, weight: float):
            self.network = torch.nn.Linear(1, 1)
            torch.nn.init.constant_(self.network.weight, weight)

    rounds = Rounds()
    first = result(0, Model(0.0))  # the unadapted model (the gate rolled the run back)
    rounds.begin(first, {})
    first.model = Model(1.0)  # overrule_gate put the adapted model back
    rounds.overruled()
    assert rounds.history.base is first.model and len(rounds.history) == 0

    second = result(1, Model(2.0))
    corrections = np.full((6, 8, 10), NOT_CORRECTED, np.int16)
    corrections[2] = 1
    rounds.add(second, {}, corrections, _prediction(), CorrectedSlices())
    assert float(rounds.history.latest.state["weight"]) == 2.0
    second.model, second.prediction = Model(3.0), result(2).prediction  # overruled too
    rounds.overruled()
    latest = rounds.history.latest
    assert len(rounds.history) == 1 and float(latest.state["weight"]) == 3.0
    np.testing.assert_array_equal(latest.corrections.dense(), corrections)
    expected = keep_corrections(second.prediction.labels, corrections)
    np.testing.assert_array_equal(latest.labels, expected)
