"""User corrections reach the methods through the model's own preparation, 2D and 3D alike."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from scripted_factory import base_spec, save_model, synthetic_head, train_tiny

from napari_uda.adaptation.base import AdaptationMethod, StepOutput
from napari_uda.adaptation.engine import AdaptationError, adapt
from napari_uda.core.corrections import NOT_CORRECTED, corrections_from_slices
from napari_uda.core.models import load_model
from napari_uda.core.volume import Volume


class Recorder(AdaptationMethod):
    """Changes nothing; remembers the context the engine built (test only)."""

    name = "recorder"
    title = "Recorder (test only)"
    seen: ClassVar[list] = []

    def setup(self):
        Recorder.seen.append(self.context)

    def step(self, batch_index, step):
        return StepOutput({"total": 0.0})


def test_corrections_from_slices_keeps_only_those_slices():
    labels = np.arange(24).reshape(2, 3, 4) % 3
    corrections = corrections_from_slices(labels, axis=2, indices=[1, 3])
    assert corrections.dtype.kind == "i"
    np.testing.assert_array_equal(corrections[:, :, [1, 3]], labels[:, :, [1, 3]])
    assert (corrections[:, :, [0, 2]] == NOT_CORRECTED).all()


def recorded_corrections(model, volumes, corrections):
    Recorder.seen.clear()
    result = adapt(model, volumes, Recorder, {"epochs": 1}, corrections=corrections, device="cpu")
    return Recorder.seen[-1], result


def assert_round_trip(model, volumes, corrections: np.ndarray):
    """The corrections on the inputs map back onto the first scan exactly; padding and the
    other volumes' inputs are NOT_CORRECTED."""
    context, result = recorded_corrections(model, volumes, corrections)
    mapped = context.corrections
    # classes and -1 kept in 2 bytes a voxel (a 256^3 input would take 134 MB as int64)
    assert mapped.dtype == torch.int16 and mapped.shape == context.target_inputs[:, 0].shape
    prepared = model.prepare(volumes[0])
    rows = prepared.inputs.shape[0]
    own = mapped[(slice(0, rows), *(slice(0, n) for n in prepared.inputs.shape[2:]))]
    shifted = torch.nn.functional.one_hot(own.long() + 1, model.num_classes + 1)  # -1 -> class 0
    back = prepared.to_source_grid(torch.movedim(shifted, -1, 1).float(), nearest=True)
    np.testing.assert_array_equal(back.argmax(0) - 1, corrections)
    assert (mapped[rows:] == NOT_CORRECTED).all()  # the second volume
    invalid = ~context.valid_mask[:, 0] if context.valid_mask is not None else None
    assert invalid is not None and invalid.any() and (mapped[invalid] == NOT_CORRECTED).all()
    assert result.extra["corrections"]["voxels"] == int((corrections >= 0).sum())
    return context


def test_corrections_round_trip_for_a_2d_bundle(tiny_model, make_synthetic_head):
    image, mask = make_synthetic_head((40, 40, 20), seed=3)
    other, _ = make_synthetic_head((52, 44, 24), seed=4)
    corrections = corrections_from_slices(np.asarray(mask.data), axis=2, indices=[5, 9, 10])
    assert_round_trip(tiny_model, [image, other], corrections)


def test_corrections_round_trip_for_a_3d_torchscript_model(tmp_path):
    spec = base_spec(3, pad_multiple=8)
    model = load_model(save_model(train_tiny(3, spec, steps=5), spec, tmp_path))
    image, mask = synthetic_head(7)
    other, _ = synthetic_head(8)
    other = Volume(np.pad(other.data, ((0, 6), (0, 0), (0, 9)), mode="edge"), other.affine)
    corrections = corrections_from_slices(np.asarray(mask.data), axis=1, indices=[12, 20])
    assert_round_trip(model, [image, other], corrections)


def test_without_corrections_the_context_has_none(tiny_model, tiny_target):
    context, result = recorded_corrections(tiny_model, tiny_target, None)
    assert context.corrections is None and result.extra["corrections"] is None


def test_bad_corrections_are_refused_with_one_line(tiny_model, tiny_target):
    wrong_shape = np.full((3, 3, 3), NOT_CORRECTED)
    with pytest.raises(
        AdaptationError, match=r"the corrections \(shape \(3, 3, 3\)\) does not match"
    ):
        recorded_corrections(tiny_model, tiny_target, wrong_shape)
    wrong_value = np.full(tiny_target.shape, NOT_CORRECTED)
    wrong_value[0, 0, 0] = 7
    with pytest.raises(AdaptationError, match="the corrections hold the value 7"):
        recorded_corrections(tiny_model, tiny_target, wrong_value)
