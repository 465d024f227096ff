"""The *Corrections* part of the Adapt widget: the slices of ``segmentation (after)`` the user
corrected with napari's label tools, and the buttons of correct-then-adapt.

The panel follows the ``segmentation (after)`` layer between runs (never during one: a run
overwrites that layer): each ``paint`` event (brush, eraser, fill bucket, polygon) names the
slices it touched along the axis the viewer steps through; napari's undo and redo emit no event
of their own, so the touched slices are compared with the run's segmentation again shortly
after every redraw of the layer (and right after each paint event: napari announces an edit
before it writes it). What counts is decided by the headless
:class:`~napari_uda.corrected_slices.CorrectedSlices` in the shared state. The list shows each
slice with its plane (from the scan's orientation codes) and array axis; a double-click or
**Go to** moves the viewer there, **Un-mark** takes a slice out, **Mark this slice** counts the
slice on screen as checked without painting.
"""

from __future__ import annotations

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..corrected_slices import EDITED, KEPT, MARKED, SliceRef, plane_name, touched_slices
from .layers import after_segmentation, current_index, go_to_slice, stepping_axis

#: Milliseconds after a redraw of the layer before the touched slices are compared again.
RECHECK_MS = 250
#: How each origin reads in the list.
ORIGINS = {EDITED: "edited", MARKED: "marked as right", KEPT: "used in a round"}
HINT = (
    "Correct 'segmentation (after)' with the brush, eraser or fill bucket: each slice you "
    "edit counts, whole, as you leave it."
)
TOOLTIP = (
    "Slices count along the axis the viewer steps through (change it with napari's transpose "
    "or roll buttons). Undo and redo are followed. Un-mark: the slice no longer counts (its "
    "labels stay). Mark this slice: count the slice on screen although it needs no change."
)


