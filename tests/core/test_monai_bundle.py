"""MONAI bundles: napari-uda predicts as the bundle's own components (MONAI's ConfigParser
evaluating the whole config), reads the config as data (no expression evaluated, only
allow-listed components), adapts on the shifted demo head and saves a bundle that reopens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_uda.adaptation.engine import adapt
from napari_uda.core.inference import predict_volume
from napari_uda.core.models import ModelSaveError, load_model
from napari_uda.core.models.adapter import BATCHNORM, NORM_AFFINE
from napari_uda.core.models.monai_bundle import MonaiBundleAdapter
from napari_uda.core.models.registry import ModelLoadError
from napari_uda.core.volume import Volume, VolumeError, load_volume
from napari_uda.data import demo_files

pytest.importorskip("monai")
from monai_bundle_factory import bundle_own_prediction, train_bundle


@pytest.fixture(scope="module")
def demo():
    files = demo_files()
    return {
        "files": files,
        "source": (load_volume(files.source_image), load_volume(files.source_mask)),
        "target": (load_volume(files.target_image), load_volume(files.target_mask)),
    }


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, demo):
    image, mask = demo["source"]
    return train_bundle(tmp_path_factory.mktemp("bundle") / "brain_bundle", image, mask, steps=15)


def dice(labels: np.ndarray, truth: np.ndarray) -> float:
    a, b = labels > 0, truth > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_opens_the_bundle_and_describes_it(bundle):
    model = load_model(bundle)
    assert isinstance(model, MonaiBundleAdapter)
    info = model.info()
    assert info.name == "Demo brain extraction (test bundle)"
    assert info.class_names == ["background", "brain"]
    assert info.spacing == (4.0, 4.0, 4.0) and info.spatial_dims == 3
    assert info.norm_type == "batch (affine)"
    assert info.capabilities == {NORM_AFFINE, BATCHNORM}


def test_a_scan_too_large_for_the_bundles_spacing_is_refused_before_resampling(bundle):
    model = load_model(bundle)
    assert model.target_spacing, "the test bundle resamples (Spacingd)"
    data = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
    vast = Volume(data, np.diag([300.0, 300.0, 300.0, 1.0]), path=Path("vast.nii.gz"))
    with pytest.raises(VolumeError, match=r"vast.nii.gz: resampled to the model's .* mm spacing"):
        model.prepare(vast)


def test_prediction_equals_the_bundles_own_inference(bundle, demo):
    """Orientation, spacing, intensity normalisation, Gaussian sliding windows, softmax and
    Invertd: the same labels and probabilities as the bundle's own components."""
    image, mask = demo["target"]
    ours = predict_volume(load_model(bundle), image, device="cpu")
    labels, probabilities = bundle_own_prediction(bundle, demo["files"].target_image)
    assert dice(labels.numpy(), mask.data) > 0.3  # a segmentation, not an empty map
    assert np.array_equal(ours.labels, labels.numpy())
    np.testing.assert_allclose(ours.probabilities, probabilities.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("section", "change", "message"),
    [
        ("network_def", {"channels": "$[8] * 3"}, "is an expression"),
        ("network_def", {"_target_": "os.system"}, "not a MONAI component"),
        ("network_def", {"_target_": "monai.apps.utils.download_url"}, "not on napari-uda's list"),
        ("inferer", {"roi_size": "@missing"}, "names no entry"),
        ("preprocessing", {"_requires_": "$import os"}, "'_requires_' is not allowed"),
        ("network_def", {"out_channels": "%other.json#x"}, "another file"),
    ],
)
def test_the_config_is_read_as_data(tmp_path, bundle, section, change, message):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    path = copy / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config[section].update(change)
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message) as error:
        load_model(copy)
    assert "\n" not in str(error.value) and "inference.json" in str(error.value)


def test_expressions_are_never_evaluated(tmp_path, bundle):
    """A $-expression that would create a file, in a section napari-uda uses: refused, and the
    file never appears; the same expression elsewhere in the config is never looked at."""
    marker = tmp_path / "code-ran"
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    path = copy / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config["device"] = f"$__import__('pathlib').Path({str(marker)!r}).touch()"
    path.write_text(json.dumps(config))
    load_model(copy)  # unused sections may hold expressions, as every real bundle does
    config["pixdim"] = config["device"]  # now the preprocessing refers to it
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="is an expression"):
        load_model(copy)
    assert not marker.exists()


@pytest.mark.parametrize("method", ["tent", "adabn", "adaent"])
def test_methods_adapt_on_the_shifted_demo_head(bundle, demo, method):
    model = load_model(bundle)
    image, mask = demo["target"]
    original = {k: v.clone() for k, v in model.network.state_dict().items()}
    result = adapt(model, image, method, {"epochs": 1}, reference=mask, device="cpu", seed=0)
    before, after = result.reference_dice_before[0], result.reference_dice_after[0]
    assert after >= before - 0.02, (before, after)
    changed = [
        k for k, v in result.model.network.state_dict().items() if not torch.equal(v, original[k])
    ]
    assert changed
    if method == "adabn":  # only BatchNorm statistics
        assert all(k.rsplit(".", 1)[-1].startswith(("running_", "num_batches")) for k in changed)
    assert all(torch.equal(v, original[k]) for k, v in model.network.state_dict().items())


def test_saved_bundle_reopens_and_predicts_as_adapted(tmp_path, bundle, demo):
    image, _ = demo["target"]
    adapted = adapt(load_model(bundle), image, "tent", {"epochs": 1}, device="cpu").model
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    out = adapted.save(tmp_path / "adapted_bundle", provenance={"method": "tent"})
    assert (out / "configs" / "inference.json").read_bytes() == (
        bundle / "configs" / "inference.json"
    ).read_bytes()
    assert json.loads((out / "configs" / "napari_uda_provenance.json").read_text()) == {
        "method": "tent"
    }
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    reopened = predict_volume(load_model(out), image, device="cpu")
    np.testing.assert_allclose(
        reopened.probabilities,
        predict_volume(adapted, image, device="cpu").probabilities,
        atol=1e-6,
    )
    labels, _ = bundle_own_prediction(out, demo["files"].target_image)  # MONAI's own, too
    assert np.array_equal(reopened.labels, labels.numpy())
    with pytest.raises(ModelSaveError, match="input model"):
        adapted.save(bundle / "models")
