"""The *QA* dock widget: a sortable per-slice table of the last run (entropy, voxels changed by
the adaptation, Dice against a reference) whose rows move the viewer to their slice, and the
volume of each class before and after."""

from __future__ import annotations

import math

import numpy as np
from magicgui.widgets import ComboBox
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFormLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.metrics import volume_ml
from ..core.plausibility import flag_lines, parse_expected_volumes, volume_flags
from .layers import (
    ENTROPY_AFTER,
    ENTROPY_BEFORE,
    SEGMENTATION_AFTER,
    SEGMENTATION_BEFORE,
    go_to_slice,
    stepping_axis,
)
from .slice_stats import SliceTable, slice_table
from .state import get_state

NO_RESULT = "Run an adaptation (Adapt widget) to see per-slice QA."
#: Shown with the entropy columns: low entropy is not correctness.
ENTROPY_NOTE = (
    "Entropy is the model's uncertainty, not an error map: a confidently wrong voxel has low "
    "entropy (models often fail on a new scanner with confidence). Check the mask itself."
)
#: Style of the loud line about implausible volumes.
LOUD = "color: #e8590c; font-weight: bold;"


class NumberItem(QTableWidgetItem):
    """A table cell showing ``text`` that sorts by ``value`` (NaN last)."""

    def __init__(self, value: float, text: str):
        super().__init__(text)
        self.value = value
        self.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
        self.setFlags(self.flags() & ~Qt.ItemFlag.ItemIsEditable)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        mine, theirs = self.value, getattr(other, "value", math.nan)
        if math.isnan(mine) or math.isnan(theirs):
            return not math.isnan(mine) and math.isnan(theirs)
        return mine < theirs


def _cell(value: float, fmt: str) -> NumberItem:
    return NumberItem(float(value), "—" if math.isnan(value) else format(value, fmt))