class CorrectionsPanel(QWidget):
    """The corrected slices, where the viewer is, and the correct-then-adapt buttons (which the
    Adapt widget connects). ``changed`` is emitted when the list is shown again, ``edited``
    when the user's edits changed it."""

    changed = Signal()
    edited = Signal()

    def __init__(self, viewer, state, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.layer = None  # the segmentation (after) layer being followed
        self._recheck_timer = QTimer(self)
        self._recheck_timer.setSingleShot(True)
        self._recheck_timer.timeout.connect(self.recheck)
        self._build()
        self._connect()
        self._follow(after_segmentation(self.viewer))
        self.show_slices()

    @property
    def slices(self):
        return self.state.corrections

    @property
    def heading(self) -> str:
        """The panel's tab title: how many slices count."""
        return f"Corrections ({len(self.slices)})"

    # -- building -------------------------------------------------------------------------------
    def _build(self) -> None:
        hint = QLabel(HINT)
        hint.setWordWrap(True)
        hint.setToolTip(TOOLTIP)
        self.where = QLabel()
        self.where.setWordWrap(True)
        self.list = QListWidget()
        self.list.setMaximumHeight(96)
        self.list.setToolTip("Double-click a slice to go to it")
        self.list.itemDoubleClicked.connect(self._go_to_item)
        self.list.itemSelectionChanged.connect(self._update_list_buttons)
        self.go_button = _button("Go to", "Show the selected slice", self.go_to_selected)
        self.unmark_button = _button(
            "Un-mark", "The selected slice no longer counts (its labels stay)", self.unmark_selected
        )
        self.mark_button = _button(
            "Mark this slice",
            "Count the slice on screen as corrected although it needs no change",
            self.mark_current,
        )
        self.adapt_button = QPushButton("Adapt with corrections")
        self.round_method = QLabel()
        self.round_method.setWordWrap(True)
        self.rounds = QLabel()
        self.rounds.setWordWrap(True)
        self.back_button = _button(
            "Back one round",
            "Undo the latest round: its model is dropped; the segmentation and the corrected "
            "slices are as they were before it",
            None,
        )
        self.apply_button = _button(
            "Apply to other scans",
            "Segment the other open images with the current model; each is checked against "
            "the loaded model, with a warning where they disagree",
            None,
        )
        self._lay_out(hint)

    def _lay_out(self, hint: QLabel) -> None:
        list_buttons = QHBoxLayout()
        for button in (self.go_button, self.unmark_button, self.mark_button):
            list_buttons.addWidget(button)
        round_buttons = QHBoxLayout()
        for button in (self.adapt_button, self.back_button, self.apply_button):
            round_buttons.addWidget(button)
        layout = QVBoxLayout(self)
        for widget in (hint, self.where, self.list):
            layout.addWidget(widget)
        layout.addLayout(list_buttons)
        layout.addLayout(round_buttons)
        layout.addWidget(self.round_method)
        layout.addWidget(self.rounds)
        layout.addStretch(1)

    def _connect(self) -> None:
        self.viewer.layers.events.inserted.connect(self._layers_changed)
        self.viewer.layers.events.removed.connect(self._layers_changed)
        for event in (
            self.viewer.dims.events.order,
            self.viewer.dims.events.ndisplay,
            self.viewer.dims.events.current_step,
        ):
            event.connect(self.show_where)

    # -- following the layer --------------------------------------------------------------------
    def _layers_changed(self, *_args) -> None:
        layer = after_segmentation(self.viewer)
        if layer is not self.layer:
            self._follow(layer)

    def _follow(self, layer) -> None:
        if self.layer is not None:
            for event, slot in ((self.layer.events.paint, self._painted),
                                (self.layer.events.set_data, self._redrawn)):  # fmt: skip
                event.disconnect(slot)
        self.layer = layer
        if layer is not None:
            layer.events.paint.connect(self._painted)
            layer.events.set_data.connect(self._redrawn)
        elif len(self.slices):  # the layer is gone, and its corrections with it
            self.slices.reset(None)
        self.show_slices()

    def _tracking(self) -> bool:
        return self.layer is not None and not self.state.running

    def _painted(self, event) -> None:
        """The user edited the layer: the slices touched count if they now differ."""
        if not self._tracking():
            return
        view_axis = stepping_axis(self.viewer) if self.viewer.dims.ndisplay == 2 else None
        shape = self.layer.data.shape
        self.slices.touch(touched_slices(event.value, shape, view_axis), shape)
        self._recheck_timer.start(0)  # napari writes the edit after announcing it

    def _redrawn(self, *_args) -> None:
        if self._tracking() and self.slices.touched and not self._recheck_timer.isActive():
            self._recheck_timer.start(RECHECK_MS)

    def recheck(self) -> None:
        """Compare the touched slices again (after napari's undo or redo)."""
        if self._tracking() and self.slices.recheck(self.layer.data):
            self.show_slices()
            self.edited.emit()

    def start_from(self, labels, *, keep: bool) -> None:
        """A run ended showing ``labels``: later edits are compared with them. ``keep``: the
        corrected slices stay (the run kept them), else the list starts empty."""
        self._recheck_timer.stop()
        if keep:
            self.slices.rebase(labels)
        else:
            self.slices.reset(labels)
        self.show_slices()

    # -- showing --------------------------------------------------------------------------------
    def _axcodes(self):
        return self.layer.metadata.get("axcodes") if self.layer is not None else None

    def describe(self, ref: SliceRef) -> str:
        return f"{plane_name(ref.axis, self._axcodes())} {ref.index} (axis {ref.axis})"

    def show_slices(self) -> None:
        """Fill the list from the shared corrected slices."""
        selected = self._selected()
        self.list.clear()
        for ref in self.slices.slices:
            text = f"{self.describe(ref)} · {ORIGINS.get(self.slices.origins[ref], '')}"
            item = QListWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, ref)
            self.list.addItem(item)
            if ref == selected:
                item.setSelected(True)
        self.show_where()
        self._update_list_buttons()
        self.changed.emit()

    def show_where(self, *_args) -> None:
        """Which slice the viewer shows, and whether it counts."""
        if self.layer is None:
            self.where.setText("Run a model first: its 'segmentation (after)' is what you correct.")
            return
        ref = self.current_slice()
        plane = plane_name(ref.axis, self._axcodes())
        counts = "corrected ✓" if ref in self.slices else "not corrected"
        view = "" if self.viewer.dims.ndisplay == 2 else " (3D view: edits count along it)"
        self.where.setText(
            f"Painting on <b>{plane}</b> slices (axis {ref.axis}){view}; this slice, "
            f"{ref.index}: {counts}"
        )

    def current_slice(self) -> SliceRef:
        axis = stepping_axis(self.viewer)
        return SliceRef(axis, current_index(self.viewer, self.layer, axis))

    def update_buttons(self, problem: str, method_title: str = "", applying: bool = False) -> None:
        """Enable the round buttons: ``problem`` says why a round cannot start ("" if it
        can); ``method_title`` is what a round learns from; ``applying``: other scans are being
        segmented."""
        running = self.state.running
        rounds = self.state.rounds
        self.adapt_button.setEnabled(not problem and not running)
        self.adapt_button.setToolTip(problem or "One round: adapt the current model to your slices")
        self.round_method.setText(f"A round learns from {method_title}." if method_title else "")
        self.back_button.setEnabled(len(rounds) > 1 and not running)
        self.apply_button.setEnabled(rounds.current is not None and not running and not applying)
        self.apply_button.setText("Applying…" if applying else "Apply to other scans")
        current = rounds.current
        if current is None:
            self.rounds.setText("Rounds: none yet (Run first).")
        elif current.number == 0:
            self.rounds.setText(f"Round 0: the first run ({current.result.method}).")
        else:
            used = len(current.start_slices) if current.start_slices is not None else 0
            self.rounds.setText(
                f"Round {current.number} ({current.result.method}, {used} corrected "
                f"slice{'s' * (used != 1)})."
            )
        self._update_list_buttons()

    def _update_list_buttons(self) -> None:
        chosen = self._selected() is not None
        self.go_button.setEnabled(chosen)
        self.unmark_button.setEnabled(chosen and not self.state.running)
        self.mark_button.setEnabled(self._tracking())

    # -- list actions ---------------------------------------------------------------------------
    def _selected(self) -> SliceRef | None:
        items = self.list.selectedItems()
        return items[0].data(Qt.ItemDataRole.UserRole) if items else None

    def _go_to_item(self, item: QListWidgetItem) -> None:
        self.go_to(item.data(Qt.ItemDataRole.UserRole))

    def go_to(self, ref: SliceRef) -> None:
        """Move the viewer to slice ``ref`` (stepping along its axis)."""
        if self.layer is not None:
            go_to_slice(self.viewer, self.layer, ref.axis, ref.index)

    def go_to_selected(self) -> None:
        ref = self._selected()
        if ref is not None:
            self.go_to(ref)

    def unmark_selected(self) -> None:
        ref = self._selected()
        if ref is not None and not self.state.running:
            self.slices.unmark(ref)
            self.show_slices()

    def mark_current(self) -> None:
        if self._tracking():
            self.slices.mark(self.current_slice())
            self.show_slices()
            self.edited.emit()


def _button(text: str, tooltip: str, slot=None) -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tooltip)
    if slot is not None:
        button.clicked.connect(slot)
    return button
