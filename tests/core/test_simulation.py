"""Scanner simulation: seeded, deterministic, keeps the grid, and each artefact does its job."""

from __future__ import annotations

import numpy as np
import pytest
from volume_factory import affine_for

from napari_uda.core.volume import Volume
from napari_uda.simulation import (
    PROFILES,
    custom_profile,
    list_profiles,
    robust_maximum,
    simulate_scanner,
    t2_like,
)


def tissue_head(axcodes=("L", "A", "S"), shape=(24, 28, 20), seed=0) -> Volume:
    """A 'head' with T1-like tissues: fat shell (brightest), CSF (dim), grey (mid) and a white
    (bright) core, at the relative intensities of real T1 heads."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    data = np.zeros(shape, np.float32)
    data[radius < 0.95] = 1000.0  # scalp fat
    data[radius < 0.9] = 250.0  # CSF-like
    data[radius < 0.7] = 550.0  # grey-like
    data[radius < 0.4] = 800.0  # white-like
    data += rng.normal(0, 5, shape).astype(np.float32).clip(0)
    return Volume(data, affine_for(axcodes, (2.0, 2.0, 2.0)))


def test_required_profiles_are_listed_with_summaries():
    profiles = list_profiles()
    for name in ("new_scanner", "t2_like", "bias_noise", "thick_slices"):
        assert name in profiles
        assert profiles[name]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profiles_keep_the_grid_and_change_the_image(profile):
    volume = tissue_head()
    original = volume.data.copy()
    simulated = simulate_scanner(volume, profile, seed=3)
    assert simulated.shape == volume.shape
    np.testing.assert_array_equal(simulated.affine, volume.affine)
    assert simulated.header is volume.header
    assert simulated.data.dtype == np.float32
    assert np.isfinite(simulated.data).all() and simulated.data.min() >= 0
    assert np.abs(simulated.data - original).mean() > 1.0  # something changed
    np.testing.assert_array_equal(volume.data, original)  # input untouched


@pytest.mark.parametrize("profile", ["new_scanner", "bias_noise", "motion"])
def test_profiles_are_seeded(profile):
    volume = tissue_head()
    first = simulate_scanner(volume, profile, seed=7).data
    again = simulate_scanner(volume, profile, seed=7).data
    other = simulate_scanner(volume, profile, seed=8).data
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_simulation_does_not_touch_the_global_torch_generator():
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    simulate_scanner(tissue_head(), "new_scanner", seed=1)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


def test_t2_like_swaps_csf_and_white_matter_brightness():
    volume = tissue_head()
    simulated = simulate_scanner(volume, "t2_like", seed=0).data
    csf = simulated[(volume.data > 200) & (volume.data < 300)].mean()
    white = simulated[volume.data > 750].mean()
    grey = simulated[(volume.data > 500) & (volume.data < 600)].mean()
    assert csf > grey > white
    # the lookup itself: background stays dark
    assert t2_like(np.array([0.0]))[0] == 0.0


def test_rician_noise_lifts_the_background_and_stays_positive():
    volume = tissue_head()
    simulated = simulate_scanner(volume, custom_profile("bias_noise", bias_coefficients=0), seed=0)
    background = simulated.data[volume.data < 10]
    sigma = 0.06 * robust_maximum(volume.data)
    # the mean of a Rayleigh distribution (Rician with no signal) is sigma * sqrt(pi / 2)
    assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.1)
    assert background.min() >= 0


@pytest.mark.parametrize(("axcodes", "superior_axis"), [(("L", "A", "S"), 2), (("L", "S", "A"), 1)])
def test_thick_slices_blur_along_the_anatomical_axis(axcodes, superior_axis):
    rng = np.random.default_rng(0)
    noise = rng.uniform(100, 200, (20, 20, 20)).astype(np.float32)
    volume = Volume(noise, affine_for(axcodes, (2.0, 2.0, 2.0)))
    profile = custom_profile("thick_slices", ghosts=0, slice_thickness_mm=6.0)
    simulated = simulate_scanner(volume, profile, seed=0).data
    inner = simulated[2:-2, 2:-2, 2:-2]
    roughness = [np.abs(np.diff(inner, axis=axis)).mean() for axis in range(3)]
    in_plane = [roughness[axis] for axis in range(3) if axis != superior_axis]
    assert roughness[superior_axis] < 0.6 * min(in_plane)


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(KeyError, match="new_scanner"):
        simulate_scanner(tissue_head(), "no_such_scanner", seed=0)


def test_thick_slices_keep_a_constant_image_constant_up_to_the_edges():
    from napari_uda.simulation import thick_slices

    constant = np.full((8, 9, 17), 5.0, np.float32)
    for thickness in (1.5, 2.5, 3.0, 4.0):
        np.testing.assert_allclose(thick_slices(constant, 2, thickness), constant, rtol=1e-6)
