"""nnU-Net v2's inference pipeline, reproduced without nnU-Net (numpy, scipy, scikit-image, torch).

Each step follows ``nnunetv2`` 2.x (``DefaultPreprocessor.run_case_npy``,
``nnUNetPredictor.predict_sliding_window_return_logits`` and
``convert_predicted_logits_to_segmentation_with_correct_shape``) so that napari-uda's prediction
equals ``nnUNetPredictor``'s (tested against it):

1. the file's voxel array in nnU-Net's axis order (SimpleITK's: the file's axes reversed, z y x),
   then the plans' ``transpose_forward``;
2. crop to the bounding box of the non-zero voxels (holes filled);
3. per-channel normalisation (:data:`NORMALIZATIONS`), inside the non-zero mask when the plans'
   ``use_mask_for_norm`` says so;
4. resampling to the configuration's spacing (:func:`resample`: scikit-image spline resizing,
   anisotropic axes separately, as ``resample_data_or_seg``);
5. padding (centred) to at least the patch size, sliding windows at half a patch
   (:func:`window_starts`), stitched with nnU-Net's Gaussian (:func:`gaussian_weights`);
6. the way back: unpad, resample the logits to the cropped shape, softmax (or the region rule),
   background outside the crop, ``transpose_backward``.

Averaging over mirrored inputs and over folds happens in the network
(:class:`napari_uda.core.models.nnunet.NnUNetNetwork`); it is linear in the logits, as nnU-Net's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes, gaussian_filter, map_coordinates
from skimage.transform import resize

from ..volume import Volume

#: nnU-Net's threshold (max / min spacing) above which the low-resolution axis is resampled
#: separately (``nnunetv2.configuration.ANISO_THRESHOLD``).
ANISO_THRESHOLD = 3
#: Sliding windows overlap by half a patch (nnU-Net's default ``tile_step_size``).
TILE_STEP_SIZE = 0.5
#: Probabilities are clamped to this before their logarithm is taken (see
#: :meth:`NnUNetPrepared.to_source_grid`).
PROBABILITY_FLOOR = 1e-30


def nonzero_bbox(data: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """nnU-Net's ``crop_to_nonzero``: the box around voxels non-zero in any channel (holes
    filled) and that mask inside the box. An all-zero image keeps its whole extent."""
    mask = binary_fill_holes((data != 0).any(axis=0))
    if not mask.any():
        box = tuple(slice(0, n) for n in mask.shape)
        return box, mask
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    box = tuple(box)
    return box, mask[box]


def normalize_channel(
    image: np.ndarray, scheme: str, use_mask: bool, mask: np.ndarray, properties: dict
) -> np.ndarray:
    """One channel normalised as nnU-Net's scheme ``scheme`` (see :data:`NORMALIZATIONS`)."""
    image = image.astype(np.float32, copy=True)
    eps = 1e-8
    if scheme == "ZScoreNormalization":
        if use_mask:
            mean, std = image[mask].mean(), image[mask].std()
            image[mask] = (image[mask] - mean) / max(std, eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif scheme == "CTNormalization":
        np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"], out=image)
        image -= properties["mean"]
        image /= max(properties["std"], eps)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    elif scheme == "RGBTo01Normalization":
        image /= 255.0
    return image


#: Normalisation schemes nnU-Net v2 ships (``nnunetv2/preprocessing/normalization``).
NORMALIZATIONS = (
    "ZScoreNormalization",
    "CTNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]):
    """nnU-Net's ``compute_new_shape``: round(old spacing / new spacing * old shape)."""
    return np.array([round(s / t * n) for s, t, n in zip(spacing, target, shape)])


def _separate_axis(force_separate_z, current_spacing, new_spacing) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis``: the low-resolution axis resampled on its own
    (``None``: resample all axes together)."""

    def lowres_axes(spacing):
        return np.where(max(spacing) / np.array(spacing) == 1)[0]

    def anisotropic(spacing):
        return (np.max(spacing) / np.min(spacing)) > ANISO_THRESHOLD

    if force_separate_z is not None:
        axes = lowres_axes(current_spacing) if force_separate_z else None
    elif anisotropic(current_spacing):
        axes = lowres_axes(current_spacing)
    elif anisotropic(new_spacing):
        axes = lowres_axes(new_spacing)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return int(axes[0])


def resample(
    data: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = None,
) -> np.ndarray:
    """(C, X, Y, Z) resized to ``new_shape`` as nnU-Net's ``resample_data_or_seg_to_shape`` does
    for images and logits (``is_seg=False``): scikit-image ``resize`` (spline ``order``, edge
    mode, no anti-aliasing); with anisotropic spacing the in-plane axes first, slice by slice,
    then the low-resolution axis with ``order_z``. Keeps ``data``'s dtype."""
    new_shape = np.array([int(n) for n in new_shape])
    shape = np.array(data.shape[1:])
    if np.all(shape == new_shape):
        return data
    axis = _separate_axis(force_separate_z, current_spacing, new_spacing)
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    source = data.astype(float, copy=False)
    kwargs = {"mode": "edge", "anti_aliasing": False}
    for channel in range(data.shape[0]):
        if axis is None:
            out[channel] = resize(source[channel], new_shape, order, **kwargs)
            continue
        in_plane = new_shape[[a for a in range(3) if a != axis]]
        partial_shape = deepcopy(new_shape)
        partial_shape[axis] = shape[axis]
        partial = np.zeros(partial_shape)
        for index in range(shape[axis]):
            where = [slice(None)] * 3
            where[axis] = index
            partial[tuple(where)] = resize(source[channel][tuple(where)], in_plane, order, **kwargs)
        if shape[axis] == new_shape[axis]:
            out[channel] = partial
            continue
        grids = np.mgrid[: new_shape[0], : new_shape[1], : new_shape[2]].astype(float)
        for a in range(3):
            scale = float(partial.shape[a]) / new_shape[a]
            grids[a] = scale * (grids[a] + 0.5) - 0.5
        out[channel] = map_coordinates(partial, grids, order=order_z, mode="nearest")
    return out


def window_starts(size: int, patch: int, step: float = TILE_STEP_SIZE) -> list[int]:
    """nnU-Net's ``compute_steps_for_sliding_window`` along one axis (size >= patch)."""
    count = int(np.ceil((size - patch) / (patch * step))) + 1
    if count == 1:
        return [0]
    actual = (size - patch) / (count - 1)
    return [int(np.round(actual * i)) for i in range(count)]


def gaussian_weights(patch_size: Sequence[int]) -> torch.Tensor:
    """nnU-Net's ``compute_gaussian``: sigma = patch / 8 around the voxel ``n // 2``, scaled
    to a maximum of 10 and rounded to float16 as nnU-Net keeps it (so the far corners, which
    underflow, get the smallest weight as in nnU-Net), returned as float32."""
    delta = np.zeros(tuple(patch_size))
    delta[tuple(n // 2 for n in patch_size)] = 1
    weights = gaussian_filter(delta, [n / 8 for n in patch_size], 0, mode="constant", cval=0)
    weights = torch.from_numpy(weights / (weights.max() / 10)).half()
    weights[weights == 0] = weights[weights != 0].min()
    return weights.float()


def centred_padding(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding of the last axes up to ``patch`` (nnU-Net's ``pad_nd_image``:
    centred, the odd voxel after)."""
    widths = []
    for n, p in zip(shape, patch):
        missing = max(0, p - n)
        widths.append((missing // 2, missing - missing // 2))
    return widths


@dataclass
class WindowTiling:
    """Sliding windows over a (C, *grid) array, padded as nnU-Net pads it.

    Attributes:
        grid_shape: shape of the resampled (cropped) volume in nnU-Net's axes, 3 numbers.
        patch_size: the configuration's patch (3 numbers, or 2 for ``2d``: then each slice along
            the first axis is tiled in-plane).
        padding: (before, after) per padded axis (the last ``len(patch_size)`` axes).
        windows: index tuples into the padded (C, *grid) array.
        weights: stitching weights of one window; ``None``: nnU-Net's Gaussian
            (:func:`gaussian_weights`). MONAI bundles give MONAI's importance map.
    """

    grid_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    padding: list[tuple[int, int]]
    windows: list[tuple]
    weights: torch.Tensor | None = None

    @classmethod
    def build(cls, grid_shape: Sequence[int], patch_size: Sequence[int]) -> WindowTiling:
        grid_shape = tuple(int(n) for n in grid_shape)
        patch_size = tuple(int(n) for n in patch_size)
        tiled = grid_shape[len(grid_shape) - len(patch_size) :]
        padding = centred_padding(tiled, patch_size)
        padded = [n + a + b for n, (a, b) in zip(tiled, padding)]
        starts = [window_starts(n, p) for n, p in zip(padded, patch_size)]
        boxes = [
            tuple(slice(s, s + p) for s, p in zip(corner, patch_size))
            for corner in itertools.product(*starts)
        ]
        if len(patch_size) == 3:
            windows = [(slice(None), *box) for box in boxes]
        else:
            windows = [(slice(None), d, *box) for d in range(grid_shape[0]) for box in boxes]
        return cls(grid_shape, patch_size, padding, windows)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        lead = self.grid_shape[: len(self.grid_shape) - len(self.patch_size)]
        tiled = self.grid_shape[len(lead) :]
        return (*lead, *(n + a + b for n, (a, b) in zip(tiled, self.padding)))

    def _torch_pad(self) -> list[int]:
        widths = []
        for before, after in reversed(self.padding):
            widths += [before, after]
        return widths

    def split(self, channels: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """(C, *grid_shape) -> (N, C, *patch) windows (zero padding, as nnU-Net)."""
        padded = F.pad(channels, self._torch_pad(), value=pad_value)
        return torch.stack([padded[w] for w in self.windows]).contiguous()

    def merge(self, outputs: torch.Tensor, *, weighted: bool = True) -> torch.Tensor:
        """(N, C, *patch) -> (C, *grid_shape): weighted average where windows overlap
        (:attr:`weights`; ``weighted=False``: plain average), padding removed."""
        outputs = torch.as_tensor(outputs).float()
        if not weighted:
            weights = torch.ones(self.patch_size)
        elif self.weights is not None:
            weights = self.weights.float()
        else:
            weights = gaussian_weights(self.patch_size)
        merged = torch.zeros((outputs.shape[1], *self.padded_shape))
        total = torch.zeros(self.padded_shape)
        for output, window in zip(outputs, self.windows):
            merged[window] += output * weights
            total[window[1:]] += weights
        merged /= total
        lead = len(self.grid_shape) - len(self.patch_size)
        keep = [slice(None)] * (1 + lead) + [
            slice(a, a + n) for n, (a, _) in zip(self.grid_shape[lead:], self.padding)
        ]
        return merged[tuple(keep)]


def file_axes(volume: Volume, reorient: bool) -> np.ndarray:
    """The volume's voxels in nnU-Net's axis order: the file's axes reversed (z, y, x, as
    SimpleITK and nnU-Net's NibabelIO read them); after reorienting to RAS with
    ``reorient`` (nnU-Net's ``NibabelIOWithReorient``)."""
    data = volume.to_canonical().data if reorient else volume.data
    return np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0))


def from_file_axes(volume: Volume, array: np.ndarray, reorient: bool) -> np.ndarray:
    """(C, z, y, x) in nnU-Net's axis order -> (C, *volume.shape) on the volume's own grid."""
    back = np.ascontiguousarray(np.moveaxis(array, 0, -1).transpose(2, 1, 0, 3))
    if reorient:
        back = volume.from_canonical(back).data
    return np.ascontiguousarray(np.moveaxis(back, -1, 0))


def file_spacing(volume: Volume, reorient: bool) -> list[float]:
    """Voxel size along nnU-Net's axes (the file's axes reversed)."""
    spacing = volume.to_canonical().spacing if reorient else volume.spacing
    return [float(s) for s in reversed(spacing)]
