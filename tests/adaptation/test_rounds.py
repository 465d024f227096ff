"""Headless rounds: corrections kept, corrected slices listed, history and undo, other scans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_uda.adaptation.corrections import NOT_CORRECTED
from napari_uda.adaptation.events import AdaptationResult, CheckpointChoice
from napari_uda.adaptation.rounds import (
    CorrectedSlice,
    RoundHistory,
    SparseCorrections,
    check_other_scans,
    corrected_prediction,
    corrected_slices,
    describe_corrections,
    keep_corrections,
)
from napari_uda.core.inference import Prediction


def _corrections(shape=(6, 5, 4)) -> np.ndarray:
    corrections = np.full(shape, NOT_CORRECTED, dtype=np.int16)
    corrections[:, :, 2] = 1  # a whole axial slice, all brain
    corrections[0, 0, 0] = 0  # one stroke voxel
    return corrections


def test_keep_corrections_pastes_exactly():
    labels = np.zeros((6, 5, 4), dtype=np.uint8)
    labels[3, 3, 3] = 1
    kept = keep_corrections(labels, _corrections())
    assert kept.dtype == np.uint8 and (kept[:, :, 2] == 1).all()
    assert kept[3, 3, 3] == 1 and kept[0, 0, 0] == 0
    assert labels[:, :, 2].sum() == 0  # input untouched
    with pytest.raises(ValueError, match="do not match"):
        keep_corrections(labels[:-1], _corrections())


def test_corrected_prediction_is_certain_on_corrected_voxels():
    probabilities = np.full((2, 6, 5, 4), 0.5, dtype=np.float32)
    probabilities[1] += 0.1
    probabilities[0] -= 0.1
    from napari_uda.core.volume import Volume

    prediction = Prediction.from_probabilities(
        probabilities, Volume(np.zeros((6, 5, 4)), np.eye(4))
    )
    corrections = _corrections()
    kept = corrected_prediction(prediction, corrections)
    assert kept.labels[0, 0, 0] == 0 and (kept.labels[:, :, 2] == 1).all()
    assert kept.probabilities[0, 0, 0, 0] == 1.0 and kept.entropy[0, 0, 0] == 0.0
    assert kept.entropy[5, 4, 3] == prediction.entropy[5, 4, 3]


def test_corrected_slices_and_description():
    corrections = _corrections()
    assert corrected_slices(corrections) == [CorrectedSlice(2, 2)]
    assert CorrectedSlice(2, 2).axis_name == "axial"
    facts = describe_corrections(corrections)
    assert facts == {"slices": {"axial": [2]}, "corrected_voxels": 31, "stroke_voxels": 1}


def test_sparse_corrections_round_trip():
    corrections = _corrections()
    sparse = SparseCorrections.from_dense(corrections)
    assert len(sparse.indices) == 31
    assert np.array_equal(sparse.dense(), corrections)


def _result(model, labels) -> AdaptationResult:
    probabilities = np.stack([1.0 - labels, labels]).astype(np.float32)
    from napari_uda.core.volume import Volume

    prediction = Prediction.from_probabilities(
        probabilities, Volume(labels.astype(np.float32), np.eye(4))
    )
    return AdaptationResult(
        model=model,
        prediction=prediction,
        initial_prediction=prediction,
        history=[],
        checkpoint=CheckpointChoice(1, "last", 0.1),
        stopped=False,
        stop_reason="completed",
        seconds=1.5,
        method="corrections",
        settings={"epochs": 1},
        seed=0,
        device="cpu",
    )


def test_history_records_undoes_and_rebuilds_models(tiny_model):
    history = RoundHistory(tiny_model)
    adapted = tiny_model.clone()
    with torch.no_grad():
        for parameter in adapted.network.parameters():
            parameter.add_(1.0)
    labels = np.zeros((6, 5, 4), dtype=np.uint8)
    first = history.record(_result(adapted, labels), _corrections(), reference=np.ones_like(labels))
    assert first.number == 1 and (first.labels[:, :, 2] == 1).all()
    assert first.reference_dice == pytest.approx(2 * 30 / (31 + 120 - 1 + 1), abs=0.01)
    assert all(v.device.type == "cpu" for v in first.state.values())
    rebuilt = history.model()
    original = next(tiny_model.network.parameters())
    assert torch.allclose(next(rebuilt.network.parameters()), original + 1.0)
    assert torch.allclose(next(history.model(0).network.parameters()), original)
    summary = history.report()[0]
    assert summary["corrections"]["slices"] == {"axial": [2]} and summary["round"] == 1
    assert history.undo() is None and len(history) == 0
    with pytest.raises(IndexError):
        history.model(1)


def test_other_scans_are_gated_against_the_source_model(tiny_model, tiny_target):
    same = check_other_scans(tiny_model, tiny_model, [tiny_target])[0]
    assert same.agreement_dice == pytest.approx(1.0) and same.warning == ""
    assert same.decision.keep == "adapted"
    shrunk = tiny_model.clone()
    with torch.no_grad():
        shrunk.network.head.bias[1] -= 3.0  # the "adapted" model loses the brain
    check = check_other_scans(shrunk, tiny_model, [tiny_target])[0]
    assert check.decision.rolled_back and check.volume_ratio < 0.1
    assert check.warning.startswith("the adapted model may be worse on this scan: ")
    assert "below the expected" in check.warning and "volume changed too much" in check.warning
    # the user asked for the adapted model's mask: it is returned, with the warning
    assert (check.prediction.labels > 0).sum() < (same.prediction.labels > 0).sum()
