"""Fixtures for the napari widget tests: docked widgets on a fresh viewer, small bundles, and
helpers to wait for runs and to catch notifications."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from napari_uda.core.models import ModelBundle, UNet2D, UNetConfig
from napari_uda.core.preprocessing import PreprocessingConfig


def make_bundle(path, *, norm="batch", early_head=True, seed=0):
    """A small random U-Net bundle (2 levels, 4 base channels) saved at ``path``."""
    torch.manual_seed(seed)
    network = UNet2D(UNetConfig(base_channels=4, depth=2, norm=norm, early_head=early_head))
    bundle = ModelBundle.from_model(
        network, ["background", "brain"], PreprocessingConfig(), provenance={"test": True}
    )
    return bundle.save(path)


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny.safetensors")


@pytest.fixture(scope="session")
def group_norm_bundle_path(tmp_path_factory):
    """No BatchNorm, no early head: AdaBN and UDAS cannot apply."""
    path = tmp_path_factory.mktemp("bundles") / "groupnorm.safetensors"
    return make_bundle(path, norm="group", early_head=False)


@pytest.fixture
def notifications(monkeypatch):
    """Messages the widgets show, by kind (``error``, ``info``, ``warning``)."""
    shown: dict[str, list[str]] = {"error": [], "info": [], "warning": []}
    modules = (
        "model_widget",
        "adapt_widget",
        "qa_widget",
        "export_widget",
        "corrections_panel",
        "other_scans",
        "demo_gui",
    )
    for module in modules:
        for kind in shown:
            target = f"napari_uda._qt.{module}.show_{kind}"
            with contextlib.suppress(AttributeError):  # the module does not show this kind
                monkeypatch.setattr(target, shown[kind].append)
    return shown


@pytest.fixture
def docked(make_napari_viewer):
    """A viewer with the four widgets docked, as napari's Plugins menu would."""
    from napari_uda._qt.adapt_widget import AdaptWidget
    from napari_uda._qt.export_widget import ExportWidget
    from napari_uda._qt.model_widget import ModelWidget
    from napari_uda._qt.qa_widget import QAWidget

    viewer = make_napari_viewer()
    widgets = {}
    for name, kind in (
        ("Model", ModelWidget),
        ("Adapt", AdaptWidget),
        ("QA", QAWidget),
        ("Export", ExportWidget),
    ):
        widgets[name] = kind(viewer)
        viewer.window.add_dock_widget(widgets[name], name=name)
    return viewer, widgets


@pytest.fixture
def wait_for_run(qtbot):
    """``wait_for_run(adapt_widget)``: wait until the run ended and its result was handled."""

    def wait(adapt_widget, timeout_ms: int = 180_000) -> None:
        qtbot.waitUntil(lambda: not adapt_widget.runner.running, timeout=timeout_ms)
        qtbot.waitUntil(lambda: not adapt_widget.state.running, timeout=10_000)

    return wait


@pytest.fixture
def synthetic_scan():
    """(image, mask, affine): a bright ellipsoid in a darker one, LAS, 2 mm."""
    return make_synthetic_scan()


def make_synthetic_scan(shape=(40, 44, 24), spacing=(2.0, 2.0, 2.0), seed=0):
    """A bright ellipsoid in a darker one, with an LAS affine, and its mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    mask = (radius < 0.6).astype(np.uint8)
    image = np.where(radius < 0.9, 0.4, 0.0) + 0.6 * mask + rng.normal(0, 0.03, shape)
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (40.0, -44.0, -20.0)
    return image.astype(np.float32), mask, affine
