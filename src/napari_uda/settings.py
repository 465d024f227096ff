"""Typed settings: dataclasses that the CLI, the napari forms and the docs all render from.

Every settings field carries its documentation in ``field(metadata=...)``:

* ``help``: one sentence, shown as the CLI help, the widget tooltip and in ``docs/``;
* ``min`` / ``max`` / ``step``: bounds for numeric widgets and validation;
* ``choices``: allowed values for a string field.

Use :func:`setting` to declare a field, :func:`describe` to list the fields, and
:func:`apply_overrides` to parse ``key=value`` strings from the command line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


def setting(
    default: Any, help: str, *, min=None, max=None, step=None, choices=None, hidden: bool = False
):
    """A dataclass field with documentation and bounds (``help`` is required).

    ``hidden``: a field a method inherits but does not use (AdaBN's learning rate): kept in the
    dataclass, left out of :func:`describe` (so of the forms, the CLI and the docs) and of
    :func:`settings_to_dict` (reports), and refused by :func:`apply_overrides`.
    """
    metadata = {"help": help}
    if hidden:
        metadata["hidden"] = True
    for key, value in (("min", min), ("max", max), ("step", step), ("choices", choices)):
        if value is not None:
            metadata[key] = value
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SettingSpec:
    """One documented setting, as the UI and the CLI see it."""

    name: str
    type: Any
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple | None = None


def _resolved_types(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - forward references that cannot resolve
        return {f.name: f.type for f in dataclasses.fields(cls)}


def describe(settings_class) -> list[SettingSpec]:
    """The documented fields of a settings dataclass, in declaration order."""
    hints = _resolved_types(settings_class)
    specs = []
    for f in dataclasses.fields(settings_class):
        if f.name.startswith("_") or f.metadata.get("hidden"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        choices = f.metadata.get("choices")
        hint = hints.get(f.name, type(default))
        if choices is None and typing.get_origin(hint) is typing.Literal:
            choices = typing.get_args(hint)
        specs.append(
            SettingSpec(
                name=f.name,
                type=hint,
                default=default,
                help=f.metadata.get("help", ""),
                min=f.metadata.get("min"),
                max=f.metadata.get("max"),
                step=f.metadata.get("step"),
                choices=tuple(choices) if choices is not None else None,
            )
        )
    return specs


class SettingsError(ValueError):
    """A setting that does not exist or a value that does not parse; one readable line."""


def _union_args(hint) -> tuple | None:
    """The members of a ``Union`` / ``X | Y`` hint, or None for other hints."""
    if typing.get_origin(hint) in (typing.Union, getattr(types, "UnionType", None)):
        return typing.get_args(hint)
    return None


def _base_type(hint) -> type:
    """The Python type a setting's values have: ``int`` for ``int | None``, ``tuple`` for
    ``tuple[float, float]`` and ``tuple[float, float] | None``, ``str`` when unknown."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0])
    members = _union_args(hint)
    if members is not None:
        args = [a for a in members if a is not type(None)]
        return _base_type(args[0]) if args else str
    if origin in (tuple, list):
        return origin
    return hint if isinstance(hint, type) else str


def is_optional(spec: SettingSpec) -> bool:
    """Whether ``None`` is a valid value of ``spec`` (its default, or ``X | None``)."""
    members = _union_args(spec.type)
    return spec.default is None or (members is not None and type(None) in members)


def element_types(hint) -> tuple[tuple[type, ...], bool] | None:
    """For a tuple or list setting: (element types, fixed length?); None for other settings.

    ``tuple[float, float]`` -> ((float, float), True); ``tuple[int, ...]`` and ``list[int]`` ->
    ((int,), False); a bare ``tuple`` -> ((float,), False) (numbers).
    """
    members = _union_args(hint)
    if members is not None:
        args = [a for a in members if a is not type(None)]
        return element_types(args[0]) if args else None
    if hint in (tuple, list):
        return (float,), False
    origin = typing.get_origin(hint)
    if origin not in (tuple, list):
        return None
    args = typing.get_args(hint)
    if not args:
        return (float,), False
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
        return (_base_type(args[0]),), False
    return tuple(_base_type(a) for a in args), True


def describe_format(spec: SettingSpec) -> str:
    """How to type a tuple setting, e.g. "2 numbers separated by commas"; "" for others."""
    elements = element_types(spec.type)
    if elements is None:
        return ""
    kinds, fixed = elements
    noun = "whole numbers" if all(k is int for k in kinds) else "numbers"
    count = f"{len(kinds)} {noun}" if fixed else noun.capitalize()
    text = f"{count} separated by commas" if fixed else f"{count}, separated by commas"
    return text[0].upper() + text[1:]


def _parse_sequence(spec: SettingSpec, text: str) -> tuple:
    kinds, fixed = element_types(spec.type) or ((float,), False)
    parts = [part.strip() for part in text.strip().strip("()[]").split(",")]
    parts = [part for part in parts if part]
    if fixed and len(parts) != len(kinds):
        raise SettingsError(
            f"setting {spec.name!r}: {text!r} has {len(parts)} value(s), expected "
            f"{len(kinds)} separated by commas"
        )
    values = []
    for index, part in enumerate(parts):
        kind = kinds[index] if fixed else kinds[0]
        try:
            values.append(kind(part) if kind in (int, float) else part)
        except ValueError as error:
            raise SettingsError(
                f"setting {spec.name!r}: {part!r} in {text!r} is not a valid {kind.__name__}"
            ) from error
    return tuple(values)


def parse_value(spec: SettingSpec, text: str) -> Any:
    """Parse ``text`` as a value of ``spec``'s type and check its bounds and choices.

    Tuples are typed as comma-separated values (``0.9,1.1``, brackets optional); ``none`` (or
    an empty text) gives ``None`` where the setting allows it.
    """
    base = _base_type(spec.type)
    text = text.strip()
    if text.lower() in ("none", "null", ""):
        if is_optional(spec):
            return None
        if base in (tuple, list):
            raise SettingsError(
                f"setting {spec.name!r} needs a value: {describe_format(spec).lower()}"
            )
    try:
        if base is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            value = lowered in ("true", "1", "yes", "on")
        elif base is int:
            value = int(text)
        elif base is float:
            value = float(text)
        elif base in (tuple, list):
            value = _parse_sequence(spec, text)
            value = list(value) if base is list else value
        else:
            value = text
    except SettingsError:
        raise
    except ValueError as error:
        raise SettingsError(
            f"setting {spec.name!r}: {text!r} is not a valid {base.__name__}"
        ) from error
    check_value(spec, value)
    return value


def check_value(spec: SettingSpec, value: Any) -> None:
    """Raise :class:`SettingsError` if ``value`` is outside ``spec``'s bounds or choices (for a
    tuple: its length, and the bounds for each element)."""
    if spec.choices is not None and value not in spec.choices:
        raise SettingsError(
            f"setting {spec.name!r}: {value!r} is not one of {', '.join(map(str, spec.choices))}"
        )
    elements = element_types(spec.type)
    if elements is not None and isinstance(value, (tuple, list)):
        kinds, fixed = elements
        if fixed and len(value) != len(kinds):
            raise SettingsError(
                f"setting {spec.name!r}: {tuple(value)!r} has {len(value)} value(s), expected "
                f"{len(kinds)}"
            )
        for item in value:
            _check_number(spec, item)
        return
    _check_number(spec, value)


def _check_number(spec: SettingSpec, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
        raise SettingsError(f"setting {spec.name!r}: {value} is not a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if spec.min is not None and value < spec.min:
            raise SettingsError(f"setting {spec.name!r}: {value} is below the minimum {spec.min}")
        if spec.max is not None and value > spec.max:
            raise SettingsError(f"setting {spec.name!r}: {value} is above the maximum {spec.max}")


def apply_overrides(settings, overrides: list[str] | dict[str, Any] | None):
    """A copy of ``settings`` with ``key=value`` strings (CLI) or a dict (UI) applied."""
    if not overrides:
        return dataclasses.replace(settings)
    specs = {spec.name: spec for spec in describe(type(settings))}
    changes: dict[str, Any] = {}
    items = overrides.items() if isinstance(overrides, dict) else None
    if items is None:
        parsed = []
        for text in overrides:
            if "=" not in text:
                raise SettingsError(f"expected key=value, got {text!r}")
            key, value = text.split("=", 1)
            parsed.append((key.strip(), value))
        items = parsed
    for key, value in items:
        if key not in specs:
            known = ", ".join(specs) or "none"
            raise SettingsError(f"unknown setting {key!r}; settings are: {known}")
        spec = specs[key]
        if isinstance(value, str) and _base_type(spec.type) is not str:
            value = parse_value(spec, value)
        else:
            if isinstance(value, list) and _base_type(spec.type) is tuple:
                value = tuple(value)  # from JSON (a report's settings)
            check_value(spec, value)
        changes[key] = value
    return dataclasses.replace(settings, **changes)


def settings_to_dict(settings) -> dict[str, Any]:
    """A JSON-able dict of a settings dataclass (hidden fields left out)."""
    hidden = {f.name for f in dataclasses.fields(settings) if f.metadata.get("hidden")}
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(settings).items()
        if key not in hidden
    }
