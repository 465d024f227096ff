"""deepbet as an adapter: the same mask as deepbet's own pipeline, what applies to it and what
not, and the methods that must run on it. Skipped when the optional extra is not installed."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("deepbet", reason="optional extra: pip install 'napari-uda[deepbet]'")

from napari_uda.adaptation.base import get_method
from napari_uda.adaptation.engine import AdaptationError, adapt
from napari_uda.adaptation.plan import recommended_settings
from napari_uda.core.inference import Prediction
from napari_uda.core.models import load_model
from napari_uda.core.models.deepbet import DeepbetAdapter
from napari_uda.core.volume import Volume, VolumeError, load_volume
from napari_uda.data import demo_files

#: A small brain box so that adaptation mechanics run in seconds (deepbet itself uses 256^3).
QUICK_SHAPE = (64, 64, 64)


@pytest.fixture(scope="module")
def deepbet_model() -> DeepbetAdapter:
    return load_model("deepbet")


@pytest.fixture(scope="module")
def quick_model() -> DeepbetAdapter:
    return load_model("deepbet", input_shape=QUICK_SHAPE, trainable="first_blocks")


@pytest.fixture(scope="module")
def target() -> tuple[Volume, Volume]:
    files = demo_files()
    return load_volume(files.target_image), load_volume(files.target_mask)


def reoriented(volume: Volume) -> Volume:
    """The same head, stored with its axes running Left, Inferior, Posterior."""
    canonical = volume.to_canonical()
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")),
        nib.orientations.axcodes2ornt(("L", "I", "P")),
    )
    data = nib.orientations.apply_orientation(canonical.data, transform)
    affine = canonical.affine @ nib.orientations.inv_ornt_aff(transform, canonical.shape)
    return Volume(np.ascontiguousarray(data), affine)


@pytest.fixture(scope="module")
def deepbet_run(deepbet_model, target):
    """deepbet on the target head stored in another axis order: (image, prepared, probabilities)."""
    image = reoriented(target[0])
    prepared = deepbet_model.prepare(image)
    with torch.no_grad():
        probabilities = torch.softmax(deepbet_model.forward(prepared.inputs).logits, 1)
    return image, prepared, probabilities


def test_masks_equal_deepbets_own_pipeline(deepbet_run):
    """Same preprocessing, network, threshold and post-processing as ``deepbet-cli``, on a file
    that is not stored in RAS order."""
    from deepbet.bet import BrainExtraction

    image, prepared, probabilities = deepbet_run
    assert "".join(image.axcodes) != "RAS"
    assert tuple(prepared.inputs.shape) == (1, 1, 256, 256, 256)
    ours = Prediction.from_probabilities(prepared.to_source_grid(probabilities), image)
    _, mask, _ = BrainExtraction(no_gpu=True).run(nib.Nifti1Image(image.data, image.affine))
    theirs = np.asarray(mask.dataobj) > 0
    assert ours.labels.shape == image.shape
    assert theirs.sum() > 10_000
    assert int(((ours.labels == 1) != theirs).sum()) == 0
    np.testing.assert_array_equal(ours.label_volume().affine, image.affine)


def test_probabilities_are_two_classes_and_postprocessing_keeps_entropy(deepbet_run, target):
    _, prepared, probabilities = deepbet_run
    processed = prepared.to_source_grid(probabilities)
    unprocessed = dataclasses.replace(prepared, postprocess=None).to_source_grid(probabilities)
    np.testing.assert_allclose(processed.sum(0), 1.0, atol=1e-5)
    # post-processing only swaps probabilities, so each voxel's uncertainty is unchanged
    np.testing.assert_allclose(np.sort(processed, axis=0), np.sort(unprocessed, axis=0), atol=1e-6)
    truth = reoriented(target[1]).data > 0
    found = processed.argmax(0) == 1
    assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) > 0.9


def test_norm_only_methods_are_refused_with_the_reason(deepbet_model, target):
    assert deepbet_model.capabilities == set()
    info = deepbet_model.info()
    assert info.norm_type == "instance (no affine)"
    assert "TENT and AdaBN do not apply" in info.details["notes"]
    assert "affine" in " ".join(get_method("tent").unmet_needs(deepbet_model.capabilities))
    assert "BatchNorm" in " ".join(get_method("adabn").unmet_needs(deepbet_model.capabilities))
    for method in ("adaent", "st", "mean_teacher", "distillation"):
        assert not get_method(method).unmet_needs(deepbet_model.capabilities)
    with pytest.raises(AdaptationError, match="affine"):
        adapt(deepbet_model, target[0], "tent", device="cpu")


def test_parameter_subsets(deepbet_model):
    groups = deepbet_model.parameter_groups()
    assert "norm" not in groups
    names = [n for n, _ in deepbet_model.scripted.named_parameters()]
    first = [n for n in names if n.startswith(("init.", "down0."))]
    assert len(groups["first_blocks"]) == len(first) and 0 < len(first) < len(names)
    assert len(groups["every"]) == len(names)
    # the first blocks are what methods train by default (safer: docs/model-adapters.md)
    assert deepbet_model.trainable == "first_blocks"
    assert {id(p) for p in groups["all"]} == {id(p) for p in groups["first_blocks"]}
    model = deepbet_model.clone()
    model.set_trainable("all")
    assert len(model.parameter_groups()["all"]) == len(names)


def test_recommended_settings(deepbet_model):
    """AdaEnt's default (norm-only) does not exist in deepbet: its recommendation trains "all"
    (the trainable set), at the measured learning rate and number of steps."""
    assert recommended_settings(deepbet_model, get_method("adaent")) == {
        "parameters": "all",
        "learning_rate": 5e-4,
        "epochs": 6,
    }
    assert deepbet_model.recommended_settings("mean_teacher")["learning_rate"] == 5e-4
    assert recommended_settings(deepbet_model, get_method("st")) == {}  # already "all"


@pytest.mark.parametrize("method", ["adaent", "st", "mean_teacher", "distillation"])
def test_methods_run_on_deepbet_and_train_only_the_chosen_blocks(quick_model, target, method):
    image, reference = target
    # deepbet's recommended settings (AdaEnt: parameters=all, deepbet has no norm parameters)
    settings = {**quick_model.recommended_settings(method), "epochs": 2, "learning_rate": 1e-3}
    result = adapt(
        quick_model,
        image,
        method,
        settings,
        reference=reference,
        device="cpu",
        seed=0,
    )
    assert result.prediction.labels.shape == image.shape
    assert all(np.isfinite(event["losses"]["total"]) for event in result.history)
    before = dict(quick_model.scripted.named_parameters())
    after = dict(result.model.scripted.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert result.checkpoint.step > 0 and changed
    assert all(n.startswith(("init.", "down0.")) for n in changed)


def test_adapted_deepbet_saves_and_reopens_as_deepbet(quick_model, tmp_path):
    model = quick_model.clone()
    with torch.no_grad():
        next(model.scripted.parameters()).add_(0.01)
    path = model.save(tmp_path / "deepbet_adapted.pt")
    reopened = load_model(path, input_shape=QUICK_SHAPE)
    assert isinstance(reopened, DeepbetAdapter)
    assert reopened.trainable == "first_blocks"
    for (name, a), (_, b) in zip(
        model.scripted.named_parameters(), reopened.scripted.named_parameters()
    ):
        assert torch.equal(a, b), name


def test_a_volume_without_a_head_is_a_one_line_error(deepbet_model):
    empty = Volume(np.zeros((40, 40, 40), np.float32), np.eye(4))
    with pytest.raises(VolumeError) as error:
        deepbet_model.prepare(empty)
    assert "\n" not in str(error.value)


def test_deepbet_answers_otherwise_on_a_window_so_corrections_train_on_the_whole_input(
    deepbet_model, deepbet_run
):
    """deepbet normalises every layer over its whole input (InstanceNorm without affine), so
    a window of its input does not give that window of its answer: a correction step on a
    window would train another network than the one that segments. Its corrections
    recommendation therefore trains on the whole input (corrections_crop 0)."""
    _, prepared, probabilities = deepbet_run
    window = (slice(None), slice(None), *(slice(48, 208),) * 3)  # 160^3, the centre
    with torch.no_grad():
        windowed = torch.softmax(deepbet_model.forward(prepared.inputs[window]).logits, 1)
    agreement = (windowed.argmax(1) == probabilities[window].argmax(1)).float().mean()
    assert agreement < 0.95
    recommended = deepbet_model.recommended_settings("corrections")
    assert recommended["corrections_crop"] == 0


def test_corrections_refuse_a_window_on_deepbet(quick_model, target):
    from napari_uda.core.corrections import NOT_CORRECTED

    image = target[0]
    corrections = np.full(image.shape, NOT_CORRECTED, np.int16)
    corrections[:, :, 40] = 0
    with pytest.raises(ValueError, match=r"corrections_crop must be 0.*instance"):
        adapt(quick_model, image, "corrections", {"corrections_crop": 32},
              corrections=image.with_data(corrections), device="cpu")  # fmt: skip


def test_corrections_round_on_deepbet_trains_every_weight_on_the_corrected_slices(
    quick_model, target
):
    """deepbet's corrections recommendation (every weight, anchored to the round's start): a
    round fits the corrected slices better than the model did, on the whole scan's grid."""
    from napari_uda.core.corrections import NOT_CORRECTED

    image, reference = target
    truth = np.asarray(reference.data) > 0
    corrections = np.full(image.shape, NOT_CORRECTED, np.int16)
    for index in (40, 48):  # two axial slices through the brain, fully corrected
        corrections[:, :, index] = truth[:, :, index]
    settings = {**quick_model.recommended_settings("corrections"), "steps_per_epoch": 4}
    result = adapt(quick_model, image, "corrections", settings,
                   corrections=image.with_data(corrections), device="cpu", seed=0)  # fmt: skip
    before = dict(quick_model.scripted.named_parameters())
    after = dict(result.model.scripted.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(not n.startswith(("init.", "down0.")) for n in changed)  # beyond the first blocks
    corrected = corrections != NOT_CORRECTED

    def fit(labels):
        return np.mean(labels[corrected] == corrections[corrected])

    assert fit(result.prediction.labels) > fit(result.initial_prediction.labels)
