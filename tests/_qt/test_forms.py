"""Settings forms generated from the settings dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, LineEdit, SpinBox

from napari_uda._qt.forms import SettingsForm
from napari_uda.adaptation import available_methods
from napari_uda.settings import SettingsError, apply_overrides, setting


@dataclass
class ExampleSettings:
    epochs: int = setting(10, "Passes over the data.", min=1, max=100)
    learning_rate: float = setting(1e-4, "Adam learning rate.", min=1e-7, max=1.0)
    alpha: float = setting(0.99, "EMA decay.", min=0.0, max=1.0)
    loss: Literal["mse", "dice"] = setting("mse", "Consistency loss.")
    balanced: bool = setting(False, "Balance classes.")
    prior: tuple | None = setting(None, "Class ratios (background, brain).")


def test_widgets_follow_the_field_types_and_docs(qtbot):
    form = SettingsForm(ExampleSettings)
    assert isinstance(form["epochs"], SpinBox)
    assert (form["epochs"].min, form["epochs"].max) == (1, 100)
    assert isinstance(form["learning_rate"], LineEdit)  # many decades: typed, not spun
    assert form["learning_rate"].value == "0.0001"
    assert isinstance(form["alpha"], FloatSpinBox) and form["alpha"].native.decimals() >= 3
    assert isinstance(form["loss"], ComboBox) and form["loss"].choices == ("mse", "dice")
    assert isinstance(form["balanced"], CheckBox)
    assert isinstance(form["prior"], LineEdit) and form["prior"].value == ""
    assert form["epochs"].tooltip.startswith("Passes over the data.")
    assert "Range: 1 to 100." in form["epochs"].tooltip
    assert "Choices: mse, dice." in form["loss"].tooltip
    assert form["epochs"].label == "epochs" and form["learning_rate"].label == "learning rate"


def test_values_are_typed_and_checked(qtbot):
    form = SettingsForm(ExampleSettings)
    assert form.values() == {
        "epochs": 10,
        "learning_rate": 1e-4,
        "alpha": 0.99,
        "loss": "mse",
        "balanced": False,
        "prior": None,
    }
    form.set_values({"alpha": 0.999, "learning_rate": 3e-5, "prior": (0.8, 0.2), "epochs": 3})
    values = form.values()
    assert values["alpha"] == pytest.approx(0.999) and values["learning_rate"] == 3e-5
    assert values["prior"] == (0.8, 0.2) and values["epochs"] == 3
    form["learning_rate"].value = "fast"
    with pytest.raises(SettingsError, match="learning_rate"):
        form.values()
    form["learning_rate"].value = "5"
    with pytest.raises(SettingsError, match="above the maximum"):
        form.values()


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_every_method_form_round_trips_its_defaults(qtbot, name):
    settings_class = available_methods()[name].Settings
    form = SettingsForm(settings_class)
    values = form.values()
    defaults = settings_class()
    shown = {f.name for f in dataclasses.fields(settings_class) if not f.metadata.get("hidden")}
    assert set(values) == shown  # every field but those the method does not use
    assert apply_overrides(defaults, values) == defaults


@dataclass
class RangeSettings:
    scale_range: tuple[float, float] = setting((0.9, 1.1), "Zoom range.", min=0.1, max=10.0)
    spacing: tuple[float, float] | None = setting(None, "In-plane spacing (mm).", min=0.0)


def test_typed_tuple_fields(qtbot):
    form = SettingsForm(RangeSettings)
    assert isinstance(form["scale_range"], LineEdit) and form["scale_range"].value == "0.9, 1.1"
    assert "2 numbers separated by commas." in form["scale_range"].tooltip
    assert "Range: 0.1 to 10." in form["scale_range"].tooltip
    assert form["spacing"].value == "" and "none" in form["spacing"].native.placeholderText()
    assert form.values() == {"scale_range": (0.9, 1.1), "spacing": None}
    form.set_values({"spacing": (1.0, 1.5)})
    assert form["spacing"].value == "1, 1.5"
    form["scale_range"].value = "(0.8, 1.25)"
    assert form.values() == {"scale_range": (0.8, 1.25), "spacing": (1.0, 1.5)}
    assert apply_overrides(RangeSettings(), form.values()).spacing == (1.0, 1.5)
    form["scale_range"].value = "0.8"
    with pytest.raises(SettingsError, match="expected 2"):
        form.values()
    form["scale_range"].value = ""
    with pytest.raises(SettingsError, match="a value is needed"):
        form.values()
