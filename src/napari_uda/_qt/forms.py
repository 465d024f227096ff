"""magicgui forms generated from a settings dataclass (:func:`napari_uda.settings.describe`).

Each field becomes one widget: choices -> combo box, bool -> check box, int -> spin box, float ->
spin box (or a text field for tiny or log-range values such as learning rates), anything else
(tuples such as ``tuple[float, float]``, optional values) -> a text field parsed like the CLI's
``--set key=value`` (``0.9, 1.1``; empty for none where allowed). The field's help is the
tooltip, its bounds the widget's range.
"""

from __future__ import annotations

import math
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, LineEdit, SpinBox, Widget

from ..settings import (
    SettingsError,
    SettingSpec,
    _base_type,
    describe,
    describe_format,
    element_types,
    is_optional,
    parse_value,
)

#: Limits used when a setting declares none.
UNBOUNDED = 1e9


def _decimals(value: float | None) -> int:
    """Decimal places needed to show ``value`` exactly (at most 6)."""
    if not value:
        return 0
    text = f"{abs(value):.6f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


def _is_log_range(spec: SettingSpec) -> bool:
    """Floats better typed than spun: tiny defaults (1e-4) or ranges over many decades."""
    default = spec.default
    if isinstance(default, (int, float)) and default and abs(default) < 0.01:
        return True
    return bool(spec.min and spec.min > 0 and spec.max and spec.max / spec.min >= 1e4)


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ", ".join(_format(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def tooltip(spec: SettingSpec) -> str:
    """The field's help, with its range or choices."""
    parts = [spec.help] if spec.help else []
    if describe_format(spec):
        parts.append(describe_format(spec) + ".")
    if spec.choices:
        parts.append("Choices: " + ", ".join(map(str, spec.choices)) + ".")
    elif spec.min is not None or spec.max is not None:
        low = "-∞" if spec.min is None else _format(spec.min)
        high = "∞" if spec.max is None else _format(spec.max)
        parts.append(f"Range: {low} to {high}.")
    if spec.default is None:
        parts.append("Leave empty for the default (none).")
    elif is_optional(spec):
        parts.append("Leave empty for none.")
    return " ".join(parts)


def widget_for(spec: SettingSpec) -> Widget:
    """One magicgui widget for one setting."""
    options = {"name": spec.name, "label": spec.name.replace("_", " "), "tooltip": tooltip(spec)}
    base = _base_type(spec.type)
    default = spec.default
    low = spec.min if spec.min is not None else -UNBOUNDED
    high = spec.max if spec.max is not None else UNBOUNDED
    if spec.choices:
        return ComboBox(choices=list(spec.choices), value=default, **options)
    if base is bool and default is not None:
        return CheckBox(value=bool(default), text="", **options)
    if base is int and default is not None:
        return SpinBox(value=default, min=int(low), max=int(high), step=spec.step or 1, **options)
    if base is float and default is not None and not _is_log_range(spec):
        magnitude = 10 ** math.floor(math.log10(abs(default))) if default else 1.0
        step = spec.step or magnitude / 10
        widget = FloatSpinBox(value=default, min=low, max=high, step=step, **options)
        decimals = max(2, _decimals(default) + 1, _decimals(spec.min), _decimals(step))
        widget.native.setDecimals(min(decimals, 6))
        widget.value = default
        return widget
    widget = LineEdit(value=_format(default), **options)
    example = _example(spec)
    if example:
        widget.native.setPlaceholderText(example)
    return widget


def _example(spec: SettingSpec) -> str:
    """Placeholder text of an empty tuple field: what to type (e.g. ``none, or 0.5, 0.5``)."""
    if _base_type(spec.type) not in (tuple, list):
        return ""
    kinds, fixed = element_types(spec.type) or ((float,), False)
    sample = ", ".join("1" if kind is int else "0.5" for kind in (kinds if fixed else kinds * 2))
    return f"none, or e.g. {sample}" if is_optional(spec) else f"e.g. {sample}"


class SettingsForm(Container):
    """A form for one settings dataclass; :meth:`values` returns checked ``{name: value}``."""

    def __init__(self, settings_class: type, **kwargs):
        self.settings_class = settings_class
        self.specs = {spec.name: spec for spec in describe(settings_class)}
        super().__init__(widgets=[widget_for(s) for s in self.specs.values()], **kwargs)
        self.margins = (0, 0, 0, 0)

    def values(self) -> dict[str, Any]:
        """Typed values of every field; raises :class:`SettingsError` with one readable line."""
        values = {}
        for name, spec in self.specs.items():
            widget = self[name]
            if isinstance(widget, LineEdit):
                text = widget.value.strip()
                if not text:
                    if is_optional(spec):
                        values[name] = None
                        continue
                    raise SettingsError(f"setting {name!r}: a value is needed")
                values[name] = parse_value(spec, text)
            else:
                values[name] = widget.value
        return values

    def recommend(self, values: dict[str, Any], why: str = "for this model") -> None:
        """Start from ``values`` instead of the paper defaults, saying so in each tooltip."""
        self.set_values(values)
        for name in values:
            spec, widget = self.specs[name], self[name]
            note = f"Set {why}; the paper default is {_format(spec.default) or 'none'}."
            widget.tooltip = f"{note} {tooltip(spec)}"
            widget.label = f"{spec.name.replace('_', ' ')} *"

    def set_values(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            widget = self[name]
            widget.value = _format(value) if isinstance(widget, LineEdit) else value
