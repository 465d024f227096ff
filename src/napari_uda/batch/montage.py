"""The QA montage of a case: the middle axial, coronal and sagittal slices of the scan (in the
canonical RAS+ orientation, superior/anterior up) with the source model's mask outlined in orange
(top row) and the kept mask in green (bottom row), written as a PNG (scikit-image's imageio; no
plotting library needed)."""

from __future__ import annotations

import os

import numpy as np

from ..core.volume import Volume

BEFORE_COLOUR = (255, 140, 0)
AFTER_COLOUR = (40, 220, 60)
#: Pixels per voxel in the montage (nearest neighbour) and the gap between panels.
ZOOM, GAP = 2, 4


def _middle_slices(data: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal middle slices of a RAS+ array, rotated for display."""
    x, y, z = (n // 2 for n in data.shape)
    return [np.rot90(data[:, :, z]), np.rot90(data[:, y, :]), np.rot90(data[x, :, :])]


def _grey(slice_: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((slice_ - low) / max(high - low, 1e-6), 0, 1) * 255
    return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2)


def _panel(image: np.ndarray, mask: np.ndarray, colour, low: float, high: float) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    zoom = np.ones((ZOOM, ZOOM), dtype=np.uint8)
    rgb = _grey(np.kron(image, zoom), low, high)
    outline = find_boundaries(np.kron(mask > 0, zoom).astype(np.uint8), mode="inner")
    rgb[outline] = colour
    return rgb


def _row(panels: list[np.ndarray], height: int) -> np.ndarray:
    padded = []
    for panel in panels:
        pad = height - panel.shape[0]
        padded.append(np.pad(panel, ((pad // 2, pad - pad // 2), (0, GAP), (0, 0))))
    return np.concatenate(padded, axis=1)


def montage(volume: Volume, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The montage as an RGB uint8 array (2 rows of 3 views)."""
    canonical = volume.to_canonical().data.astype(np.float32)
    masks = [volume.with_data(labels).to_canonical().data for labels in (before, after)]
    low, high = np.percentile(canonical, [1, 99.5])
    views = _middle_slices(canonical)
    rows = []
    height = max(view.shape[0] for view in views) * ZOOM
    for mask, colour in zip(masks, (BEFORE_COLOUR, AFTER_COLOUR)):
        panels = [
            _panel(view, mask_view, colour, low, high)
            for view, mask_view in zip(views, _middle_slices(mask))
        ]
        rows.append(_row(panels, height))
    gap = np.zeros((GAP, rows[0].shape[1], 3), dtype=np.uint8)
    return np.concatenate([rows[0], gap, rows[1]], axis=0)


def write_montage(
    volume: Volume, before: np.ndarray, after: np.ndarray, path: str | os.PathLike
) -> None:
    """Write :func:`montage` as a PNG at ``path``."""
    import imageio.v3 as iio

    iio.imwrite(path, montage(volume, before, after), extension=".png")
