"""Typed settings: documented fields, CLI parsing, bounds and choices."""

from dataclasses import dataclass
from typing import Literal

import pytest

from napari_uda.settings import (
    SettingsError,
    _base_type,
    apply_overrides,
    describe,
    describe_format,
    is_optional,
    setting,
    settings_to_dict,
)


@dataclass
class ExampleSettings:
    epochs: int = setting(10, "Passes over the data.", min=1, max=100)
    rate: float = setting(1e-3, "Learning rate.", min=0.0)
    loss: Literal["mse", "ce"] = setting("mse", "Consistency loss.")
    balanced: bool = setting(False, "Balance classes.")
    prior: tuple | None = setting(None, "Class-ratio prior.")


def test_describe_lists_documented_fields_in_order():
    specs = describe(ExampleSettings)
    assert [s.name for s in specs] == ["epochs", "rate", "loss", "balanced", "prior"]
    assert specs[0].help == "Passes over the data." and specs[0].min == 1 and specs[0].max == 100
    assert specs[2].choices == ("mse", "ce")


def test_overrides_parse_each_type():
    result = apply_overrides(
        ExampleSettings(),
        ["epochs=3", "rate=0.5", "loss=ce", "balanced=yes", "prior=0.8,0.2"],
    )
    assert result == ExampleSettings(3, 0.5, "ce", True, (0.8, 0.2))
    assert ExampleSettings().epochs == 10  # the original is untouched


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=0", "below the minimum"),
        ("epochs=x", "not a valid int"),
        ("loss=dice", "not one of"),
        ("unknown=1", "unknown setting"),
        ("epochs", "expected key=value"),
        ("rate=nan", "not a finite number"),
        ("rate=inf", "not a finite number"),
    ],
)
def test_bad_overrides_give_one_readable_line(override, message):
    with pytest.raises(SettingsError, match=message) as info:
        apply_overrides(ExampleSettings(), [override])
    assert "\n" not in str(info.value)


def test_dict_overrides_are_checked_too():
    assert apply_overrides(ExampleSettings(), {"epochs": 5}).epochs == 5
    with pytest.raises(SettingsError):
        apply_overrides(ExampleSettings(), {"epochs": 500})


def test_settings_to_dict_is_json_ready():
    values = settings_to_dict(apply_overrides(ExampleSettings(), ["prior=0.5,0.5"]))
    assert values["prior"] == [0.5, 0.5]


@dataclass
class RangeSettings:
    scale_range: tuple[float, float] = setting((0.9, 1.1), "Zoom range.", min=0.1, max=10.0)
    spacing: tuple[float, float] | None = setting(None, "In-plane spacing (mm).", min=0.0)
    crop: tuple[int, ...] = setting((1, 2, 3), "Crop per axis.")


def test_typed_tuples_parse_from_the_command_line():
    assert _base_type(tuple[float, float]) is tuple
    assert _base_type(tuple[float, float] | None) is tuple
    result = apply_overrides(RangeSettings(), ["scale_range=0.8,1.25", "spacing=(1, 1.5)"])
    assert result.scale_range == (0.8, 1.25) and result.spacing == (1.0, 1.5)
    assert all(isinstance(v, float) for v in result.scale_range + result.spacing)
    assert apply_overrides(RangeSettings(), ["crop=4,5"]).crop == (4, 5)
    assert apply_overrides(result, ["spacing=none"]).spacing is None
    assert apply_overrides(RangeSettings(), {"scale_range": [0.5, 2]}).scale_range == (0.5, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scale_range=0.8", "expected 2"),
        ("scale_range=0.8,1,2", "expected 2"),
        ("scale_range=0.8,x", "'x' in '0.8,x' is not a valid float"),
        ("scale_range=0.01,1", "below the minimum"),
        ("scale_range=none", "needs a value: 2 numbers separated by commas"),
        ("crop=1,2.5", "not a valid int"),
    ],
)
def test_bad_tuples_give_one_readable_line(override, message):
    with pytest.raises(SettingsError, match=message) as info:
        apply_overrides(RangeSettings(), [override])
    assert "\n" not in str(info.value)


def test_tuple_format_is_described():
    specs = {spec.name: spec for spec in describe(RangeSettings)}
    assert describe_format(specs["scale_range"]) == "2 numbers separated by commas"
    assert describe_format(specs["crop"]) == "Whole numbers, separated by commas"
    assert is_optional(specs["spacing"]) and not is_optional(specs["scale_range"])


def test_hidden_fields_stay_out_of_forms_cli_docs_and_reports():
    from napari_uda.adaptation.methods.corrections import CorrectionsOnlySettings

    names = [spec.name for spec in describe(CorrectionsOnlySettings)]
    assert "learning_rate" not in names and "corrections_learning_rate" in names
    settings = CorrectionsOnlySettings()
    assert settings.learning_rate == 0.0  # the field is kept for code that reads it
    assert "learning_rate" not in settings_to_dict(settings)
    with pytest.raises(SettingsError, match="learning_rate"):
        apply_overrides(settings, ["learning_rate=0.01"])
    assert apply_overrides(settings, ["corrections_learning_rate=0.01"]).corrections_learning_rate
