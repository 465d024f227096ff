"""File > Open Sample: the demo heads and masks, and the one-click demo session."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_uda._qt.state import get_state
from napari_uda.data import demo_files

SAMPLES = {
    "source_head": ("head (source scanner)", "Image", "source_image"),
    "source_mask": ("brain mask (source scanner)", "Labels", "source_mask"),
    "target_head": ("head (new scanner)", "Image", "target_image"),
    "target_mask": ("brain mask (new scanner)", "Labels", "target_mask"),
}


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_each_sample_opens_on_its_scan_grid(make_napari_viewer, key):
    viewer = make_napari_viewer()
    name, kind, file_key = SAMPLES[key]
    [layer] = viewer.open_sample("napari-uda", key)
    assert layer.name == name and type(layer).__name__ == kind
    source = nib.load(str(getattr(demo_files(), file_key)))
    assert layer.data.shape == source.shape
    np.testing.assert_allclose(layer.metadata["affine"], source.affine)
    np.testing.assert_allclose(layer.scale, source.header.get_zooms()[:3])


def test_demo_session_opens_everything_needed(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-uda", "demo_session")
    assert [layer.name for layer in layers] == ["head (new scanner)", "brain mask (new scanner)"]
    state = get_state(viewer)
    assert state.model is not None and state.model_source == "demo model"
    docked = set(viewer.window.dock_widgets)
    assert any("Model" in name for name in docked) and any("Adapt" in name for name in docked)
    # widgets napari makes from the manifest share the viewer's state
    _, qa = viewer.window.add_plugin_dock_widget("napari-uda", "QA")
    _, model_widget = viewer.window.add_plugin_dock_widget("napari-uda", "Model")
    assert qa.state is state and model_widget.state is state
    assert model_widget.fields["classes"].text() == "background, brain"
