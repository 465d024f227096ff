"""nnU-Net v2 trained-model folders: napari-uda predicts as nnU-Net's own ``nnUNetPredictor``
(3D with several folds, mirroring, padding and a transpose; 2D), refuses unsafe or malformed
folders with one line, adapts on a shifted demo head and saves a folder nnU-Net predicts with."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_uda.adaptation.engine import AdaptationError, adapt
from napari_uda.core.inference import predict_volume
from napari_uda.core.models import ModelSaveError, load_model
from napari_uda.core.models.adapter import NORM_AFFINE
from napari_uda.core.models.nnunet import NnUNetAdapter, region_class_logits
from napari_uda.core.models.registry import ModelLoadError
from napari_uda.core.outputs import OutputSet
from napari_uda.core.volume import Volume, VolumeError, load_volume
from napari_uda.data import demo_files
from nnunet_factory import DATASET, nnunet_checkpoint, train_folder, write_folder

pytest.importorskip("dynamic_network_architectures")

#: A coarse model grid and small windows keep the tests fast on 2 CPU cores.
PLAN_3D = {"spacing": (6.0, 6.0, 6.0), "patch": (24, 24, 24)}
PLAN_2D = {"spacing": (6.0, 6.0), "patch": (24, 24)}


@pytest.fixture(scope="module")
def demo():
    files = demo_files()
    return {
        "source": (load_volume(files.source_image), load_volume(files.source_mask)),
        "target": (load_volume(files.target_image), load_volume(files.target_mask)),
    }


@pytest.fixture(scope="module")
def folder_3d(tmp_path_factory, demo):
    image, mask = demo["source"]
    root = tmp_path_factory.mktemp("nnunet3d")
    return train_folder(root, image, mask, folds=(0, 1), steps=25, **PLAN_3D)


@pytest.fixture(scope="module")
def folder_2d(tmp_path_factory, demo):
    image, mask = demo["source"]
    root = tmp_path_factory.mktemp("nnunet2d")
    return train_folder(root, image, mask, configuration="2d", steps=25, **PLAN_2D)


@pytest.fixture(scope="module")
def target_prediction(folder_3d, demo):
    """napari-uda's prediction with the two-fold model on the shifted demo head."""
    return predict_volume(load_model(folder_3d), demo["target"][0], device="cpu")


