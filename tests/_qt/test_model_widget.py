"""The Model widget: open a bundle by file dialog or the demo button, show it, pick the device."""

from __future__ import annotations

from napari_uda._qt.model_widget import ModelWidget
from napari_uda._qt.state import get_state
from napari_uda.core.device import available_devices
from napari_uda.core.models import load_model


def test_demo_model_button_shows_the_model(docked, notifications):
    viewer, widgets = docked
    widget: ModelWidget = widgets["Model"]
    widget.demo_button.click()
    state = get_state(viewer)
    assert state.model is not None and state.model_source == "demo model"
    info = state.model.info()
    fields = {key: label.text() for key, label in widget.fields.items()}
    assert fields["classes"] == ", ".join(info.class_names)
    assert fields["spacing"] == " × ".join(f"{s:g}" for s in info.spacing) + " mm"
    assert fields["early_head"] == ("yes" if "early_head" in info.capabilities else "no")
    assert fields["source_pack"].startswith("yes (") == ("source_pack" in info.capabilities)
    assert not notifications["error"]


def test_file_dialog_loads_a_bundle(docked, tiny_bundle_path, group_norm_bundle_path, monkeypatch):
    viewer, widgets = docked
    widget: ModelWidget = widgets["Model"]
    monkeypatch.setattr(
        "napari_uda._qt.model_widget.QFileDialog.getOpenFileName",
        lambda *args, **kwargs: (str(group_norm_bundle_path), ""),
    )
    widget.open_button.click()
    state = get_state(viewer)
    assert state.model_source == str(group_norm_bundle_path)
    assert widget.fields["name"].text() == "groupnorm.safetensors"
    assert widget.fields["norm"].text() == "GroupNorm"
    assert widget.fields["early_head"].text() == "no"
    assert widget.fields["source_pack"].text() == "no"
    assert widget.fields["classes"].text() == "background, brain"
    assert widget.fields["spacing"].text() == "2 × 2 × 2 mm"
    # a second widget on the same viewer sees the same state
    other = ModelWidget(viewer)
    assert other.fields["norm"].text() == "GroupNorm"
    other.deleteLater()
    widget.load_path(tiny_bundle_path)
    assert widget.fields["norm"].text() == "BatchNorm"
    assert widget.fields["early_head"].text() == "yes"


def test_cancelled_dialog_and_bad_file_change_nothing(docked, tmp_path, notifications, monkeypatch):
    viewer, widgets = docked
    widget: ModelWidget = widgets["Model"]
    monkeypatch.setattr(
        "napari_uda._qt.model_widget.QFileDialog.getOpenFileName", lambda *a, **k: ("", "")
    )
    widget.open_button.click()
    assert get_state(viewer).model is None
    bad = tmp_path / "not_a_model.safetensors"
    bad.write_bytes(b"this is not a bundle")
    assert not widget.load_path(bad)
    assert get_state(viewer).model is None
    assert widget.fields["name"].text() == "—"
    [message] = notifications["error"]
    assert message.startswith("Cannot open the model:") and "not_a_model" in message
    assert "\n" not in message


def test_device_choice(docked, tiny_bundle_path):
    viewer, widgets = docked
    widget: ModelWidget = widgets["Model"]
    combo = widget.device_combo
    usable = set(available_devices())
    for index in range(combo.count()):
        device = combo.itemText(index)
        assert combo.model().item(index).isEnabled() == (device == "auto" or device in usable)
    state = get_state(viewer)
    assert state.device == "auto" and state.device_in_use == available_devices()[0]
    combo.setCurrentText("cpu")
    assert state.device == "cpu" and state.device_in_use == "cpu"
    assert "cpu" in widget.device_in_use.text()
    assert load_model(tiny_bundle_path).info().norm_type == "batch"


