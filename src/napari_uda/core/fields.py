"""Validation of fields read from files and options: every check names its field.

Model files are data written by someone else, so every field of a bundle header, a TorchScript
spec or a settings dataclass is checked for its type and a sane range before anything uses it.
A bad one raises :class:`FieldError`, whose message is one line starting with the field's name
(``depth must be a whole number from 1 to 8, not -1``), never a ``TypeError`` from deep inside.
Booleans are not numbers here (JSON ``true`` is not a depth).

The limits below are far beyond any real model and exist to refuse absurd values early:
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: Voxel sizes a model may ask for, in mm (a spacing of 1e-6 mm would resample a head to
#: trillions of voxels).
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 100.0
#: The largest side, in voxels, of a sliding-window patch or a padding multiple.
MAX_PATCH_SIDE = 1024


class FieldError(ValueError):
    """A field with a wrong type or value; ``field`` is its name, the message one line."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def whole_number(
    value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int (``2.0`` counts as 2), within the bounds (inclusive)."""
    wanted = f"must be a whole number{_range(minimum, maximum)}"
    if not _is_number(value) or not math.isfinite(value) or value != int(value):
        raise FieldError(field, f"{wanted}, not {_shown(value)}")
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise FieldError(field, f"{wanted}, not {number}")
    return number


def real_number(
    value: Any,
    field: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    above: float | None = None,
) -> float:
    """``value`` as a finite float within the bounds (``minimum``/``maximum`` inclusive,
    ``above``/``below`` exclusive)."""
    if not _is_number(value) or not math.isfinite(value):
        raise FieldError(field, f"must be a finite number, not {_shown(value)}")
    number = float(value)
    limits = [
        (minimum is not None and number < minimum, "at least", minimum),
        (maximum is not None and number > maximum, "at most", maximum),
        (above is not None and number <= above, "above", above),
        (below is not None and number >= below, "below", below),
    ]
    for broken, wanted, limit in limits:
        if broken:
            raise FieldError(field, f"must be {wanted} {limit:g}, not {number:g}")
    return number


def _range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    return "" if maximum is None else f" of at most {maximum}"


def one_of(value: Any, field: str, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared by type too: ``True`` is not ``1``)."""
    choices = list(choices)
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        listed = ", ".join(str(choice) for choice in choices)
        raise FieldError(field, f"must be one of {listed}, not {_shown(value)}")
    return value


def text(value: Any, field: str, *, empty: bool = False) -> str:
    """``value`` if it is a string (non-empty unless ``empty``)."""
    if not isinstance(value, str) or (not empty and not value.strip()):
        kind = "a string" if empty else "a non-empty string"
        raise FieldError(field, f"must be {kind}, not {_shown(value)}")
    return value


def text_list(value: Any, field: str, *, min_length: int = 0, unique: bool = False) -> list[str]:
    """A list of non-empty strings (a single string is refused: it is not a list of names)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise FieldError(field, f"must be a list of names, not {_shown(value)}")
    names = [text(item, f"{field}[{index}]") for index, item in enumerate(value)]
    if len(names) < min_length:
        raise FieldError(field, f"needs at least {min_length} names, got {len(names)}")
    if unique and len(set(names)) != len(names):
        raise FieldError(field, f"has a name twice: {_shown(names)}")
    return names


def number_list(
    value: Any, field: str, length: int, *, whole: bool = False, **bounds: Any
) -> tuple:
    """A list of exactly ``length`` numbers, each checked like :func:`real_number` (or
    :func:`whole_number` when ``whole``) with ``bounds``."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != length:
        raise FieldError(field, f"must be a list of {length} numbers, not {_shown(value)}")
    check = whole_number if whole else real_number
    return tuple(check(item, f"{field}[{index}]", **bounds) for index, item in enumerate(value))


def spacing_mm(value: Any, field: str) -> tuple[float, float, float]:
    """Three voxel sizes in mm between :data:`MIN_SPACING_MM` and :data:`MAX_SPACING_MM`."""
    return number_list(value, field, 3, minimum=MIN_SPACING_MM, maximum=MAX_SPACING_MM)


def percentile_pair(value: Any, field: str) -> tuple[float, float]:
    """``[low, high]`` percentiles with ``0 <= low < high <= 100``."""
    low, high = number_list(value, field, 2, minimum=0.0, maximum=100.0)
    if low >= high:
        raise FieldError(field, f"must be [low, high] with low below high, not [{low:g}, {high:g}]")
    return low, high


def mapping(value: Any, field: str) -> dict:
    """``value`` if it is a JSON object (a dict with string keys); ``None`` gives ``{}``."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise FieldError(field, f"must be a JSON object, not {_shown(value)}")
    return dict(value)


def known_keys(values: dict, field: str, known: Iterable[str]) -> None:
    """Refuse keys outside ``known``, naming the first and listing the known ones."""
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise FieldError(field, f"has an unknown key {unknown[0]!r} (known: {', '.join(known)})")