class QAWidget(QWidget):
    """Per-slice QA of the last run, computed from the result layers in the viewer."""

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.slices: SliceTable | None = None

        self.reference = ComboBox(
            choices=self._reference_choices,
            nullable=True,
            tooltip="Reference mask for per-slice Dice (QA only)",
        )
        self.reference.changed.connect(self.refresh)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("Recompute from the current before/after layers")
        self.refresh_button.clicked.connect(self.refresh)
        form = QFormLayout()
        form.addRow("Reference", self.reference.native)

        self.table = QTableWidget(0, 0)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.cellClicked.connect(self.go_to_row)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.summary = QTableWidget(0, 0)
        self.summary.verticalHeader().setVisible(False)
        self.summary.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.summary.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.summary.verticalHeader().setDefaultSectionSize(22)
        self.message = QLabel(NO_RESULT)
        self.message.setWordWrap(True)
        self.flags = QLabel()
        self.flags.setWordWrap(True)
        self.flags.setStyleSheet(LOUD)
        self.flags.setVisible(False)
        self.entropy_note = QLabel(ENTROPY_NOTE)
        self.entropy_note.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.message)
        layout.addWidget(QLabel("Volume per class (ml)"))
        layout.addWidget(self.summary)
        layout.addWidget(self.flags)
        layout.addWidget(QLabel("Per slice (click a row to go to the slice)"))
        layout.addWidget(self.entropy_note)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.refresh_button)

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.reset_choices)
        self.viewer.dims.events.order.connect(self.refresh)
        self.state.events.result.connect(self._new_result)
        self.refresh()

    def _reference_choices(self, _widget=None):
        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Labels)
            and layer.name not in (SEGMENTATION_BEFORE, SEGMENTATION_AFTER)
        ]

    def reset_choices(self, *_args) -> None:
        self.reference.reset_choices()

    def _new_result(self, result) -> None:
        name = self.state.reference_layer
        if name and name in self.viewer.layers:
            self.reference.value = self.viewer.layers[name]
        self.refresh()

    # -- computing ----------------------------------------------------------------------------
    def slice_axis(self) -> int:
        """Array axis of the result layers that the viewer currently steps through."""
        return stepping_axis(self.viewer)

    def _layer(self, name: str, kind):
        layer = self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401
        return layer if isinstance(layer, kind) else None

    def refresh(self, *_args) -> None:
        """Recompute the tables from the before/after layers (and the reference, if any)."""
        layers = [
            self._layer(SEGMENTATION_BEFORE, Labels),
            self._layer(SEGMENTATION_AFTER, Labels),
            self._layer(ENTROPY_BEFORE, Image),
            self._layer(ENTROPY_AFTER, Image),
        ]
        if any(layer is None for layer in layers) or layers[0].data.ndim != 3:
            self.slices = None
            self._fill_table()
            self.summary.setRowCount(0)
            self._show_flags([])
            self._say(NO_RESULT)
            return
        before, after, entropy_before, entropy_after = (np.asarray(x.data) for x in layers)
        reference = self.reference.value
        ref = np.asarray(reference.data) if reference is not None else None
        if ref is not None and ref.shape != after.shape:
            self._say(
                f"The reference {ref.shape} does not match the result {after.shape}; "
                "Dice is not shown."
            )
            ref = None
        else:
            self._say("")
        classes = self._class_names(before, after)
        self.slices = slice_table(
            before,
            after,
            entropy_before,
            entropy_after,
            self.slice_axis(),
            reference=ref,
            num_classes=len(classes),
        )
        self._fill_table()
        self._fill_summary(before, after, ref, classes, tuple(layers[1].scale))

    def _say(self, text: str) -> None:
        self.message.setText(text)
        self.message.setVisible(bool(text))

    def _class_names(self, *labels: np.ndarray) -> list[str]:
        model = self.state.result.model if self.state.result is not None else self.state.model
        if model is not None:
            return list(model.class_names)
        top = max(int(x.max()) for x in labels)
        return ["background"] + [f"class {i}" for i in range(1, max(top, 1) + 1)]

    # -- showing ------------------------------------------------------------------------------
    def _fill_table(self) -> None:
        self.table.setSortingEnabled(False)
        self.table.clearContents()
        table = self.slices
        if table is None:
            self.table.setRowCount(0)
            self.table.setColumnCount(0)
            return
        columns = [
            ("Slice", np.arange(len(table)), "d"),
            ("Entropy\nbefore", table.entropy_before, ".3f"),
            ("Entropy\nafter", table.entropy_after, ".3f"),
            ("Changed\nvoxels", table.changed, "d"),
        ]
        if table.dice_after is not None:
            columns += [
                ("Dice\nbefore", table.dice_before, ".3f"),
                ("Dice\nafter", table.dice_after, ".3f"),
            ]
        self.table.setColumnCount(len(columns))
        self.table.setRowCount(len(table))
        self.table.setHorizontalHeaderLabels([title for title, _, _ in columns])
        for column, (_, values, fmt) in enumerate(columns):
            for row, value in enumerate(values):
                value = int(value) if fmt == "d" else float(value)
                self.table.setItem(
                    row, column, _cell(value, fmt) if fmt != "d" else NumberItem(value, str(value))
                )
        self.table.setSortingEnabled(True)

    def expected_volumes(self) -> dict[str, tuple[float, float]]:
        """The ranges the last run was gated with, else the model's own (class -> ml)."""
        result = self.state.result
        if result is not None and result.gate is not None:
            return parse_expected_volumes(result.gate.expected_ml)
        model = self.state.model
        try:
            return model.expected_volumes() if model is not None else {}
        except ValueError:
            return {}

    def _show_flags(self, lines: list[str]) -> None:
        """Loud lines about volumes outside their expected range, and the gate's decision
        when it rolled back or the user overruled it."""
        result = self.state.result
        gate = result.gate if result is not None else None
        if gate is not None and (gate.rolled_back or gate.overruled):
            lines = [f"Gate: {gate.summary}", *lines]
        self.flags.setText("\n".join(f"⚠ {line}" for line in lines))
        self.flags.setVisible(bool(lines))

    def _fill_summary(self, before, after, reference, classes, spacing) -> None:
        count = len(classes)

        def named(volumes: dict[int, float]) -> dict[str, float]:
            return {classes[label]: value for label, value in volumes.items()}

        volumes = [volume_ml(before, spacing, count), volume_ml(after, spacing, count)]
        headers = ["Class", "Before", "After", "Change"]
        if reference is not None:
            volumes.append(volume_ml(reference, spacing, count))
            headers.append("Reference")
        self.summary.setColumnCount(len(headers))
        self.summary.setRowCount(count - 1)
        self.summary.setHorizontalHeaderLabels(headers)
        for row, label in enumerate(range(1, count)):
            first, last = volumes[0][label], volumes[1][label]
            change = (last - first) / first * 100 if first else math.nan
            cells = [
                QTableWidgetItem(classes[label]),
                _cell(first, ".1f"),
                _cell(last, ".1f"),
                NumberItem(change, "—" if math.isnan(change) else f"{change:+.1f} %"),
            ]
            if reference is not None:
                cells.append(_cell(volumes[2][label], ".1f"))
            for column, cell in enumerate(cells):
                self.summary.setItem(row, column, cell)
        self._show_flags(
            flag_lines(volume_flags(named(volumes[0]), self.expected_volumes()), "before")
            + flag_lines(volume_flags(named(volumes[1]), self.expected_volumes()), "after")
        )
        header = self.summary.horizontalHeader().sizeHint().height()
        rows = self.summary.verticalHeader().defaultSectionSize() * (count - 1)
        self.summary.setFixedHeight(header + rows + 2 * self.summary.frameWidth())

    def go_to_row(self, row: int, _column: int = 0) -> None:
        """Move the viewer to the slice shown in table row ``row``."""
        item = self.table.item(row, 0)
        layer = self._layer(SEGMENTATION_AFTER, Labels)
        if item is None or layer is None or self.slices is None:
            return
        go_to_slice(self.viewer, layer, self.slices.axis, int(item.value))
