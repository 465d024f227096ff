"""Model bundles: full round trip, atomic writes, and refusing anything that is not a bundle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_uda.core.models import bundle as bundle_module
from napari_uda.core.models.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    METADATA_KEY,
    BundleError,
    ModelBundle,
    SourcePack,
)
from napari_uda.core.models.unet import UNet2D, UNetConfig
from napari_uda.core.preprocessing import PreprocessingConfig

TINY = UNetConfig(base_channels=4, depth=2, num_classes=3, norm="group", groups=2, dropout=0.0)


def tiny_bundle(seed: int = 0, config: UNetConfig = TINY, **extra) -> ModelBundle:
    torch.manual_seed(seed)
    model = UNet2D(config)
    with torch.no_grad():  # move the weights away from their initial values
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return ModelBundle.from_model(
        model,
        ["background", "grey matter", "white matter"][: config.num_classes],
        PreprocessingConfig(normalization="minmax", target_spacing=(1.5, 1.5, 2.0), slice_axis=1),
        **extra,
    )


def one_line_naming(error: BundleError, path: Path) -> str:
    message = str(error)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_round_trip_keeps_everything(tmp_path):
    generator = torch.Generator().manual_seed(1)
    pack = SourcePack(
        images=torch.randn(3, 1, 16, 12, generator=generator),
        labels=torch.randint(0, 3, (3, 16, 12), generator=generator),
    )
    original = tiny_bundle(
        provenance={
            "command": "napari-uda train --epochs 2",
            "seed": np.int64(7),
            "data": [Path("/data/a.nii.gz")],
        },
        source_statistics={"class_ratios": [0.7, 0.2, 0.1], "epochs": 2},
        source_tensors={"bottleneck_centres": torch.randn(2, 16, generator=generator)},
        source_pack=pack,
    )
    path = original.save(tmp_path / "model.safetensors")
    loaded = ModelBundle.load(path)

    assert loaded.architecture == original.architecture
    assert loaded.class_names == ["background", "grey matter", "white matter"]
    assert loaded.preprocessing == original.preprocessing
    assert loaded.provenance == {
        "command": "napari-uda train --epochs 2",
        "seed": 7,
        "data": ["/data/a.nii.gz"],
    }
    assert loaded.source_statistics == original.source_statistics
    torch.testing.assert_close(
        loaded.source_tensors["bottleneck_centres"], original.source_tensors["bottleneck_centres"]
    )
    assert set(loaded.state_dict) == set(original.state_dict)
    for key, value in original.state_dict.items():
        torch.testing.assert_close(loaded.state_dict[key], value, rtol=0, atol=0)
    # the source pack is stored compactly: float16 images, uint8 labels
    assert len(loaded.source_pack) == 3
    torch.testing.assert_close(loaded.source_pack.images, pack.images, atol=2e-3, rtol=1e-3)
    assert loaded.source_pack.images.dtype == torch.float32
    assert torch.equal(loaded.source_pack.labels, pack.labels)

    inputs = torch.randn(2, 1, 16, 16, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.build_model()(inputs), original.build_model()(inputs), rtol=0, atol=0
        )


def test_minimal_bundle_and_header(tmp_path):
    original = tiny_bundle(config=UNetConfig(base_channels=4, depth=2, early_head=False))
    loaded = ModelBundle.load(original.save(tmp_path / "m.safetensors"))
    assert loaded.source_pack is None
    assert loaded.source_tensors == {} and loaded.provenance == {}
    assert loaded.build_model().early_head is None
    header = original.header()
    assert header["format"] == BUNDLE_FORMAT and header["version"] == BUNDLE_VERSION
    assert header["architecture"]["name"] == "unet2d"


def test_saving_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    tiny_bundle().save(path)
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tiny_bundle(seed=1).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_unstorable_header_values_are_refused_before_writing(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(BundleError, match="cannot store"):
        tiny_bundle(provenance={"model": object()}).save(path)
    with pytest.raises(BundleError, match="class names"):
        ModelBundle(TINY, ["only one"], PreprocessingConfig(), tiny_bundle().state_dict).save(path)
    assert not path.exists()


class WritesAFile:
    """Unpickling this creates a file: proof of code execution if it ever appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "code-was-executed"
    payload = {"state_dict": tiny_bundle().state_dict, "hook": WritesAFile(marker)}
    checkpoint = tmp_path / "checkpoint.safetensors"
    torch.save(payload, checkpoint)
    raw_pickle = tmp_path / "raw.safetensors"
    raw_pickle.write_bytes(pickle.dumps(WritesAFile(marker)))

    for path in (checkpoint, raw_pickle):
        with pytest.raises(BundleError) as caught:
            ModelBundle.load(path)
        message = one_line_naming(caught.value, path)
        assert "pickle" in message and "never loads" in message
    assert not marker.exists()


