"""Resolve and validate a run once: which method, which settings, whether the model suits it.

:func:`plan_run` is what the CLI, the Adapt widget and the engine call before anything heavy
happens; a bad method name, bad settings or a model that lacks what the method needs are
reported there, as one line, and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.models.adapter import ModelAdapter
from ..settings import apply_overrides, check_value, describe
from .base import AdaptationMethod, CommonSettings, get_method

SettingsInput = CommonSettings | dict[str, Any] | Sequence[str] | None


class AdaptationError(ValueError):
    """A run that cannot start (unmet needs, bad settings, mismatched reference); one line."""


@dataclass(frozen=True)
class RunPlan:
    """A validated run: the method, its settings and what the model recommended beneath them.

    Attributes:
        method: the method's class.
        settings: its settings (an instance of ``method.Settings``, checked).
        recommended: the model's recommended changes to the method's defaults (applied
            beneath the user's own values; empty when the model has none).
    """

    method: type[AdaptationMethod]
    settings: CommonSettings
    recommended: dict[str, Any]


def recommended_settings(
    model: ModelAdapter, method_class: type[AdaptationMethod]
) -> dict[str, Any]:
    """The changes to ``method_class``'s paper defaults that ``model`` needs or is safer with.

    A ``parameters`` setting whose default group the model does not have (AdaEnt's ``norm`` on
    a network whose normalisation layers have no affine parameters, as deepbet) becomes
    ``all`` (what the adapter offers for training); then the adapter's own measured
    :meth:`~ModelAdapter.recommended_settings` for the method apply. The CLI, the Adapt
    widget's form and the engine all start from these, beneath the user's own values.
    """
    changes: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(method_class.Settings)}
    if "parameters" in fields and fields["parameters"].default not in model.parameter_groups():
        changes["parameters"] = "all"
    return {**changes, **model.recommended_settings(method_class.name)}


def resolve_settings(
    method_class: type[AdaptationMethod],
    settings: SettingsInput,
    model: ModelAdapter | None = None,
):
    """The method's settings from None (defaults), an instance, a dict or ``key=value`` strings.

    With ``model``, :func:`recommended_settings` for the method replace the paper defaults
    beneath the user's own values (e.g. deepbet, which has no normalisation parameters, trains
    its first blocks). An instance is taken as it is (checked, copied).
    """
    defaults = method_class.Settings()
    recommended = recommended_settings(model, method_class) if model is not None else {}
    if recommended:
        defaults = apply_overrides(defaults, dict(recommended))
    if settings is None:
        return defaults
    if isinstance(settings, CommonSettings):
        if not isinstance(settings, method_class.Settings):
            raise AdaptationError(
                f"settings of type {type(settings).__name__} do not belong to method "
                f"{method_class.name!r}"
            )
        for spec in describe(type(settings)):
            check_value(spec, getattr(settings, spec.name))
        return dataclasses.replace(settings)
    if isinstance(settings, str):
        settings = [settings]
    return apply_overrides(defaults, settings if isinstance(settings, dict) else list(settings))


def plan_run(
    model: ModelAdapter,
    method: str | type[AdaptationMethod],
    settings: SettingsInput = None,
    *,
    model_name: str = "this model",
) -> RunPlan:
    """Resolve ``method`` and ``settings`` for ``model`` and check the model has what the
    method needs (``model_name``, e.g. its path, names it in the error).

    Raises:
        KeyError: an unknown method name (the message lists the known ones).
        SettingsError: an unknown setting or a value out of bounds.
        AdaptationError: the model lacks what the method needs, or settings of another method.
    """
    method_class = get_method(method) if isinstance(method, str) else method
    resolved = resolve_settings(method_class, settings, model)
    unmet = method_class.unmet_needs(model.capabilities)
    if unmet:
        raise AdaptationError(f"{method_class.name} cannot adapt {model_name}: {'; '.join(unmet)}")
    return RunPlan(method_class, resolved, recommended_settings(model, method_class))
