"""Source training: the loss falls, runs are seeded, the early head trains alone, and the bundle
carries source statistics, a source pack and provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_uda.core.models import ModelBundle, UNetConfig
from napari_uda.core.models.adapter import UNetBundleAdapter
from napari_uda.core.preprocessing import PreprocessingConfig
from napari_uda.core.training import (
    TrainingProgress,
    TrainingSettings,
    build_slices,
    train_bundle,
)
from napari_uda.core.volume import Volume, load_volume, save_volume
from napari_uda.settings import describe

ARCHITECTURE = UNetConfig(base_channels=4, depth=2, dropout=0.0)
PREPROCESSING = PreprocessingConfig(target_spacing=None, pad_multiple=4)
CLASSES = ["background", "blob"]


def blob_pair(seed: int = 0, shape=(20, 20, 12)) -> tuple[Volume, Volume]:
    """A noisy image with a bright off-centre ellipsoid, and its mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(float)
    centre = np.array([9.0, 11.0, 6.0])[:, None, None, None]
    radii = np.array([6.0, 5.0, 4.0])[:, None, None, None]
    mask = (((grid - centre) / radii) ** 2).sum(0) < 1
    image = 100 + 20 * rng.standard_normal(shape) + 150 * mask
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return Volume(image.astype(np.float32), affine), Volume(mask.astype(np.uint8), affine)


def quick_settings(**changes) -> TrainingSettings:
    values = dict(epochs=4, batch_size=4, early_head_epochs=0, source_pack_size=5, seed=3)
    values.update(changes)
    return TrainingSettings(**values)


def train(settings: TrainingSettings, records: list | None = None, **kwargs) -> ModelBundle:
    image, mask = blob_pair()
    return train_bundle(
        [image],
        [mask],
        settings,
        ARCHITECTURE,
        PREPROCESSING,
        CLASSES,
        callback=None if records is None else records.append,
        device="cpu",
        **kwargs,
    )


def test_settings_are_documented_with_paper_defaults():
    specs = {spec.name: spec for spec in describe(TrainingSettings)}
    assert all(spec.help for spec in specs.values())
    assert specs["learning_rate"].default == pytest.approx(1e-3)
    assert specs["loss"].choices == ("dice_ce", "dice", "ce")


@pytest.mark.parametrize("loss", ["dice_ce", "dice", "ce"])
def test_loss_falls(loss):
    records: list[TrainingProgress] = []
    train(quick_settings(epochs=6, loss=loss, augment=False, learning_rate=1e-2), records)
    losses = [record.loss for record in records if record.phase == "unet"]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]
    assert all(record.elapsed_seconds >= 0 for record in records)


def test_same_seed_same_weights_other_seed_other_weights():
    first = train(quick_settings(epochs=2))
    again = train(quick_settings(epochs=2))
    other = train(quick_settings(epochs=2, seed=4))
    for key, value in first.state_dict.items():
        torch.testing.assert_close(value, again.state_dict[key], rtol=0, atol=0)
    assert any(
        not torch.equal(value, other.state_dict[key]) for key, value in first.state_dict.items()
    )


def test_early_head_trains_alone_with_everything_else_frozen():
    records: list[TrainingProgress] = []
    without = train(quick_settings(epochs=2, early_head_epochs=0))
    with_head = train(quick_settings(epochs=2, early_head_epochs=3), records)
    assert [r.phase for r in records].count("early_head") == 3
    changed = {
        key
        for key, value in without.state_dict.items()
        if not torch.equal(value, with_head.state_dict[key])
    }
    head = {key for key in with_head.state_dict if key.startswith("early_head.")}
    assert head and changed == head  # BatchNorm statistics too


def test_bundle_holds_statistics_pack_and_provenance(tmp_path):
    image, mask = blob_pair()
    image_path = save_volume(image, tmp_path / "image.nii.gz")
    mask_path = save_volume(mask, tmp_path / "mask.nii.gz")
    bundle = train_bundle(
        [load_volume(image_path)],
        [load_volume(mask_path)],
        quick_settings(epochs=1),
        ARCHITECTURE,
        PREPROCESSING,
        CLASSES,
        device="cpu",
        provenance={"command": "napari-uda train ..."},
    )
    ratios = bundle.source_statistics["class_ratios"]
    assert sum(ratios) == pytest.approx(1.0)
    slices = build_slices([image], [mask], PREPROCESSING, 2)
    assert ratios[1] == pytest.approx(float((slices.labels == 1).float().mean()))
    pack = bundle.source_pack
    assert pack is not None and len(pack) == 5
    assert all(bool((labels > 0).any()) for labels in pack.labels)  # foreground preferred
    provenance = bundle.provenance
    assert provenance["command"] == "napari-uda train ..."
    assert provenance["seed"] == 3
    assert provenance["settings"]["epochs"] == 1
    record = provenance["training_data"][0]
    assert record["image"]["name"] == "image.nii.gz"
    assert len(record["mask"]["sha256"]) == 64
    assert "torch" in provenance["versions"]
    blob_ml = float(mask.data.sum()) * 8 / 1000  # 2 mm voxels
    low, high = bundle.source_statistics["expected_volume_ml"]["blob"]
    assert low == pytest.approx(0.5 * blob_ml, rel=1e-2)
    assert high == pytest.approx(1.5 * blob_ml, rel=1e-2)
    reloaded = ModelBundle.load(bundle.save(tmp_path / "model.safetensors"))
    assert reloaded.source_statistics["class_ratios"] == pytest.approx(ratios)
    assert UNetBundleAdapter(reloaded).expected_volumes() == {"blob": (low, high)}
    assert len(reloaded.source_pack) == 5


def test_should_stop_ends_training_early():
    records: list[TrainingProgress] = []
    calls = iter(range(1000))
    bundle = train(quick_settings(epochs=50), records, should_stop=lambda: next(calls) >= 3)
    assert bundle.provenance["stopped_early"] is True
    assert len(records) < 50


def test_bad_masks_are_refused_with_one_line():
    image, mask = blob_pair()
    wrong_labels = mask.with_data(mask.data * 3)
    with pytest.raises(ValueError, match=r"labels must be integers 0\.\.1"):
        train_bundle(
            [image], [wrong_labels], quick_settings(), ARCHITECTURE, PREPROCESSING, CLASSES
        )
    other_grid = Volume(mask.data[:-1], mask.affine)
    with pytest.raises(ValueError, match="not on the grid"):
        train_bundle([image], [other_grid], quick_settings(), ARCHITECTURE, PREPROCESSING, CLASSES)
    with pytest.raises(ValueError, match="class names"):
        train_bundle([image], [mask], quick_settings(), ARCHITECTURE, PREPROCESSING, ["a"])