def write_safetensors(path: Path, header: dict | str | None, tensors=None) -> Path:
    tensors = tensors if tensors is not None else {"model.x": torch.zeros(2)}
    metadata = None
    if header is not None:
        metadata = {METADATA_KEY: header if isinstance(header, str) else json.dumps(header)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def valid_header() -> dict:
    return tiny_bundle().header()


@pytest.mark.parametrize(
    ("name", "make", "words"),
    [
        ("random", lambda p: p.write_bytes(os.urandom(2000)), "not a valid safetensors"),
        ("empty", lambda p: p.write_bytes(b""), "not a valid safetensors"),
        ("text", lambda p: p.write_text("hello"), "not a valid safetensors"),
        ("foreign", lambda p: write_safetensors(p, None), "without a napari-uda header"),
        ("not json", lambda p: write_safetensors(p, "{oops"), "not JSON"),
        ("json list", lambda p: write_safetensors(p, "[1, 2]"), "not a JSON object"),
        ("other format", lambda p: write_safetensors(p, {"format": "x"}), "format 'x'"),
        (
            "newer",
            lambda p: write_safetensors(p, {**valid_header(), "version": BUNDLE_VERSION + 1}),
            "newer than this napari-uda",
        ),
        (
            "no architecture",
            lambda p: write_safetensors(p, {"format": BUNDLE_FORMAT, "version": 1}),
            "no 'architecture'",
        ),
        (
            "bad architecture",
            lambda p: write_safetensors(
                p, {**valid_header(), "architecture": {"name": "unet2d", "wings": 2}}
            ),
            "header is invalid",
        ),
        (
            "other architecture",
            lambda p: write_safetensors(p, {**valid_header(), "architecture": {"name": "vit"}}),
            "unknown architecture 'vit'",
        ),
        (
            "no weights",
            lambda p: write_safetensors(p, valid_header(), {"x": torch.zeros(1)}),
            "holds no model weights",
        ),
        (
            "padding too small for the depth",
            lambda p: write_safetensors(
                p,
                {
                    **valid_header(),
                    "preprocessing": {**PreprocessingConfig().to_dict(), "pad_multiple": 2},
                },
            ),
            "needs a multiple of 4",
        ),
    ],
)
def test_files_that_are_not_bundles_give_one_line(tmp_path, name, make, words):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(BundleError) as caught:
        ModelBundle.load(path)
    assert words in one_line_naming(caught.value, path), name


def test_truncated_bundle_gives_one_line(tmp_path):
    path = tiny_bundle().save(tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BundleError) as caught:
        ModelBundle.load(path)
    one_line_naming(caught.value, path)


def test_missing_file_and_folder(tmp_path):
    for path in (tmp_path / "absent.safetensors", tmp_path):
        with pytest.raises(BundleError, match="no such model bundle") as caught:
            ModelBundle.load(path)
        one_line_naming(caught.value, path)


def test_weights_that_do_not_fit_the_architecture_give_one_line(tmp_path):
    weights = tiny_bundle().state_dict
    tensors = {f"model.{key}": value for key, value in weights.items()}
    wider = {**valid_header(), "architecture": {"name": "unet2d", **TINY.to_dict()}}
    wider["architecture"]["base_channels"] = 8
    path = write_safetensors(tmp_path / "wider.safetensors", wider, tensors)
    with pytest.raises(BundleError) as caught:
        ModelBundle.load(path)
    message = one_line_naming(caught.value, path)
    assert "do not fit the architecture" in message and "of another shape" in message

    del tensors["model.head.weight"]
    path = write_safetensors(tmp_path / "missing.safetensors", valid_header(), tensors)
    with pytest.raises(BundleError, match=r"missing \(e\.g\. head\.weight\)") as caught:
        ModelBundle.load(path)
    one_line_naming(caught.value, path)


def test_class_names_must_match_the_classes(tmp_path):
    header = {**valid_header(), "class_names": ["background", "brain"]}
    tensors = {f"model.{key}": value for key, value in tiny_bundle().state_dict.items()}
    path = write_safetensors(tmp_path / "m.safetensors", header, tensors)
    with pytest.raises(BundleError, match="2 class names for a model with 3 classes") as caught:
        ModelBundle.load(path)
    one_line_naming(caught.value, path)


def test_broken_source_pack_is_refused(tmp_path):
    tensors = {f"model.{key}": value for key, value in tiny_bundle().state_dict.items()}
    tensors["source_pack.images"] = torch.zeros(2, 1, 8, 8, dtype=torch.float16)
    path = write_safetensors(tmp_path / "m.safetensors", valid_header(), tensors)
    with pytest.raises(BundleError, match="source pack is incomplete"):
        ModelBundle.load(path)
    tensors["source_pack.labels"] = torch.zeros(3, 8, 8, dtype=torch.uint8)
    path = write_safetensors(tmp_path / "m.safetensors", valid_header(), tensors)
    with pytest.raises(BundleError, match="do not match"):
        ModelBundle.load(path)