def test_threads_choice(docked):
    from napari_uda.core.threads import usable_cores

    viewer, widgets = docked
    combo = widgets["Model"].threads_combo
    items = [combo.itemText(index) for index in range(combo.count())]
    assert items == ["auto", *(str(n) for n in range(1, usable_cores() + 1))]
    state = get_state(viewer)
    assert state.threads == "auto"
    combo.setCurrentText("1")
    assert state.threads == "1"
    state.status = "running"
    assert not combo.isEnabled()


def test_named_model_menu_opens_deepbet_and_adapt_disables_what_cannot_apply(docked):
    from napari_uda.adaptation import available_methods
    from napari_uda.adaptation.plan import recommended_settings
    from napari_uda.core.models.registry import named_models

    viewer, widgets = docked
    widget: ModelWidget = widgets["Model"]
    actions = {action.text(): action for action in widget.named_button.menu().actions()}
    assert set(actions) == {model.name for model in named_models()}
    deepbet = next(model for model in named_models() if model.name == "deepbet")
    if not deepbet.available:
        assert not actions["deepbet"].isEnabled() and actions["deepbet"].toolTip()
        return
    actions["deepbet"].trigger()
    state = get_state(viewer)
    assert state.model_source == "deepbet"
    assert widget.fields["norm"].text() == "InstanceNorm (no affine)"
    assert widget.fields["spacing"].text() == "not fixed (set by the model)"
    combo = widgets["Adapt"].method_combo
    for name in ("tent", "adabn"):
        item = combo.model().item(combo.findData(name))
        assert not item.isEnabled()
        assert available_methods()[name].unmet_needs(state.model.capabilities)[0] in item.toolTip()
    assert combo.model().item(combo.currentIndex()).isEnabled()
    # the form starts from deepbet's measured settings (AdaEnt trains all parameters), marked
    adapt = widgets["Adapt"]
    combo.setCurrentIndex(combo.findData("adaent"))
    recommended = recommended_settings(state.model, available_methods()["adaent"])
    assert recommended["parameters"] == "all"
    values = adapt.form.values()
    assert all(values[name] == value for name, value in recommended.items())
    assert "paper default" in adapt.form["parameters"].tooltip


def test_folder_dialog_opens_an_nnunet_model(docked, tmp_path, notifications, monkeypatch):
    """ "Open model folder…" opens an nnU-Net v2 trained-model folder and shows its classes,
    spacing and normalisation; a folder that is not one is a one-line notification."""
    import pytest

    pytest.importorskip("dynamic_network_architectures")
    import torch

    from napari_uda.core.models.nnunet import NnUNetConfiguration, build_network
    from nnunet_factory import plans, write_folder

    plan = plans("3d_fullres", spacing=(6.0, 6.0, 6.0), patch=(24, 24, 24))
    config = NnUNetConfiguration.from_plans(plan, "3d_fullres", 1, "test plans")
    torch.manual_seed(0)
    weights = {0: build_network(config, 1, 2, "test plans").state_dict()}
    folder = write_folder(tmp_path, plan, "3d_fullres", weights)
    viewer, widgets = docked
    widget: ModelWidget = widgets["Model"]
    chosen = iter([str(folder), str(tmp_path)])
    monkeypatch.setattr(
        "napari_uda._qt.model_widget.QFileDialog.getExistingDirectory",
        lambda *a, **k: next(chosen),
    )
    widget.folder_button.click()
    assert get_state(viewer).model_source == str(folder)
    fields = {key: label.text() for key, label in widget.fields.items()}
    assert fields["name"] == "Dataset901_DemoHead (nnU-Net 3d_fullres, fold 0)"
    assert fields["classes"] == "background, brain"
    assert fields["spacing"] == "6 × 6 × 6 mm"
    assert fields["norm"] == "InstanceNorm (affine)"
    assert not notifications["error"]
    widget.folder_button.click()  # tmp_path holds no plans.json
    [message] = notifications["error"]
    assert "not an nnU-Net v2 trained-model folder" in message and "\n" not in message
    assert get_state(viewer).model_source == str(folder)  # the model stays
