"""Seeded scanner simulation: make a scan look as if a different MRI scanner had acquired it.

A :class:`ScannerProfile` lists artefacts and contrast changes; :func:`simulate_scanner` applies
them in a fixed order (contrast remap -> gamma -> bias field -> thick slices -> motion ->
ghosting -> Rician noise) with a seed, so the same ``(volume, profile, seed)`` always gives the
same result. The output stays on the input's grid (same shape, affine and header); intensities
are float32 on the input's scale (its 99.5th percentile is kept).

Artefacts come from `torchio <https://torchio.readthedocs.io>`_ (``RandomBiasField``,
``RandomMotion``, ``RandomGhosting``); thick slices are slab averages interpolated back (see
:func:`thick_slices`); Rician noise is the magnitude of the image plus complex Gaussian noise.
Axes in profiles are *anatomical* (0 left-right, 1 posterior-anterior, 2 inferior-superior) and
are mapped to the file's array axes, so a profile means the same for RAS, LAS or LSA files.

Built-in profiles (see :func:`list_profiles`):

* ``new_scanner``: the demo's new scanner; a mostly T2-like contrast, gamma change, a strong
  bias field, 3 mm axial slices, ghosting and Rician noise;
* ``t2_like``: contrast remap only (CSF bright, white matter dark);
* ``bias_noise``: smooth bias field plus Rician noise;
* ``thick_slices``: 5 mm axial slices (slab average, linear interpolation back) plus ghosting;
* ``motion``: rigid motion during acquisition;
* ``inverted``: T1 contrast inverted inside the head, plus bias, 3 mm slices and noise (a
  contrast deepbet never saw: it breaks it, where the others leave it above 0.9 Dice).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from nibabel.orientations import io_orientation
from scipy.ndimage import uniform_filter1d

from .core.volume import Volume

#: Percentile of the non-zero voxels used as the intensity scale ("robust maximum").
ROBUST_MAX_PERCENTILE = 99.5

#: T2-like lookup on intensities divided by the robust maximum: knots of a piecewise-linear map.
#: On T1 heads (MNI152, ROBEX) CSF lies near 0.3, grey matter near 0.55-0.65 and white matter
#: near 0.85-0.9 of the robust maximum, with scalp fat above. The map sends air/noise -> dark,
#: CSF -> brightest, grey matter -> mid, white matter -> dark, fat -> fairly bright, as on a
#: fast spin-echo T2.
T2_LIKE_KNOTS = (
    (0.0, 0.08, 0.3, 0.6, 0.88, 1.05, 1.5),
    (0.0, 0.04, 1.0, 0.65, 0.35, 0.6, 0.7),
)

#: Inverted lookup (same input knots as :data:`T2_LIKE_KNOTS`): the T1 contrast turned round
#: inside the head (skull and CSF bright, grey matter mid, white matter and fat dark). A contrast
#: no brain-extraction model trained on T1 has seen; it breaks deepbet (docs/corrections.md).
INVERTED_KNOTS = (
    (0.0, 0.08, 0.3, 0.6, 0.88, 1.05, 1.5),
    (0.0, 0.9, 0.8, 0.5, 0.3, 0.15, 0.1),
)


@dataclass(frozen=True)
class ScannerProfile:
    """A scanner's look, as a list of artefact strengths (0 or ``None`` switches one off).

    Attributes:
        name: registry name.
        summary: one line for listings and docs.
        t2_blend: weight of the T2-like remap (:data:`T2_LIKE_KNOTS`): 0 keeps the T1
            contrast, 1 is fully T2-like. Default 0.
        inverted_blend: weight of the inverted remap (:data:`INVERTED_KNOTS`), applied after
            the T2-like one. Default 0.
        gamma: intensities (scaled to [0, 1]) are raised to this power; 1 changes nothing.
            Default 1.
        bias_coefficients: maximum magnitude of the polynomial bias-field coefficients
            (torchio ``RandomBiasField``); 0 for none. Default 0.
        bias_order: order of the bias-field polynomial. Default 3.
        slice_thickness_mm: simulate slices this thick along ``slice_axis`` (slab average, then
            linear interpolation back, :func:`thick_slices`); ``None`` for none. Default None.
        slice_axis: anatomical axis of the thick slices (0 L-R, 1 P-A, 2 I-S). Default 2.
        motion_degrees: maximum rotation of the rigid motion (torchio ``RandomMotion``);
            0 for none. Default 0.
        motion_translation_mm: maximum translation of the rigid motion. Default 0.
        ghosts: number of ghosts (torchio ``RandomGhosting``); 0 for none. Default 0.
        ghost_intensity: ghost strength (torchio's ``intensity``). Default 0.
        ghost_axis: anatomical phase-encoding axis of the ghosts. Default 1.
        rician_sigma: standard deviation of the complex Gaussian noise as a fraction of the
            robust maximum; 0 for none. Default 0.
    """

    name: str
    summary: str
    t2_blend: float = 0.0
    inverted_blend: float = 0.0
    gamma: float = 1.0
    bias_coefficients: float = 0.0
    bias_order: int = 3
    slice_thickness_mm: float | None = None
    slice_axis: int = 2
    motion_degrees: float = 0.0
    motion_translation_mm: float = 0.0
    ghosts: int = 0
    ghost_intensity: float = 0.0
    ghost_axis: int = 1
    rician_sigma: float = 0.0


PROFILES: dict[str, ScannerProfile] = {
    profile.name: profile
    for profile in (
        ScannerProfile(
            "new_scanner",
            "The demo's new scanner: mostly T2-like contrast, gamma, strong bias field, 3 mm "
            "axial slices, ghosting and Rician noise.",
            t2_blend=0.7,
            gamma=1.6,
            bias_coefficients=0.6,
            slice_thickness_mm=3.0,
            ghosts=4,
            ghost_intensity=0.3,
            rician_sigma=0.08,
        ),
        ScannerProfile(
            "t2_like",
            "T2-like contrast: CSF bright, white matter dark (a lookup on T1 intensities).",
            t2_blend=1.0,
        ),
        ScannerProfile(
            "inverted",
            "T1 contrast inverted inside the head (fat and white matter dark, skull and CSF "
            "bright), bias field, 3 mm axial slices, Rician noise; breaks deepbet.",
            inverted_blend=1.0,
            bias_coefficients=0.5,
            slice_thickness_mm=3.0,
            rician_sigma=0.05,
        ),
        ScannerProfile(
            "bias_noise",
            "Smooth multiplicative bias field (order 3) plus Rician noise (sigma 6%).",
            bias_coefficients=0.5,
            rician_sigma=0.06,
        ),
        ScannerProfile(
            "thick_slices",
            "5 mm axial slices (slab average and resampling) plus ghosting along P-A.",
            slice_thickness_mm=5.0,
            ghosts=6,
            ghost_intensity=0.5,
        ),
        ScannerProfile(
            "motion",
            "Rigid head motion during acquisition (up to 4 degrees and 4 mm).",
            motion_degrees=4.0,
            motion_translation_mm=4.0,
        ),
    )
}


def list_profiles() -> dict[str, str]:
    """Built-in profile names and their one-line summaries."""
    return {name: profile.summary for name, profile in PROFILES.items()}


def get_profile(profile: str | ScannerProfile) -> ScannerProfile:
    """A profile by name (or the profile itself); unknown names raise ``KeyError``."""
    if isinstance(profile, ScannerProfile):
        return profile
    if profile not in PROFILES:
        raise KeyError(f"unknown scanner profile {profile!r}; profiles are: {', '.join(PROFILES)}")
    return PROFILES[profile]


def robust_maximum(data: np.ndarray) -> float:
    """The :data:`ROBUST_MAX_PERCENTILE` of the non-zero voxels (1.0 for an empty volume)."""
    nonzero = data[data > 0]
    if nonzero.size == 0:
        return 1.0
    return float(np.percentile(nonzero, ROBUST_MAX_PERCENTILE)) or 1.0


def t2_like(unit: np.ndarray) -> np.ndarray:
    """The T2-like lookup (:data:`T2_LIKE_KNOTS`) of intensities scaled to the robust maximum."""
    knots_in, knots_out = T2_LIKE_KNOTS
    return np.interp(unit, knots_in, knots_out).astype(np.float32)


def inverted(unit: np.ndarray) -> np.ndarray:
    """The inverted lookup (:data:`INVERTED_KNOTS`) of intensities scaled to the robust maximum."""
    knots_in, knots_out = INVERTED_KNOTS
    return np.interp(unit, knots_in, knots_out).astype(np.float32)


def rician_noise(unit: np.ndarray, sigma: float, generator: np.random.Generator) -> np.ndarray:
    """Magnitude of ``unit`` plus complex Gaussian noise of standard deviation ``sigma``."""
    real = unit + generator.normal(0.0, sigma, unit.shape)
    imaginary = generator.normal(0.0, sigma, unit.shape)
    return np.hypot(real, imaginary).astype(np.float32)


def thick_slices(data: np.ndarray, axis: int, thickness: float) -> np.ndarray:
    """``data`` as if acquired in slices ``thickness`` voxels thick along ``axis``.

    Each slice averages a slab of ``thickness`` voxels (partial volume); the slices are then
    linearly interpolated back onto the original grid (edges clamped). torchio's
    ``RandomAnisotropy`` samples single planes instead of slabs and leaves zero planes at the
    edges of the field of view, so it is not used here.
    """
    if thickness <= 1:
        return data
    size = data.shape[axis]
    slab = max(1, round(thickness))
    averaged = uniform_filter1d(data, size=slab, axis=axis, mode="nearest")
    centres = np.arange((thickness - 1) / 2, size, thickness)
    acquired = np.take(averaged, np.clip(np.rint(centres).astype(int), 0, size - 1), axis=axis)
    position = np.clip(np.arange(size, dtype=np.float64), centres[0], centres[-1])
    lower = np.clip(np.searchsorted(centres, position, side="right") - 1, 0, len(centres) - 1)
    upper = np.minimum(lower + 1, len(centres) - 1)
    span = np.where(upper > lower, centres[upper] - centres[lower], 1.0)
    weight = ((position - centres[lower]) / span).astype(np.float32)
    shape = [1] * data.ndim
    shape[axis] = size
    weight = weight.reshape(shape)
    low, high = np.take(acquired, lower, axis=axis), np.take(acquired, upper, axis=axis)
    return (low * (1 - weight) + high * weight).astype(np.float32)


def _array_axis(volume: Volume, anatomical_axis: int) -> int:
    """The array axis of ``volume`` that runs along ``anatomical_axis`` (0 L-R, 1 P-A, 2 I-S)."""
    orientation = io_orientation(volume.affine)
    return int(np.flatnonzero(orientation[:, 0] == anatomical_axis)[0])


def _torchio_steps(volume: Volume, profile: ScannerProfile) -> list:
    import torchio as tio

    steps = []
    if profile.bias_coefficients > 0:
        steps.append(tio.RandomBiasField(profile.bias_coefficients, order=profile.bias_order))
    if profile.motion_degrees > 0 or profile.motion_translation_mm > 0:
        steps.append(
            tio.RandomMotion(
                degrees=profile.motion_degrees,
                translation=profile.motion_translation_mm,
                num_transforms=2,
            )
        )
    if profile.ghosts > 0 and profile.ghost_intensity > 0:
        steps.append(
            tio.RandomGhosting(
                num_ghosts=(profile.ghosts, profile.ghosts),
                axes=(_array_axis(volume, profile.ghost_axis),),
                intensity=(profile.ghost_intensity, profile.ghost_intensity),
            )
        )
    return steps


def simulate_scanner(volume: Volume, profile: str | ScannerProfile, seed: int = 0) -> Volume:
    """``volume`` as the scanner ``profile`` would show it; same grid, float32, seeded.

    Args:
        volume: a 3D image (not modified).
        profile: a built-in profile name (see :func:`list_profiles`) or a :class:`ScannerProfile`.
        seed: seeds every random choice (bias field, ghost phases, motion, noise). Default 0.
    """
    profile = get_profile(profile)
    data = np.asarray(volume.data, dtype=np.float32)
    scale = robust_maximum(data)
    unit = np.clip(data / scale, 0.0, None)
    if profile.t2_blend > 0:
        unit = (1 - profile.t2_blend) * unit + profile.t2_blend * t2_like(unit)
    if profile.inverted_blend > 0:
        unit = (1 - profile.inverted_blend) * unit + profile.inverted_blend * inverted(unit)
    if profile.gamma != 1.0:
        unit = np.power(unit, profile.gamma)
    if profile.slice_thickness_mm:
        axis = _array_axis(volume, profile.slice_axis)
        unit = thick_slices(unit, axis, profile.slice_thickness_mm / volume.spacing[axis])

    steps = _torchio_steps(volume, profile)
    if steps:
        import torchio as tio

        image = tio.ScalarImage(tensor=torch.from_numpy(unit.copy())[None], affine=volume.affine)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for step in steps:
                image = step(image)
        unit = image.data[0].numpy().astype(np.float32)
    if profile.rician_sigma > 0:
        generator = np.random.default_rng(seed)
        unit = rician_noise(np.clip(unit, 0.0, None), profile.rician_sigma, generator)
    unit = np.clip(unit, 0.0, None)
    return volume.with_data((unit * scale).astype(np.float32))


def custom_profile(base: str | ScannerProfile, **changes) -> ScannerProfile:
    """A copy of a profile with some fields changed, e.g. ``custom_profile("new_scanner",
    rician_sigma=0.1)``."""
    return replace(get_profile(base), **changes)
