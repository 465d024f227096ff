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
import typing
from dataclasses import dataclass, field
from typing import Any


def setting(default: Any, help: str, *, min=None, max=None, step=None, choices=None):
    """A dataclass field with documentation and bounds (``help`` is required)."""
    metadata = {"help": help}
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
        if f.name.startswith("_"):
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


def _base_type(hint) -> type:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0]) if args else str
    return hint if isinstance(hint, type) else str


def parse_value(spec: SettingSpec, text: str) -> Any:
    """Parse ``text`` as a value of ``spec``'s type and check its bounds and choices."""
    base = _base_type(spec.type)
    text = text.strip()
    if text.lower() in ("none", "null") and spec.default is None:
        return None
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
            value = tuple(float(v) for v in text.strip("()[]").split(",") if v.strip())
        else:
            value = text
    except ValueError as error:
        raise SettingsError(
            f"setting {spec.name!r}: {text!r} is not a valid {base.__name__}"
        ) from error
    check_value(spec, value)
    return value


def check_value(spec: SettingSpec, value: Any) -> None:
    """Raise :class:`SettingsError` if ``value`` is outside ``spec``'s bounds or choices."""
    if spec.choices is not None and value not in spec.choices:
        raise SettingsError(
            f"setting {spec.name!r}: {value!r} is not one of {', '.join(map(str, spec.choices))}"
        )
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
            check_value(spec, value)
        changes[key] = value
    return dataclasses.replace(settings, **changes)


def settings_to_dict(settings) -> dict[str, Any]:
    """A JSON-able dict of a settings dataclass."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(settings).items()
    }
