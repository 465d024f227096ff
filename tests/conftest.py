"""Shared fixtures: the shipped demo (a real scanner shift) and a tiny synthetic case.

* ``demo_model``, ``demo_target``, ``demo_reference``: the demo bundle (trained on the source
  head only), the new-scanner head and its reference brain mask, as shipped in the package.
* ``demo_target_slab`` / ``demo_reference_slab``: the central axial slab of the target head
  (a real part of the same scan, fewer slices) so that method tests run in seconds.
* ``tiny_model``, ``tiny_target``, ``tiny_reference``: a small U-Net trained for a second on a
  synthetic head, and a contrast-shifted synthetic target, for engine mechanics.

Models are session-scoped and must never be modified by a test (the engine works on copies).
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_uda.core.models import UNetBundleAdapter, UNetConfig, load_model
from napari_uda.core.preprocessing import PreprocessingConfig
from napari_uda.core.volume import Volume, load_volume
from napari_uda.data import demo_files

#: Axial slices (at 2 mm) kept around the middle of the head in the slab fixtures.
SLAB_SLICES = 32


# -- the shipped demo ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def demo_paths():
    """Paths of the shipped demo files (an error, not a skip, if the demo model is missing)."""
    return demo_files(require_model=True)


@pytest.fixture(scope="session")
def demo_model(demo_paths):
    """The demo bundle's adapter (do not modify; adapt copies)."""
    return load_model(demo_paths.model)


@pytest.fixture(scope="session")
def demo_target(demo_paths) -> Volume:
    """The demo head as seen by the simulated new scanner."""
    return load_volume(demo_paths.target_image)


@pytest.fixture(scope="session")
def demo_reference(demo_paths) -> Volume:
    """The new-scanner head's reference brain mask (QA only)."""
    return load_volume(demo_paths.target_mask)


def central_slab(volume: Volume, slices: int = SLAB_SLICES) -> Volume:
    """The ``slices`` central slices along the volume's most superior-inferior array axis,
    with the affine shifted so the slab stays where it was in the scanner."""
    axis = int(np.argmax(np.abs(volume.affine[2, :3])))
    count = volume.shape[axis]
    start = max(0, (count - slices) // 2)
    stop = min(count, start + slices)
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    affine = volume.affine.copy()
    offset = np.zeros(3)
    offset[axis] = start
    affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return Volume(np.ascontiguousarray(volume.data[tuple(index)]), affine, volume.header)


@pytest.fixture(scope="session")
def demo_target_slab(demo_target) -> Volume:
    return central_slab(demo_target)


@pytest.fixture(scope="session")
def demo_reference_slab(demo_reference) -> Volume:
    return central_slab(demo_reference)


@pytest.fixture
def adapt_demo(demo_model, demo_target_slab, demo_reference_slab):
    """``adapt_demo(method, settings)``: adapt the demo model to the new-scanner slab (the
    reference mask only measures); returns ``(result, Dice before, Dice after)``."""
    from napari_uda.adaptation.engine import adapt

    def run(method: str, settings: dict | None = None):
        result = adapt(
            demo_model,
            demo_target_slab,
            method,
            settings,
            reference=demo_reference_slab,
            device="cpu",
        )
        return result, result.reference_dice_before[0], result.reference_dice_after[0]

    return run


# -- a tiny synthetic case -----------------------------------------------------------------------
def synthetic_head(
    shape=(40, 40, 20), *, brain=1.0, scalp=0.45, seed=0, spacing=2.0
) -> tuple[Volume, Volume]:
    """A noisy ellipsoidal 'head' with a brighter (``brain``) inner ellipsoid; image and mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.85, 0.8, 0.9])[:, None, None, None]) ** 2).sum(0))
    mask = (radius < 0.72).astype(np.uint8)
    image = np.where(radius < 1.0, scalp, 0.0) + mask * (brain - scalp)
    image = image + rng.normal(0.0, 0.05, shape) * (radius < 1.0)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return Volume(image.astype(np.float32), affine), Volume(mask, affine)


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-level U-Net (BatchNorm, early head) trained for about a second on a synthetic head."""
    from napari_uda.core.training import TrainingSettings, train_bundle

    image, mask = synthetic_head(seed=1)
    bundle = train_bundle(
        [image],
        [mask],
        TrainingSettings(
            epochs=25,
            batch_size=8,
            learning_rate=3e-3,
            augment=False,
            early_head_epochs=2,
            source_pack_size=4,
        ),
        architecture=UNetConfig(base_channels=4, depth=2, dropout=0.0),
        preprocessing=PreprocessingConfig(normalization="minmax", target_spacing=None),
        class_names=["background", "brain"],
        device="cpu",
    )
    return UNetBundleAdapter(bundle, name="tiny")


@pytest.fixture(scope="session")
def tiny_case() -> tuple[Volume, Volume]:
    """A synthetic target with a contrast shift (darker brain, brighter scalp) and its mask."""
    return synthetic_head(brain=0.8, scalp=0.6, seed=2)


@pytest.fixture(scope="session")
def tiny_target(tiny_case) -> Volume:
    return tiny_case[0]


@pytest.fixture(scope="session")
def tiny_reference(tiny_case) -> Volume:
    return tiny_case[1]


@pytest.fixture(scope="session")
def make_synthetic_head():
    """:func:`synthetic_head` for tests that need another synthetic case (conftest modules are
    not importable by name: several conftest.py files exist)."""
    return synthetic_head
