"""The *Model* dock widget: open a model (file dialog or the shipped demo model), show what it
is, and choose the device and the number of CPU threads."""

from __future__ import annotations

import re
from pathlib import Path

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMenu,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core.device import available_devices, resolve_device
from ..core.models import load_model
from ..core.models.registry import named_models
from ..core.threads import AUTO, usable_cores
from .state import get_state

DEVICES = ("auto", "cpu", "cuda", "mps")
NORM_NAMES = {"batch": "BatchNorm", "group": "GroupNorm", "instance": "InstanceNorm"}
MODEL_FILTER = (
    "Models (*.safetensors *.pt *.pth *.ts *.torchscript *.json);;"
    "napari-uda bundles (*.safetensors);;TorchScript with a JSON spec (*.pt *.pth *.ts "
    "*.torchscript *.json);;All files (*)"
)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


class ModelWidget(QWidget):
    """Open a model and pick the device; the choice goes into the viewer's shared state."""

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)

        self.open_button = QPushButton("Open model…")
        self.open_button.setToolTip(
            "Open a model file: a napari-uda bundle (.safetensors) or TorchScript (.pt + .json)"
        )
        self.open_button.clicked.connect(self._choose_file)
        self.folder_button = QPushButton("Open model folder…")
        self.folder_button.setToolTip(
            "Open a model folder: an nnU-Net v2 trained model "
            "(Dataset123_X/nnUNetTrainer__nnUNetPlans__3d_fullres) or a MONAI bundle"
        )
        self.folder_button.clicked.connect(self._choose_folder)
        self.demo_button = QPushButton("Demo model")
        self.demo_button.setToolTip(
            "The shipped brain-extraction U-Net, trained on the demo's source scanner only"
        )
        self.demo_button.clicked.connect(self.load_demo)
        self.named_button = QPushButton("Named model")
        self.named_button.setToolTip("Models that open by name, such as deepbet")
        self.named_button.setMenu(self._named_models_menu())
        buttons = QHBoxLayout()
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.folder_button)
        more_buttons = QHBoxLayout()
        more_buttons.addWidget(self.demo_button)
        more_buttons.addWidget(self.named_button)

        self.fields: dict[str, QLabel] = {}
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for key, label in (
            ("name", "Model"),
            ("classes", "Classes"),
            ("spacing", "Spacing"),
            ("norm", "Normalisation"),
            ("early_head", "Early head"),
            ("source_pack", "Source pack"),
            ("source_statistics", "Source statistics"),
        ):
            value = QLabel("—")
            value.setWordWrap(True)
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.fields[key] = value
            form.addRow(label, value)

        self.device_combo = QComboBox()
        usable = set(available_devices())
        for index, device in enumerate(DEVICES):
            self.device_combo.addItem(device)
            if device != "auto" and device not in usable:
                item = self.device_combo.model().item(index)
                item.setEnabled(False)
                item.setToolTip(f"{device} is not available on this machine")
        self.device_combo.setCurrentText(self.state.device)
        self.device_combo.currentTextChanged.connect(self._set_device)
        self.device_in_use = QLabel()
        device_row = QHBoxLayout()
        device_row.addWidget(self.device_combo)
        device_row.addWidget(self.device_in_use, 1)
        form.addRow("Device", device_row)
        form.addRow("CPU threads", self._threads_row())

        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addLayout(more_buttons)
        layout.addLayout(form)
        layout.addStretch(1)

        self.state.events.model.connect(self._show_model)
        self.state.events.status.connect(self._show_status)
        self._set_device(self.state.device)
        self._show_model(self.state.model)

    def _threads_row(self) -> QHBoxLayout:
        """``auto`` (the cores free when a run starts, or OMP_NUM_THREADS) or 1 .. cores."""
        self.threads_combo = QComboBox()
        self.threads_combo.addItems([AUTO, *(str(n) for n in range(1, usable_cores() + 1))])
        self.threads_combo.setToolTip(
            "PyTorch threads on the CPU. auto: OMP_NUM_THREADS if set, else the cores free when "
            "a run starts (on a busy workstation fewer threads are faster)."
        )
        self.threads_combo.setCurrentText(str(self.state.threads))
        self.threads_combo.currentTextChanged.connect(self._set_threads)
        row = QHBoxLayout()
        row.addWidget(self.threads_combo)
        row.addWidget(QLabel("auto: the cores free when a run starts"), 1)
        return row

    def _set_threads(self, choice: str) -> None:
        self.state.threads = choice

    # -- actions ---------------------------------------------------------------------------
    def _named_models_menu(self) -> QMenu:
        menu = QMenu(self)
        menu.setToolTipsVisible(True)
        for model in named_models():
            action = menu.addAction(model.name)
            action.setEnabled(model.available)
            action.setToolTip(model.description if model.available else model.reason)
            action.triggered.connect(lambda _=False, name=model.name: self.load_path(name))
        if menu.isEmpty():
            menu.addAction("none installed").setEnabled(False)
        return menu

    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open model", "", MODEL_FILTER)
        if path:
            self.load_path(path)

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(
            self, "Open model folder (nnU-Net v2 or MONAI bundle)", ""
        )
        if path:
            self.load_path(path)

    def load_path(self, path: str | Path, source: str | None = None) -> bool:
        """Load the model at ``path`` (or a named model such as ``"deepbet"``) into the shared
        state; errors become a notification."""
        if self.state.running:
            show_error("A run is in progress; stop it before changing the model.")
            return False
        try:
            model = load_model(path)
        except (ValueError, OSError) as error:
            show_error(f"Cannot open the model: {error}")
            return False
        self.state.model_source = source or str(path)
        self.state.model = model
        show_info(f"Model loaded: {model.info().name}")
        return True

    def load_demo(self) -> bool:
        """Load the demo model shipped with napari-uda."""
        from .._sample_data import demo_path

        try:
            path = demo_path("model")
        except (ImportError, KeyError, AttributeError, OSError) as error:
            show_error(f"The demo model is not available: {error}")
            return False
        return self.load_path(path, source="demo model")

    def _set_device(self, choice: str) -> None:
        try:
            in_use = str(resolve_device(choice))
        except ValueError as error:
            show_error(str(error))
            self.device_combo.setCurrentText("auto")
            return
        self.state.device = choice
        self.state.device_in_use = in_use
        self.device_in_use.setText(f"in use: <b>{in_use}</b>")

    # -- display ---------------------------------------------------------------------------
    def _show_model(self, model) -> None:
        if model is None:
            for label in self.fields.values():
                label.setText("—")
            return
        info = model.info()
        caps = info.capabilities
        pack = info.details.get("source_pack_slices", 0)
        spacing = (
            " × ".join(f"{s:g}" for s in info.spacing) + " mm"
            if info.spacing
            else "not fixed (set by the model)"
        )
        self.fields["name"].setText(info.name)
        self.fields["name"].setToolTip(self.state.model_source)
        self.fields["classes"].setText(", ".join(info.class_names))
        self.fields["spacing"].setText(spacing)
        norm = info.norm_type  # "batch", "group", "instance (affine)", "batch/instance (...)"
        for kind, name in NORM_NAMES.items():
            norm = re.sub(rf"\b{kind}\b", name, norm)
        self.fields["norm"].setText(norm)
        self.fields["early_head"].setText(_yes_no("early_head" in caps))
        self.fields["source_pack"].setText(
            f"yes ({pack} labelled slices)" if "source_pack" in caps else "no"
        )
        self.fields["source_statistics"].setText(_yes_no("source_statistics" in caps))

    def _show_status(self, status: str) -> None:
        busy = self.state.running
        widgets = (
            self.open_button,
            self.folder_button,
            self.demo_button,
            self.named_button,
            self.device_combo,
        )
        for widget in (*widgets, self.threads_combo):
            widget.setEnabled(not busy)