def dice(labels: np.ndarray, truth: np.ndarray) -> float:
    a, b = labels > 0, truth > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def nnunet_prediction(
    folder: Path, image: Volume, folds, monkeypatch=None, *, mirroring: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """nnunetv2's own labels and probabilities, on the volume's (x, y, z) grid.

    With ``monkeypatch``, nnU-Net accumulates the windows in float32 instead of float16 (its
    own Gaussian, rounded to float16 as it keeps it, then used in float32): everything else is
    nnU-Net's own code, and napari-uda must then equal it to float32 precision."""
    predict = pytest.importorskip("nnunetv2.inference.predict_from_raw_data")
    if monkeypatch is not None:
        proxy = types.SimpleNamespace(**vars(torch))
        proxy.half = torch.float32
        monkeypatch.setattr(predict, "torch", proxy)
        gaussian = predict.compute_gaussian
        monkeypatch.setattr(
            predict,
            "compute_gaussian",
            lambda *a, **k: gaussian(*a, **{**k, "dtype": torch.float16}).float(),
        )
    predictor = predict.nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    data = np.asarray(image.data, np.float32).transpose(2, 1, 0)[None]  # SimpleITK's z, y, x
    properties = {"spacing": list(reversed(image.spacing))}
    labels, probabilities = predictor.predict_single_npy_array(data, properties, None, None, True)
    return labels.transpose(2, 1, 0), probabilities.transpose(0, 3, 2, 1)


def assert_equal_to_nnunet(ours, labels: np.ndarray, probabilities: np.ndarray) -> None:
    """Against nnU-Net accumulating in float32: the same labels, probabilities to 1e-5."""
    assert np.array_equal(ours.labels, labels), int((ours.labels != labels).sum())
    np.testing.assert_allclose(ours.probabilities, probabilities, atol=1e-5)


def assert_close_to_nnunet(ours, labels: np.ndarray, probabilities: np.ndarray) -> None:
    """Against nnU-Net as it runs (float16 accumulation): labels identical except where its own
    two probabilities tie at float16 precision; probabilities within 1e-3 on average (the
    largest gaps are at far window corners, where its float16 weights are subnormal)."""
    differ = ours.labels != labels
    margin = np.abs(probabilities[1] - probabilities[0])
    assert (margin[differ] < 2e-3).all(), margin[differ]
    assert differ.mean() < 1e-5, int(differ.sum())
    assert np.abs(ours.probabilities - probabilities).max(0).mean() < 1e-3


# -- opening and describing ------------------------------------------------------------------------
def test_opens_the_folder_and_describes_the_model(folder_3d):
    model = load_model(folder_3d)
    assert isinstance(model, NnUNetAdapter)
    info = model.info()
    assert info.class_names == ["background", "brain"]
    assert info.spatial_dims == 3 and info.spacing == (6.0, 6.0, 6.0)
    assert info.norm_type == "instance (affine)"
    assert info.capabilities == {NORM_AFFINE}
    assert info.details["folds"] == ["0", "1"] and info.details["configuration"] == "3d_fullres"
    assert info.name == "Dataset901_DemoHead (nnU-Net 3d_fullres, folds 0, 1)"
    assert len(model.network.folds) == 2 and model.network.mirror_axes == (0, 1, 2)
    one = load_model(folder_3d, folds=[1], mirroring=False)
    assert one.info().details["folds"] == ["1"] and one.info().details["mirroring"] == []
    with pytest.raises(ModelLoadError, match="no fold_7"):
        load_model(folder_3d, folds=[7])
    with pytest.raises(ModelLoadError, match="options folds, checkpoint and mirroring"):
        load_model(folder_3d, trainable="all")


def test_a_scan_too_large_for_the_models_spacing_is_refused_before_resampling(folder_3d):
    data = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
    vast = Volume(data, np.diag([300.0, 300.0, 300.0, 1.0]), path=Path("vast.nii.gz"))
    with pytest.raises(VolumeError, match=r"vast.nii.gz: resampled to the model's 6x6x6 mm"):
        load_model(folder_3d).prepare(vast)


def test_best_checkpoint_is_used_when_there_is_no_final_one(tmp_path, folder_3d):
    copy = tmp_path / folder_3d.name
    shutil.copytree(folder_3d, copy)
    (copy / "fold_1" / "checkpoint_final.pth").rename(copy / "fold_1" / "checkpoint_best.pth")
    model = load_model(copy)
    assert [p.name for p in model.folder.checkpoint_files] == [
        "checkpoint_final.pth",
        "checkpoint_best.pth",
    ]


# -- predicting as nnU-Net does --------------------------------------------------------------------
def test_3d_prediction_equals_nnunets_own_predictor(
    folder_3d, demo, target_prediction, monkeypatch
):
    """Two folds, mirroring along three axes, a transpose, a crop, resampling to 6 mm and back,
    overlapping windows with Gaussian weights."""
    image, mask = demo["target"]
    ours = target_prediction
    labels, probabilities = nnunet_prediction(folder_3d, image, (0, 1))
    assert dice(labels, mask.data) > 0.5  # a real segmentation, not an empty one
    assert_close_to_nnunet(ours, labels, probabilities)
    assert_equal_to_nnunet(ours, *nnunet_prediction(folder_3d, image, (0, 1), monkeypatch))


def test_2d_prediction_equals_nnunets_own_predictor(folder_2d, demo, monkeypatch):
    """Slices along nnU-Net's first axis, windows padded where a slice is smaller than the
    patch, mirroring in-plane."""
    image, _ = demo["source"]
    ours = predict_volume(load_model(folder_2d), image, device="cpu")
    assert ours.labels.any()
    assert_equal_to_nnunet(ours, *nnunet_prediction(folder_2d, image, (0,), monkeypatch))


def test_region_logits_follow_nnunets_region_rule():
    """nnU-Net writes the label of each region whose sigmoid exceeds 0.5, later regions over
    earlier ones; the class logits' argmax is that label."""
    z = torch.randn(2000, 3) * 3
    order = [2, 3, 1]  # channel i writes label order[i]
    expected = torch.zeros(2000, dtype=torch.long)
    for i, label in enumerate(order):
        expected[torch.sigmoid(z[:, i]) > 0.5] = label
    scores = region_class_logits(z[:, :, None], order)[:, :, 0]
    assert torch.equal(scores.argmax(1), expected)


# -- refusing what is not data or not right --------------------------------------------------------
class _Payload:
    """Unpickling this would create a file: a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, folder_3d):
    copy = tmp_path / folder_3d.name
    shutil.copytree(folder_3d, copy)
    marker = tmp_path / "code-ran"
    checkpoint = torch.load(copy / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["logging"]["extra"] = _Payload(marker)
    torch.save(checkpoint, copy / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(
        ModelLoadError,
        match=r"checkpoint_final.pth: holds a .* object, which napari-uda does not unpickle",
    ):
        load_model(copy)
    assert not marker.exists()
    buffer = io.BytesIO(pickle.dumps({"a": 1}))
    (copy / "fold_1" / "checkpoint_final.pth").write_bytes(buffer.getvalue())
    with pytest.raises(ModelLoadError, match="fold_1"):
        load_model(copy, folds=[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, d: p["configurations"]["3d_fullres"].pop("patch_size"), "'patch_size'"),
        (
            lambda p, d: p["configurations"]["3d_fullres"]["architecture"].update(
                network_class_name="os.system"
            ),
            "network_class_name 'os.system' is not one napari-uda builds",
        ),
        (
            lambda p, d: p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(
                nonlin="builtins.eval"
            ),
            "'nonlin' names 'builtins.eval', not a known torch layer",
        ),
        (
            lambda p, d: p["configurations"]["3d_fullres"].update(normalization_schemes=["MyNorm"]),
            "unknown normalization scheme 'MyNorm'",
        ),
        (lambda p, d: p.update(transpose_backward=[0, 1, 2]), "does not undo"),
        (lambda p, d: d["channel_names"].update({"1": "T2"}), "needs 2 input channels"),
        (lambda p, d: d["labels"].update(tumour=3), "consecutive"),
    ],
)
def test_bad_fields_are_named_in_one_line(tmp_path, folder_3d, change, message):
    copy = tmp_path / folder_3d.name
    shutil.copytree(folder_3d, copy)
    plans = json.loads((copy / "plans.json").read_text())
    dataset = json.loads((copy / "dataset.json").read_text())
    change(plans, dataset)
    (copy / "plans.json").write_text(json.dumps(plans))
    (copy / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ModelLoadError, match=message) as error:
        load_model(copy)
    assert "\n" not in str(error.value)


def test_paths_out_of_the_folder_are_refused(tmp_path, folder_3d):
    copy = tmp_path / "model" / folder_3d.name
    shutil.copytree(folder_3d, copy)
    outside = tmp_path / "elsewhere"
    shutil.move(copy / "fold_1", outside)
    (copy / "fold_1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelLoadError, match="leads out of the model folder"):
        load_model(copy)


def test_cascade_stage_and_empty_folders_are_refused(tmp_path, folder_3d):
    with pytest.raises(ModelLoadError, match="not an nnU-Net v2 trained-model folder"):
        load_model(tmp_path)
    plans = json.loads((folder_3d / "plans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {
        "inherits_from": "3d_fullres",
        "previous_stage": "3d_lowres",
    }
    weights = {0: load_model(folder_3d, folds=[0]).network.folds[0].state_dict()}
    cascade = write_folder(tmp_path / "c", plans, "3d_cascade_fullres", weights)
    with pytest.raises(ModelLoadError, match="cascade stage"):
        load_model(cascade)
    (tmp_path / "e").mkdir()
    for name in ("plans.json", "dataset.json"):
        shutil.copy(folder_3d / name, tmp_path / "e" / name)
    with pytest.raises(ModelLoadError, match=r"no fold_<k>/checkpoint_final\.pth"):
        load_model(tmp_path / "e")


def test_checkpoint_layout_matches_nnunets():
    """The factory writes what nnU-Net's trainer writes (the keys its predictor reads)."""
    checkpoint = nnunet_checkpoint({}, {"configurations": {"x": {"patch_size": [8] * 3}}}, "x", 0)
    assert {"network_weights", "trainer_name", "init_args"} <= set(checkpoint)
    assert checkpoint["init_args"]["dataset_json"] == DATASET


# -- adapting and saving ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tent", "adaent", "mean_teacher"])
def test_methods_adapt_on_the_shifted_demo_head(folder_3d, demo, method):
    """TENT trains only the instance-norm scale and shift; the others every parameter; the
    user's model is untouched."""
    model = load_model(folder_3d, folds=[0], mirroring=False)
    image, mask = demo["target"]
    original = {k: v.clone() for k, v in model.network.state_dict().items()}
    result = adapt(model, image, method, {"epochs": 1}, reference=mask, device="cpu", seed=0)
    before, after = result.reference_dice_before[0], result.reference_dice_after[0]
    assert after >= before - 0.02, (before, after)
    changed = {
        name
        for name, value in result.model.network.state_dict().items()
        if not torch.equal(value, original[name])
    }
    assert changed
    if method == "tent":  # only InstanceNorm scale and shift
        owners = {type(model.network.get_submodule(name.rsplit(".", 1)[0])) for name in changed}
        assert owners == {torch.nn.InstanceNorm3d}, owners
    assert all(torch.equal(v, original[k]) for k, v in model.network.state_dict().items())


def test_adabn_does_not_apply_and_says_why(folder_3d, demo):
    model = load_model(folder_3d, folds=[0], mirroring=False)
    with pytest.raises(AdaptationError, match=r"(?i)batchnorm"):
        adapt(model, demo["target"][0], "adabn", device="cpu")
    assert "AdaBN does not apply" in model.info().details["notes"]


def test_saved_folder_is_what_nnunet_predicts_with(tmp_path, folder_3d, demo, monkeypatch):
    """Adapted (TENT, both folds), saved as a new folder: nnunetv2 predicts with it what the
    adapted model predicts (without mirroring, for speed); the input folder is untouched."""
    image, _ = demo["target"]
    model = load_model(folder_3d, mirroring=False)
    adapted = adapt(model, image, "tent", {"epochs": 1}, device="cpu", seed=0).model
    out = tmp_path / "Dataset901_DemoHead" / "nnUNetTrainer__nnUNetPlans__3d_fullres_adapted"
    before = {p: p.read_bytes() for p in folder_3d.rglob("*") if p.is_file()}
    assert adapted.save(out, provenance={"method": "tent"}) == out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "dataset.json",
        "fold_0/checkpoint_final.pth",
        "fold_1/checkpoint_final.pth",
        "plans.json",
    ]
    assert {p: p.read_bytes() for p in folder_3d.rglob("*") if p.is_file()} == before
    ours = predict_volume(adapted, image, device="cpu")
    reopened = predict_volume(load_model(out, mirroring=False), image, device="cpu")
    np.testing.assert_allclose(reopened.probabilities, ours.probabilities, atol=1e-6)
    original = predict_volume(model, image, device="cpu")
    assert np.abs(original.probabilities - ours.probabilities).max() > 1e-3  # it did adapt
    theirs = nnunet_prediction(out, image, (0, 1), monkeypatch, mirroring=False)
    assert_equal_to_nnunet(ours, *theirs)
    with pytest.raises(ModelSaveError, match="already exists"):
        adapted.save(out)
    # as the Export widget saves it: staged, then moved into place with the other outputs
    outputs = OutputSet(protected=adapted.input_files())
    exported = tmp_path / "export" / "adapted_model"
    [target] = adapted.saved_files(exported)
    adapted.save(outputs.add(target, "model"))
    assert not exported.exists()
    outputs.commit()
    assert (exported / "fold_1" / "checkpoint_final.pth").is_file()
    with pytest.raises(ModelSaveError, match="input model"):
        adapted.save(folder_3d / "inside")
    assert not list(tmp_path.glob("Dataset901_DemoHead/.*"))  # no temporary folder left


def test_cli_predicts_with_an_nnunet_folder(tmp_path, folder_3d, target_prediction):
    from napari_uda.cli import main

    files = demo_files()
    out = tmp_path / "brain.nii.gz"
    assert (
        main(
            [
                "predict",
                "--model",
                str(folder_3d),
                "--image",
                str(files.target_image),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert np.array_equal(load_volume(out).data, target_prediction.labels)


def test_the_gate_finds_the_left_right_axis(folder_3d, demo):
    """The adaptation gate's left-right check knows nnU-Net's axes: the demo head's file axes
    are L, A, S; nnU-Net reverses them (S, A, L) and the plans transpose them by (2, 0, 1)."""
    from napari_uda.adaptation.gate import left_right_dim

    prepared = load_model(folder_3d, folds=[0]).prepare(demo["target"][0])
    assert demo["target"][0].axcodes == ("L", "A", "S")
    assert left_right_dim(prepared) == 2
