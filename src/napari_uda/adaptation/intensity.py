"""Does the scan itself support how adaptation changed the mask? A label-free check.

Adaptation changes some voxels: it adds foreground the unadapted model left out and drops
foreground it had. Where both models agree, their foreground and background give two intensity
distributions of *this* scan. A change the scan supports adds voxels that look like the agreed
foreground and drops voxels that look like the agreed background. A mask that slides sideways,
adding as much as it drops with both sides looking alike, gets no support.

:func:`intensity_support` is the mean, over the changed voxels, of the log-likelihood ratio
``log p(intensity | agreed foreground) - log p(intensity | agreed background)``: counted as it
is for an added voxel and negated for a dropped one (nats; 0: the intensities say nothing,
positive: they support the change). The distributions are histograms of the network input
(``bins`` bins, default 64, between its 0.5th and 99.5th percentiles, add-one smoothing). The
background counts only inside the box around both masks widened by ``margin`` (default 0.1) of
its size on each side, so the air around a head does not swamp it. With several input channels
the ratio is averaged over channels. Foreground is every class but the first (background), so
the check sees a mask moving, not two foreground classes trading voxels.

It is one of the gate's rules (:mod:`napari_uda.adaptation.gate`); docs/reliability.md has the
measured effect.
"""

from __future__ import annotations

import torch

#: Most voxels the percentiles are estimated from (a regular subsample beyond it).
PERCENTILE_SAMPLE = 1_000_000


def widened_box(mask: torch.Tensor, margin: float) -> torch.Tensor:
    """A boolean mask of the bounding box of ``mask``'s True voxels, widened on each side of
    every axis by ``margin`` times its size along that axis (clipped to the array)."""
    box = torch.zeros_like(mask)
    found = mask.nonzero()
    if found.numel() == 0:
        return box
    lows, highs = found.min(0).values, found.max(0).values
    index = []
    for low, high, size in zip(lows.tolist(), highs.tolist(), mask.shape):
        extra = int(margin * (high - low))
        index.append(slice(max(0, low - extra), min(size, high + extra + 1)))
    box[tuple(index)] = True
    return box


def _percentiles(values: torch.Tensor, low: float, high: float) -> tuple[float, float]:
    step = max(1, values.numel() // PERCENTILE_SAMPLE)
    sample = values[::step].double()
    bounds = torch.quantile(sample, torch.tensor([low, high], dtype=torch.float64))
    return float(bounds[0]), float(bounds[1])


def _bin_llr(
    channel: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, box, bins: int
) -> tuple[torch.Tensor, float, float]:
    """Per-bin log-likelihood ratio of the agreed foreground against the agreed background."""
    low, high = _percentiles(channel[box], 0.005, 0.995)
    high = high if high > low else low + 1.0
    counts = []
    for where in (foreground, background):  # the tails go to the end bins, as in _mean_llr
        values = channel[where].float().clamp(low, high)
        counts.append(torch.histc(values, bins=bins, min=low, max=high).double())
    fg_counts, bg_counts = counts
    llr = torch.log((fg_counts + 1) / (fg_counts.sum() + bins)) - torch.log(
        (bg_counts + 1) / (bg_counts.sum() + bins)
    )
    return llr, low, high


def _mean_llr(channel: torch.Tensor, where, llr: torch.Tensor, low: float, high: float) -> float:
    values = channel[where].double().clamp(low, high)
    bins = llr.numel()
    index = ((values - low) / (high - low) * bins).long().clamp(0, bins - 1)
    return float(llr[index].sum())


def intensity_support(
    inputs: torch.Tensor,
    source_foreground: torch.Tensor,
    adapted_foreground: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    bins: int = 64,
    margin: float = 0.1,
) -> float | None:
    """How much the scan's intensities support the change from one mask to the other.

    Args:
        inputs: (N, C_in, ...) network inputs.
        source_foreground / adapted_foreground: (N, ...) boolean foreground of the unadapted
            and the adapted model on those inputs.
        valid: (N, ...) boolean, False on padding (None: every voxel counts).
        bins / margin: the histograms' bins and the background box's widening (see the module).

    Returns:
        The mean signed log-likelihood ratio over the changed voxels (nats), or None when
        nothing changed or the two models agree on no foreground or no background to compare.
    """
    where = torch.ones_like(source_foreground) if valid is None else valid.bool()
    source, adapted = source_foreground & where, adapted_foreground & where
    added, dropped = adapted & ~source, source & ~adapted
    changed = int(added.sum()) + int(dropped.sum())
    if changed == 0:
        return None
    box = widened_box(source | adapted, margin) & where
    foreground, background = source & adapted, ~source & ~adapted & box
    if not bool(foreground.any()) or not bool(background.any()):
        return None
    support = 0.0
    for c in range(inputs.shape[1]):
        channel = inputs[:, c]
        llr, low, high = _bin_llr(channel, foreground, background, box, bins)
        support += _mean_llr(channel, added, llr, low, high)
        support -= _mean_llr(channel, dropped, llr, low, high)
    return support / (changed * inputs.shape[1])
