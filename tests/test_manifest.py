"""The npe2 manifest validates, its commands import, and napari discovers the installed plugin."""

from __future__ import annotations

from pathlib import Path

import pytest
from npe2 import PluginManager, PluginManifest

import napari_uda

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari.yaml"
PACKAGED = Path(napari_uda.__file__).parent / "napari.yaml"


@pytest.fixture(scope="module")
def manifest() -> PluginManifest:
    return PluginManifest.from_file(MANIFEST)


def test_manifest_validates_and_every_command_imports(manifest):
    assert manifest.name == "napari-uda"
    manifest.validate_imports()  # raises if a python_name does not resolve
    commands = {command.id for command in manifest.contributions.commands}
    used = (
        [reader.command for reader in manifest.contributions.readers]
        + [writer.command for writer in manifest.contributions.writers]
        + [sample.command for sample in manifest.contributions.sample_data]
        + [widget.command for widget in manifest.contributions.widgets]
    )
    assert set(used) <= commands


def test_packaged_manifest_is_the_top_level_one():
    assert PACKAGED.is_symlink()
    assert PACKAGED.resolve() == MANIFEST.resolve()


def test_contributions_cover_the_product(manifest):
    contributions = manifest.contributions
    assert {widget.display_name for widget in contributions.widgets} == {
        "Model",
        "Adapt",
        "QA",
        "Export",
    }
    assert {writer.layer_types[0] for writer in contributions.writers} == {"image", "labels"}
    for writer in contributions.writers:
        assert ".nii.gz" in writer.filename_extensions
    patterns = contributions.readers[0].filename_patterns
    assert "*.nii" in patterns and "*.nii.gz" in patterns
    samples = {sample.key for sample in contributions.sample_data}
    assert {"source_head", "source_mask", "target_head", "target_mask"} <= samples


def test_napari_discovers_the_installed_plugin():
    manager = PluginManager()
    manager.discover(include_npe1=False)
    found = manager.get_manifest("napari-uda")  # KeyError if the entry point is not found
    assert found.package_metadata is not None and found.package_metadata.name == "napari-uda"
    reader_commands = [r.command for r in manager.iter_compatible_readers(["head.nii.gz"])]
    assert "napari-uda.get_reader" in reader_commands
    assert manager.get_writer("mask.nii.gz", ["labels"])[0] is not None
