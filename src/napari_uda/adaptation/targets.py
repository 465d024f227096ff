"""The target volumes of a run as one stack of network inputs, and the way back to each scan.

A :class:`TargetSet` prepares every volume with the model's own preprocessing (whatever
:class:`~napari_uda.core.preprocessing.PreparedInputs` the adapter returns: 2D slices, 3D
patches or whole volumes) and stacks their inputs into one tensor, padded at the far end of
each spatial axis to a common shape (each volume's inputs with their own minimum, as the
adapters pad). Nothing it is given is modified: the padding lives here, and outputs are cropped
back before each volume maps them to its grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.inference import Prediction
from ..core.models.adapter import ModelAdapter
from ..core.preprocessing import PreparedInputs
from ..core.volume import Volume, require_contrast
from .plan import AdaptationError


def far_end_padding(shape: Sequence[int], target: Sequence[int]) -> list[int]:
    """``F.pad`` widths that pad the last ``len(shape)`` axes at their far end to ``target``."""
    pad: list[int] = []
    for size, wanted in zip(reversed(tuple(shape)), reversed(tuple(target))):
        pad += [0, int(wanted) - int(size)]
    return pad


class TargetSet:
    """The prepared target volumes of one run.

    Attributes:
        prepared: one :class:`PreparedInputs` per volume, in order (never modified).
        inputs: (N, C, ...) float32, every volume's inputs stacked and padded to one shape
            (the one volume's own inputs when there is only one and nothing to pad: read only).
        valid_mask: (N, 1, ...) boolean, True on the volumes' voxels and False on padding;
            ``None`` when every voxel counts (nothing was padded).
        valid: (N, ...) boolean, the mask without its channel axis (all True when ``None``).
        ranges: each volume's ``(start, stop)`` rows in :attr:`inputs`.
    """

    def __init__(self, prepared: Sequence[PreparedInputs]):
        if not prepared:
            raise AdaptationError("no target volume given")
        self.prepared = list(prepared)
        inputs = [p.inputs for p in self.prepared]
        if len({(t.dim(), t.shape[1]) for t in inputs}) != 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
            raise AdaptationError(f"the volumes' network inputs do not fit together: {shapes}")
        self.spatial_shape = tuple(max(sizes) for sizes in zip(*(t.shape[2:] for t in inputs)))
        padded, masks, self.ranges, start = [], [], [], 0
        for volume, tensor in zip(self.prepared, inputs):
            padded.append(self._pad(tensor, float(tensor.min())))
            masks.append(self._pad(volume.valid_mask().to(torch.uint8), 0).bool())
            self.ranges.append((start, start + tensor.shape[0]))
            start += tensor.shape[0]
        # one volume needs no stacking: share its inputs (read only) instead of a copy
        self.inputs = padded[0] if len(padded) == 1 else torch.cat(padded)
        mask = torch.cat(masks)
        self.valid_mask = None if bool(mask.all()) else mask
        self.valid = mask[:, 0]

    @classmethod
    def prepare(cls, model: ModelAdapter, volumes: Volume | Sequence[Volume]) -> TargetSet:
        """Prepare ``volumes`` (one or several) as ``model`` expects and stack them. A blank
        or constant scan is refused (:func:`~napari_uda.core.volume.require_contrast`)."""
        volumes = [volumes] if isinstance(volumes, Volume) else list(volumes)
        return cls([model.prepare(require_contrast(volume)) for volume in volumes])

    def _pad(self, tensor: torch.Tensor, value) -> torch.Tensor:
        pad = far_end_padding(tensor.shape[2:], self.spatial_shape)
        if not any(pad):
            return tensor
        return F.pad(tensor, pad, value=value)

    def __len__(self) -> int:
        return len(self.prepared)

    @property
    def first(self) -> slice:
        """The rows of the first volume (the one previews, the reference and corrections are
        on)."""
        return slice(*self.ranges[0])

    def labels_on_inputs(
        self, labels: Volume | np.ndarray, *, fill: int = 0, what: str = "labels"
    ) -> torch.Tensor:
        """A label map on the *first* volume's grid -> int64 (N, ...) aligned with
        :attr:`inputs`, through the model's own preparation (nearest neighbour, every value
        kept); the padding and the other volumes' rows hold ``fill``.

        Raises:
            AdaptationError: ``labels`` is not on the first volume's grid (one line naming
                ``what``).
        """
        first = self.prepared[0]
        shape = tuple(np.shape(labels.data if isinstance(labels, Volume) else labels))
        if shape != tuple(first.source.shape):
            raise AdaptationError(
                f"the {what} (shape {shape}) does not match the image's shape "
                f"{tuple(first.source.shape)}"
            )
        mapped = first.labels_to_inputs(labels, fill=fill)
        mapped = self._pad(mapped[:, None], fill)[:, 0]
        rest = self.inputs.shape[0] - mapped.shape[0]
        if rest:
            others = torch.full((rest, *mapped.shape[1:]), fill, dtype=mapped.dtype)
            mapped = torch.cat([mapped, others])
        return mapped

    def to_source_grid(self, outputs: torch.Tensor, index: int = 0) -> np.ndarray:
        """Outputs (N_i, C, ...) of volume ``index``'s rows (padded like :attr:`inputs`) ->
        (C, *source.shape) on that volume's grid."""
        prepared = self.prepared[index]
        own = tuple(prepared.inputs.shape[2:])
        cropped = outputs[(slice(None), slice(None), *(slice(0, n) for n in own))]
        return prepared.to_source_grid(cropped)

    def prediction(self, probabilities: torch.Tensor, index: int = 0) -> Prediction:
        """Volume ``index``'s :class:`Prediction` from probabilities on its rows only."""
        source = self.prepared[index].source
        return Prediction.from_probabilities(self.to_source_grid(probabilities, index), source)

    def predictions(self, probabilities: torch.Tensor) -> list[Prediction]:
        """One :class:`Prediction` per volume from (N, C, ...) probabilities on all rows."""
        return [
            self.prediction(probabilities[start:stop], index)
            for index, (start, stop) in enumerate(self.ranges)
        ]
