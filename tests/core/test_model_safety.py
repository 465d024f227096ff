"""Model files are data: a spec never reaches outside its folder, the file the user names is the
file that runs, broken weights are refused, and every header field is checked by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from scripted_factory import TinyNet, base_spec, save_model

from napari_uda.core.models import BundleError, ModelBundle, UNet2D, UNetConfig, load_model
from napari_uda.core.models.bundle import METADATA_KEY
from napari_uda.core.preprocessing import PreprocessingConfig


def scripted(path: Path, channels: int = 4) -> Path:
    torch.manual_seed(channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(TinyNet(2, channels).eval()), str(path))
    return path


def channels_of(adapter) -> int:
    return int(next(adapter.network.parameters()).shape[0])


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_a_spec_never_opens_a_file_outside_its_folder(tmp_path, escape):
    outside = scripted(tmp_path / "other" / "secret.pt")
    folder = tmp_path / "models"
    folder.mkdir()
    spec = base_spec(2)
    if escape == "absolute":
        spec["file"] = str(outside)
    elif escape == "dotdot":
        spec["file"] = "../other/secret.pt"
    else:
        os.symlink(outside, folder / "linked.pt")
        spec["file"] = "linked.pt"
    (folder / "model.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError) as caught:
        load_model(folder / "model.json")
    message = str(caught.value)
    assert "\n" not in message and "outside the spec's folder" in message
    assert str(folder / "model.json") in message


def test_a_spec_may_name_a_file_in_its_own_folder(tmp_path):
    scripted(tmp_path / "weights" / "net.pt")
    (tmp_path / "model.json").write_text(json.dumps({**base_spec(2), "file": "weights/net.pt"}))
    assert load_model(tmp_path / "model.json").path == tmp_path / "weights" / "net.pt"


def test_the_file_the_user_names_is_the_file_that_runs(tmp_path):
    """x.pth with x.json and x.pt beside it runs x.pth; a spec naming another file says so."""
    pt, pth = scripted(tmp_path / "x.pt", 4), scripted(tmp_path / "x.pth", 6)
    (tmp_path / "x.json").write_text(json.dumps(base_spec(2)))
    assert channels_of(load_model(pth)) == 6
    assert channels_of(load_model(pt)) == 4
    with pytest.raises(BundleError, match=r"several model files fit this spec \(x\.pt, x\.pth\)"):
        load_model(tmp_path / "x.json")
    (tmp_path / "x.json").write_text(json.dumps({**base_spec(2), "file": "x.pt"}))
    assert channels_of(load_model(tmp_path / "x.json")) == 4
    with pytest.raises(BundleError, match=r"x\.pth: its spec x\.json is for another model file"):
        load_model(pth)


def test_nan_weights_are_refused_in_bundles_and_torchscript(tmp_path):
    config = UNetConfig(base_channels=4, depth=2)
    model = UNet2D(config)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    bundle = ModelBundle.from_model(model, ["background", "brain"], PreprocessingConfig())
    path = bundle.save(tmp_path / "nan.safetensors")
    with pytest.raises(BundleError, match="weights hold NaN or infinite values"):
        load_model(path)
    network = TinyNet(2).eval()
    with torch.no_grad():
        network.head.weight[0] = float("inf")
    with pytest.raises(BundleError, match=r"weights hold NaN or infinite values \(head\.weight\)"):
        load_model(save_model(network, base_spec(2), tmp_path / "ts"))


def rewrite_header(path: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    change(header)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header)})


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda h: h["architecture"].update(depth=-1), "depth must be a whole number from 1"),
        (lambda h: h["architecture"].update(depth=2.5), "depth must be a whole number"),
        (lambda h: h["architecture"].update(dropout="0.1"), "dropout must be a finite number"),
        (lambda h: h.update(provenance=["made", "by", "me"]), "provenance must be a JSON object"),
        (lambda h: h.update(source_statistics="none"), "source_statistics must be a JSON"),
        (lambda h: h.update(class_names="brain"), "class_names must be a list of names"),
        (lambda h: h.update(class_names=["a", "a"]), "class_names has a name twice"),
        (
            lambda h: h["preprocessing"].update(target_spacing=[1e-6, 1e-6, 1e-6]),
            "target_spacing[0] must be at least 0.05",
        ),
        (
            lambda h: h["preprocessing"].update(target_spacing=[1, 1]),
            "target_spacing must be a list of 3 numbers",
        ),
        (
            lambda h: h["preprocessing"].update(clip_percentiles=[99.5, 0.5]),
            "clip_percentiles must be [low, high] with low below high",
        ),
        (lambda h: h["preprocessing"].update(spacing=[1, 1, 1]), "unknown key 'spacing'"),
    ],
)
def test_bundle_fields_are_checked_by_name(tmp_path, change, words):
    bundle = ModelBundle.from_model(
        UNet2D(UNetConfig(base_channels=4, depth=2)), ["background", "brain"], PreprocessingConfig()
    )
    path = bundle.save(tmp_path / "model.safetensors")
    rewrite_header(path, change)
    with pytest.raises(BundleError) as caught:
        ModelBundle.load(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: bundle header is invalid")
    assert words in message
