"""Expected volumes per class, and loud flags for results outside them.

A segmentation can score a higher Dice while becoming nonsense (a brain mask that paints the
whole head), and a model can be confidently wrong, so volumes are checked against a range the
model states or the user sets, in millilitres: ``brain=1000:1800`` (several classes separated
by commas). The model's statement comes from :meth:`ModelAdapter.expected_volumes
<napari_uda.core.models.adapter.ModelAdapter.expected_volumes>` (a bundle's
``source_statistics["expected_volume_ml"]``, deepbet's adult-brain range); the user's range
replaces the model's for the classes it names. Every result (plain prediction, the unadapted
and the adapted model) is checked the same way: :func:`volume_flags`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..settings import setting
from .metrics import volume_ml

#: Class name -> (lowest, highest) plausible volume in ml.
ExpectedVolumes = dict[str, tuple[float, float]]


class ExpectedVolumeError(ValueError):
    """An expected-volume text or statement that does not parse; one readable line."""


@dataclass
class PlausibilitySettings:
    """What a result is checked against (the CLI's ``--expected-volume``, the Adapt form)."""

    expected_volume: str = setting(
        "",
        "Expected volume per class in ml, as name=low:high (several separated by commas), "
        "e.g. brain=1000:1800; replaces the model's own range for the classes it names. A "
        "result outside its range is flagged (empty: the model's range, if it states one).",
    )


def _range(name: str, low, high, where: str) -> tuple[float, float]:
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise ExpectedVolumeError(
            f"{where}: the range of {name!r} must be two numbers of ml, e.g. 1000:1800"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high <= low:
        raise ExpectedVolumeError(
            f"{where}: the range of {name!r} must be 0 <= low < high (finite ml), "
            f"not {low:g}:{high:g}"
        )
    return low, high


def parse_expected_volumes(
    text: str | Sequence[str] | Mapping | None,
    class_names: Sequence[str] | None = None,
    *,
    where: str = "expected volume",
) -> ExpectedVolumes:
    """``"brain=1000:1800,csf=100:300"`` (or a list of such items, or a mapping name ->
    (low, high)) as a dict; an empty text gives ``{}``.

    With ``class_names``, every name must be one of the foreground classes. Raises
    :class:`ExpectedVolumeError` (one line, prefixed with ``where``) on anything else.
    """
    if not text:
        return {}
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        parts = [text] if isinstance(text, str) else list(text)
        items = []
        for part in (p.strip() for chunk in parts for p in str(chunk).split(",")):
            if not part:
                continue
            name, equals, bounds = part.partition("=")
            low, colon, high = bounds.partition(":")
            if not (equals and colon and name.strip()):
                raise ExpectedVolumeError(
                    f"{where}: {part!r} is not name=low:high in ml, e.g. brain=1000:1800"
                )
            items.append((name.strip(), (low, high)))
    expected: ExpectedVolumes = {}
    for name, bounds in items:
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise ExpectedVolumeError(f"{where}: the range of {name!r} must be [low, high] in ml")
        expected[str(name)] = _range(str(name), *bounds, where)
    if class_names is not None:
        foreground = list(class_names)[1:]
        unknown = [name for name in expected if name not in foreground]
        if unknown:
            raise ExpectedVolumeError(
                f"{where}: {unknown[0]!r} is not a class of the model "
                f"(its classes: {', '.join(foreground) or 'none'})"
            )
    return expected


#: How :func:`expected_from_masks` widens the training masks' range: from half the smallest to
#: one and a half times the largest. Brains differ about 1.5-fold between adults and heads in
#: template space are larger still, so a range from a few training masks must be wide; it is
#: meant to catch a mask that lost half the organ or paints the head, not to judge anatomy.
TRAINING_RANGE_FACTORS = (0.5, 1.5)


def expected_from_masks(
    masks: Iterable[tuple[np.ndarray, Sequence[float]]],
    class_names: Sequence[str],
    factors: tuple[float, float] = TRAINING_RANGE_FACTORS,
) -> ExpectedVolumes:
    """An expected range per foreground class from labelled training masks, given as
    (label array, spacing in mm) pairs: from ``factors[0]`` times the smallest volume to
    ``factors[1]`` times the largest (three significant digits). Classes absent from every
    mask get none."""
    per_class: dict[str, list[float]] = {}
    for labels, spacing in masks:
        for name, volume in class_volumes(np.asarray(labels), spacing, class_names).items():
            per_class.setdefault(name, []).append(volume)
    return {
        name: (float(f"{min(v) * factors[0]:.3g}"), float(f"{max(v) * factors[1]:.3g}"))
        for name, v in per_class.items()
        if max(v) > 0
    }


def format_expected_volumes(expected: Mapping[str, tuple[float, float]]) -> str:
    """The text form of ``expected`` (``brain=1000:1800``), as the CLI takes it."""
    return ",".join(f"{name}={low:g}:{high:g}" for name, (low, high) in expected.items())


def merge_expected(model: ExpectedVolumes, user: ExpectedVolumes) -> ExpectedVolumes:
    """The model's ranges with the user's replacing them class by class."""
    return {**model, **user}


@dataclass
class VolumeFlag:
    """One class whose volume lies outside its expected range."""

    class_name: str
    volume_ml: float
    low: float
    high: float

    @property
    def message(self) -> str:
        side = "below" if self.volume_ml < self.low else "above"
        return (
            f"{self.class_name}: {self.volume_ml:.0f} ml is {side} the expected "
            f"{self.low:g}-{self.high:g} ml"
        )


def class_volumes(
    labels: np.ndarray, spacing: Sequence[float], class_names: Sequence[str]
) -> dict[str, float]:
    """Volume in ml of every foreground class of a label map, by class name."""
    volumes = volume_ml(labels, spacing, len(class_names))
    return {class_names[index]: value for index, value in volumes.items()}


def volume_flags(
    volumes_ml: Mapping[str, float], expected: Mapping[str, tuple[float, float]]
) -> list[VolumeFlag]:
    """A flag for every class of ``expected`` whose volume lies outside its range."""
    flags = []
    for name, (low, high) in expected.items():
        volume = volumes_ml.get(name)
        if volume is not None and not low <= volume <= high:
            flags.append(VolumeFlag(name, float(volume), low, high))
    return flags


def flag_lines(flags: Iterable[VolumeFlag], what: str = "the mask") -> list[str]:
    """One loud line per flag, e.g. ``implausible volume in the mask: brain: 2261 ml is
    above the expected 1000-1800 ml``."""
    return [f"implausible volume in {what}: {flag.message}" for flag in flags]
