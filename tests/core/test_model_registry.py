"""load_model dispatch: bundles, TorchScript + spec, named models, plugins from the entry-point
group ``napari_uda.model_adapters``, and one-line errors."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint

import pytest
import torch
from scripted_factory import TinyNet, base_spec, save_model, synthetic_head

from napari_uda.core.models import (
    BundleError,
    ModelBundle,
    ModelLoader,
    UNet2D,
    UNetBundleAdapter,
    UNetConfig,
    load_model,
    named_models,
    registry,
)
from napari_uda.core.models.adapter import ModelAdapter, ModelInfo
from napari_uda.core.models.torchscript import TorchScriptAdapter
from napari_uda.core.preprocessing import PreparedVolume, PreprocessingConfig, prepare_volume


def test_bundles_open_as_unet_adapters(tmp_path):
    config = UNetConfig(depth=2, base_channels=4)
    bundle = ModelBundle.from_model(
        UNet2D(config), ["background", "brain"], PreprocessingConfig(pad_multiple=4)
    )
    path = bundle.save(tmp_path / "model.safetensors")
    model = load_model(path)
    assert isinstance(model, UNetBundleAdapter)
    assert model.class_names == ["background", "brain"]


def test_torchscript_opens_by_file_or_spec_and_takes_options(tmp_path):
    path = save_model(TinyNet(2).eval(), base_spec(2), tmp_path)
    for source in (path, str(path), path.with_suffix(".json")):
        assert isinstance(load_model(source), TorchScriptAdapter)
    assert load_model(path, trainable="first_blocks").trainable == "first_blocks"
    with pytest.raises(BundleError, match="trainable must be all or first_blocks"):
        load_model(path, trainable="bottleneck")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.safetensors", "no such file or model name"),
        (lambda d: d, "is a folder"),
        (lambda d: _write(d / "notes.txt", "hello"), "not a model napari-uda can open"),
        (lambda d: _write(d / "m.json", json.dumps({"adapter": "onnx"})), "unknown adapter"),
        (lambda d: _write(d / "m.json", "[1, 2]"), "must be a JSON object"),
        (lambda d: d / "deepbeet", "no such file or model name"),
    ],
)
def test_unopenable_sources_give_one_line_errors(tmp_path, make, message):
    with pytest.raises(BundleError, match=message) as error:
        load_model(make(tmp_path))
    assert "\n" not in str(error.value)


def _write(path, text):
    path.write_text(text)
    return path


def test_named_models_list_deepbet_with_its_availability(monkeypatch):
    from napari_uda.core.models import deepbet

    monkeypatch.setattr(deepbet.importlib.util, "find_spec", lambda name: None)
    listed = {model.name: model for model in named_models()}
    assert not listed["deepbet"].available
    assert "napari-uda[deepbet]" in listed["deepbet"].reason
    with pytest.raises(BundleError, match=r"pip install 'napari-uda\[deepbet\]'"):
        load_model("deepbet")


# -- a third-party adapter registered through the entry-point group ------------------------------
class ConstantAdapter(ModelAdapter):
    """Predicts 'brain' wherever the image is brighter than a threshold (a 1x1 conv)."""

    def __init__(self, threshold: float):
        self.network = torch.nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.network.weight.copy_(torch.tensor([[[[-1.0]]], [[[1.0]]]]))
            self.network.bias.copy_(torch.tensor([threshold, -threshold]))
        self.class_names = ["background", "brain"]
        self.threshold = threshold

    def prepare(self, volume) -> PreparedVolume:
        config = PreprocessingConfig(normalization="none", target_spacing=None, pad_multiple=1)
        return prepare_volume(volume, config)

    def info(self) -> ModelInfo:
        return ModelInfo("threshold", self.class_names, 2, "none", None)


class ThresholdLoader(ModelLoader):
    name = "threshold"
    description = "threshold models (*.threshold)"

    def can_open(self, source: str) -> bool:
        return source.endswith(".threshold")

    def open(self, source: str, **options) -> ModelAdapter:
        with open(source) as handle:
            return ConstantAdapter(float(handle.read()))

    def open_spec(self, spec_path, spec, **options) -> ModelAdapter:
        return ConstantAdapter(float(spec["threshold"]))


@pytest.fixture
def plugin_entry_points(monkeypatch):
    """Pretend an installed package registered ThresholdLoader (and a broken plugin)."""
    entries = [
        EntryPoint("threshold", f"{__name__}:ThresholdLoader", registry.ENTRY_POINT_GROUP),
        EntryPoint("broken", "no_such_module_xyz:Loader", registry.ENTRY_POINT_GROUP),
    ]

    def fake_entry_points(group=None):
        assert group == registry.ENTRY_POINT_GROUP
        return entries

    registry._plugin_loaders.cache_clear()
    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    yield
    registry._plugin_loaders.cache_clear()


def test_plugin_loaders_from_the_entry_point_group(tmp_path, plugin_entry_points):
    from napari_uda.core.inference import predict_volume

    path = _write(tmp_path / "model.threshold", "0.5")
    with pytest.warns(UserWarning, match="'broken' could not be loaded"):
        model = load_model(path)
    assert isinstance(model, ConstantAdapter) and model.threshold == 0.5
    spec = _write(tmp_path / "other.json", json.dumps({"adapter": "threshold", "threshold": 0.7}))
    assert load_model(spec).threshold == 0.7
    # the plugin's model predicts through the product like any other
    image, _ = synthetic_head(0)
    prediction = predict_volume(load_model(spec), image, device="cpu")
    assert prediction.labels.shape == image.shape
    assert 0 < (prediction.labels == 1).sum() == (image.data > 0.7).sum()
    assert [loader.name for loader in registry.model_loaders()][-1] == "threshold"
