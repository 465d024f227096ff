"""Live pyqtgraph plots of an adaptation run (loss, mean entropy, Dice against step), drawn in
napari's theme colours and updated as events arrive."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg
from napari.utils.theme import get_theme
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..adaptation.events import AdaptationEvent

#: Curve keys, their plot and their label.
CURVES = {
    "loss": ("loss", "total loss"),
    "entropy": ("entropy", "mean entropy"),
    "agreement": ("dice", "agreement Dice (label-free)"),
    "reference": ("dice", "Dice vs reference"),
}
PLOT_TITLES = {"loss": "Loss", "entropy": "Mean entropy", "dice": "Dice"}


class StepAxis(pg.AxisItem):
    """A bottom axis with ticks on whole steps only."""

    def tickValues(self, minVal, maxVal, size):
        levels = super().tickValues(minVal, maxVal, size)
        whole = [
            (max(spacing, 1.0), [v for v in values if float(v).is_integer()])
            for spacing, values in levels
        ]
        return [(spacing, values) for spacing, values in whole if values]


class LivePlots(QWidget):
    """Three stacked plots sharing the step axis. Feed events with :meth:`add_event`."""

    def __init__(self, theme: str = "dark", parent: QWidget | None = None):
        super().__init__(parent)
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setMinimumHeight(300)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.graphics)
        self.legend = QLabel()
        self.legend.setWordWrap(True)
        layout.addWidget(self.legend)
        self.plots: dict[str, pg.PlotItem] = {}
        for row, (key, title) in enumerate(PLOT_TITLES.items()):
            plot = self.graphics.addPlot(row=row, col=0, axisItems={"bottom": StepAxis("bottom")})
            plot.setLabel("left", title)
            plot.showGrid(x=True, y=True, alpha=0.25)
            plot.setMouseEnabled(x=False, y=False)
            plot.hideButtons()
            plot.getAxis("left").enableAutoSIPrefix(False)
            plot.getAxis("left").setWidth(62)
            if self.plots:
                plot.setXLink(self.plots["loss"])
            self.plots[key] = plot
        self.plots["dice"].setLabel("bottom", "step")
        self.plots["dice"].setYRange(0, 1, padding=0.05)
        self.plots["entropy"].setYRange(0, 1, padding=0.05)
        self.curves: dict[str, pg.PlotDataItem] = {}
        for key, (plot_key, label) in CURVES.items():
            self.curves[key] = self.plots[plot_key].plot([], [], name=label)
        self.data: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in CURVES}
        self.set_theme(theme)

    def set_theme(self, theme_name: str) -> None:
        """Use the colours of napari theme ``theme_name``."""
        try:
            theme = get_theme(theme_name)
        except ValueError:
            theme = get_theme("dark")
        text = theme.text.as_hex()
        self.graphics.setBackground(theme.background.as_hex())
        for plot in self.plots.values():
            for side in ("left", "bottom"):
                axis = plot.getAxis(side)
                axis.setPen(pg.mkPen(theme.secondary.as_hex()))
                axis.setTextPen(pg.mkPen(text))
        colours = {
            "loss": theme.current.as_hex() if theme.type == "dark" else "#2a4fa8",
            "entropy": theme.warning.as_hex() if theme.type == "dark" else "#a37f00",
            "agreement": text,
            "reference": "#ef6f5a" if theme.type == "dark" else "#c0392b",
        }
        dashed, solid = pg.QtCore.Qt.PenStyle.DashLine, pg.QtCore.Qt.PenStyle.SolidLine
        entries = []
        for key, curve in self.curves.items():
            style = dashed if key == "reference" else solid
            curve.setPen(pg.mkPen(colours[key], width=2, style=style))
            mark = "╍╍" if key == "reference" else "━━"
            entries.append(
                f'<span style="color:{colours[key]}">{mark}</span>&nbsp;{CURVES[key][1]}'
            )
        rows = [" &nbsp; ".join(entries[:2]), " &nbsp; ".join(entries[2:])]
        self.legend.setText("<br>".join(rows))

    def clear(self) -> None:
        """Forget every point (a new run starts)."""
        for key, curve in self.curves.items():
            self.data[key] = ([], [])
            curve.setData([], [])

    def _append(self, key: str, step: int, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        steps, values = self.data[key]
        steps.append(step)
        values.append(float(value))
        return True

    def add_event(self, event: AdaptationEvent) -> None:
        """Add one event's values and redraw (see :meth:`add_events`)."""
        self.add_events([event])

    def add_events(self, events: Sequence[AdaptationEvent]) -> None:
        """Add the values of ``events`` (in order), then redraw once.

        Each redraw repaints the plots, and with napari's OpenGL canvas in the window that
        means composing the whole window again, so a caller receiving many events should hand
        them over in batches.
        """
        changed: set[str] = set()
        for event in events:
            changed |= self._add(event)
        for key in changed:
            steps, values = self.data[key]
            self.curves[key].setData(np.asarray(steps), np.asarray(values))
        if events:
            last = events[-1].step
            first = 0 if self.points("entropy") and self.data["entropy"][0][0] == 0 else 1
            self.plots["loss"].setXRange(first, max(last, first + 1), padding=0.02)

    def _add(self, event: AdaptationEvent) -> set[str]:
        """Add one event's values to :attr:`data`; the keys of the curves that changed.

        The loss is plotted at every step. Entropy and Dice against the reference change only
        when the engine evaluates, so they are plotted at evaluated steps, from step 0 (the
        engine's first event, the unadapted model, which has no loss). The agreement Dice is
        plotted whenever it is new (every step for methods that measure it per step).
        """
        losses = event.losses or {}
        values = {"loss": losses.get("total", next(iter(losses.values()), None))}
        if event.evaluated:
            values["entropy"] = event.mean_entropy
            if event.reference_dice:
                values["reference"] = float(np.mean(event.reference_dice))
        previous = self.data["agreement"][1][-1] if self.points("agreement") else None
        if event.evaluated or event.agreement_dice != previous:
            values["agreement"] = event.agreement_dice
        return {key for key, value in values.items() if self._append(key, event.step, value)}

    def points(self, key: str) -> int:
        """How many points curve ``key`` has."""
        return len(self.data[key][0])
