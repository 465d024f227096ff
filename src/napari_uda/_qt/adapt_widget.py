"""The *Adapt* dock widget: pick the target image, a method and its settings, run and stop the
adaptation (in a separate process by default, relayed by a napari thread worker; see
:mod:`napari_uda._qt.runner`), and watch live plots and the before/after layers."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import ComboBox, LineEdit, SpinBox
from napari.layers import Image, Labels
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..adaptation.base import available_methods
from ..adaptation.events import AdaptationEvent, AdaptationResult
from ..adaptation.gate import overrule_gate
from ..adaptation.plan import plan_run, recommended_settings
from ..adaptation.rounds import corrected_prediction
from ..core.plausibility import PlausibilitySettings, parse_expected_volumes
from ..settings import SettingsError, describe, settings_to_dict
from .corrections_panel import CorrectionsPanel
from .forms import SettingsForm
from .gui_queue import GuiQueue
from .layers import (
    ENTROPY_AFTER,
    RESULT_LAYERS,
    SEGMENTATION_AFTER,
    after_segmentation,
    layer_volume,
    prediction_updates,
    show_entropy,
    show_labels,
    show_prediction,
)
from .other_scans import OtherScans
from .plots import LivePlots
from .runner import AdaptationRunner, RunFailure, RunRequest, StartingPoint
from .state import RunStatus, get_state

#: Milliseconds between refreshes of the plots and the status line during a run. Events are
#: gathered in between: every repaint of a widget makes Qt compose the whole window again (the
#: window holds napari's OpenGL canvas), about 35 ms of CPU with software OpenGL, taken from
#: training (docs/responsiveness.md).
REFRESH_MS = 1000
#: Methods offered first when the model allows them.
PREFERRED_METHODS = ("tent", "adaent", "udas")


#: Tallest the settings form gets before it scrolls (pixels).
SETTINGS_MAX_HEIGHT = 150


def settings_scroll(box: QGroupBox) -> QScrollArea:
    """A frameless scroll area filling ``box``, for a settings form of any length."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    inner = QWidget()
    inner.setLayout(QVBoxLayout())
    inner.layout().setContentsMargins(0, 0, 0, 0)
    scroll.setWidget(inner)
    box.setLayout(QVBoxLayout())
    box.layout().addWidget(scroll)
    return scroll


#: Tallest the status line gets before it scrolls (pixels): a round's warnings can be long.
STATUS_MAX_HEIGHT = 64
#: The button under the status after the gate rolled a run back.
OVERRULE_TEXT = "Use the adapted result anyway"
OVERRULE_TIP = (
    "The gate kept your unadapted model because adaptation did not look better by its "
    "label-free signals. If the adapted mask looks better to you (compare the 'before' and "
    "'after' layers of the last run), keep it anyway: the after layers, QA, Export and the "
    "report then use the adapted model, and the report says you overruled the gate."
)
#: The status's first line once the user used the adapted result anyway.
OVERRULED = "You kept the adapted result against the gate's advice (the gate's view below)."


def capped(label: QLabel, height: int) -> QScrollArea:
    """``label`` in a frameless scroll area at most ``height`` pixels tall."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(label)
    scroll.setMaximumHeight(height)
    return scroll


def fit_height(scroll: QScrollArea, content: QWidget) -> None:
    """``scroll`` as tall as ``content`` up to :data:`SETTINGS_MAX_HEIGHT`, then it scrolls."""
    height = min(content.sizeHint().height() + 2, SETTINGS_MAX_HEIGHT)
    scroll.setMinimumHeight(height)
    scroll.setMaximumHeight(height)


def status_lines(summary: str, gate) -> list[str]:
    """The status after a run: its ``summary`` and the gate's decision with a ``⚠`` line per
    warning. After a roll-back the decision comes first; after the user overruled the gate,
    :data:`OVERRULED` and the adapted mask's warnings (the status shows about four lines before
    it scrolls)."""
    if gate is None:
        return [summary]
    warnings = [f"⚠ {line}" for line in gate.warnings]
    if gate.overruled:
        return [OVERRULED, *warnings, f"Gate: {gate.summary}", summary]
    if gate.rolled_back:
        return [f"Gate: {gate.summary}", *warnings, summary]
    return [f"{summary}. Gate: {gate.summary}", *warnings]


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class AdaptWidget(QWidget):
    """Run one adaptation at a time on the chosen target image layer."""

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.methods = available_methods()
        self.form: SettingsForm | None = None
        self._form_key: tuple | None = None  # (settings class, model's recommendations)
        self._progress: progress | None = None
        #: run the engine in a separate process (see :class:`RunRequest`)
        self.separate_process = True
        self.updates = GuiQueue(self)
        self._pending: list[AdaptationEvent] = []  # events not yet plotted
        #: corrections the running run keeps in its mask (int16, -1 elsewhere), or None
        self._keep = None
        #: (labels, corrected slices) when the running round started; None: not a round
        self._round_start = None
        #: the newest event received from the worker (plotted at the next refresh)
        self.last_event: AdaptationEvent | None = None
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(REFRESH_MS)
        self._refresh_timer.timeout.connect(self._refresh)
        self.runner = AdaptationRunner(self._on_yield, self._on_return, self._on_shutdown)

        self._make_inputs()
        self._make_buttons_and_panels()
        self._lay_out()
        self._connect_viewer()
        self._connect_corrections()
        self._fill_methods()
        self._update_buttons()

    def _make_inputs(self) -> None:
        """The target, reference, method and run options."""
        self.target = ComboBox(choices=self._layers_of(Image), tooltip="The scan to adapt to")
        self.reference = ComboBox(
            choices=self._layers_of(Labels),
            nullable=True,
            tooltip="Optional reference mask, used only to plot Dice for QA (never to train)",
        )
        self.method_combo = QComboBox()
        self.method_combo.currentIndexChanged.connect(self._method_changed)
        self.method_summary = QLabel()
        self.method_summary.setWordWrap(True)
        self.preview_every = SpinBox(
            value=10,
            min=0,
            max=100_000,
            tooltip="Every N steps, predict the whole volume to update entropy, Dice, the "
            "collapse guard and the 'after' layers (0: once per epoch, as the CLI does).",
        )
        self.seed = SpinBox(value=0, min=0, max=2**31 - 1, tooltip="Random seed of the run")
        [volume_spec] = describe(PlausibilitySettings)
        self.expected_volume = LineEdit(value="", tooltip=volume_spec.help)
        self.expected_volume.native.setPlaceholderText("e.g. brain=1000:1800 (model's range)")

    def _make_buttons_and_panels(self) -> None:
        """Run and Stop, the status line, the live plots and the Corrections panel."""
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step; the layers keep the result")
        self.stop_button.clicked.connect(self.stop)
        self.status = QLabel("Open a model, choose a target image, press Run.")
        self.status.setWordWrap(True)
        self.overrule_button = QPushButton(OVERRULE_TEXT)
        self.overrule_button.setToolTip(OVERRULE_TIP)
        self.overrule_button.clicked.connect(self.use_adapted_result)
        self.overrule_button.setVisible(False)
        self.plots = LivePlots(str(self.viewer.theme))
        self.corrections = CorrectionsPanel(self.viewer, self.state)
        self.other_scans = OtherScans(self.viewer, self.state, self._update_buttons)

    def _lay_out(self) -> None:
        """Target and method on top, then settings, run options, buttons, status and tabs."""
        top = QFormLayout()
        top.addRow("Target image", self.target.native)
        top.addRow("Method", self.method_combo)
        top.addRow(self.method_summary)
        self.settings_box = QGroupBox("Settings")
        self.settings_scroll = settings_scroll(self.settings_box)
        bottom = QFormLayout()
        bottom.addRow("Reference (QA)", self.reference.native)
        bottom.addRow("Refresh every (steps)", self.preview_every.native)
        bottom.addRow("Seed", self.seed.native)
        bottom.addRow("Expected volume (ml)", self.expected_volume.native)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.settings_box)
        layout.addLayout(bottom)
        layout.addLayout(buttons)
        layout.addWidget(capped(self.status, STATUS_MAX_HEIGHT))
        layout.addWidget(self.overrule_button)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.plots, "Plots")
        self.tabs.addTab(self.corrections, self.corrections.heading)
        layout.addWidget(self.tabs, 1)

    def _connect_viewer(self) -> None:
        """Follow the viewer's layers and theme, the loaded model and the run status."""
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.reset_choices)
        self.viewer.events.theme.connect(self._theme_changed)
        self.state.events.model.connect(self._fill_methods)
        self.state.events.status.connect(self._update_buttons)

    def _connect_corrections(self) -> None:
        panel = self.corrections
        panel.adapt_button.clicked.connect(self.adapt_with_corrections)
        panel.back_button.clicked.connect(self.back_one_round)
        panel.apply_button.clicked.connect(self.other_scans.start)
        panel.changed.connect(self._update_buttons)
        panel.edited.connect(lambda: self.tabs.setCurrentWidget(self.corrections))
        self.state.events.status.connect(self._show_plots)

    def _show_plots(self, status) -> None:
        """The plots come to the front when a run starts (the corrections when the user edits
        the segmentation)."""
        if status == RunStatus.RUNNING:
            self.tabs.setCurrentWidget(self.plots)

    def _theme_changed(self, event) -> None:
        self.plots.set_theme(str(event.value))

    # -- choices ------------------------------------------------------------------------------
    def _layers_of(self, kind):
        """Choices of layers of ``kind``, leaving out the result layers this widget makes."""

        def choices(_widget=None):
            return [
                (layer.name, layer)
                for layer in self.viewer.layers
                if isinstance(layer, kind) and layer.name not in RESULT_LAYERS
            ]

        return choices

    def reset_choices(self, *_args) -> None:
        """Refresh the layer choices (napari calls this when layers change)."""
        self.target.reset_choices()
        self.reference.reset_choices()
        self._update_buttons()

    def _fill_methods(self, *_args) -> None:
        model = self.state.model
        capabilities = model.capabilities if model is not None else None
        current = self.method_combo.currentData()
        self.method_combo.blockSignals(True)
        self.method_combo.clear()
        for index, (name, method) in enumerate(self.methods.items()):
            self.method_combo.addItem(getattr(method, "title", name) or name, name)
            item = self.method_combo.model().item(index)
            reasons = method.unmet_needs(capabilities) if capabilities is not None else []
            item.setEnabled(not reasons)
            tip = "Not for this model: " + "; ".join(reasons) if reasons else method.summary
            item.setData(tip, Qt.ItemDataRole.ToolTipRole)
        self.method_combo.blockSignals(False)
        usable = [
            self.method_combo.itemData(i)
            for i in range(self.method_combo.count())
            if self.method_combo.model().item(i).isEnabled()
        ]
        preferred = [current, *PREFERRED_METHODS, *usable]
        choice = next((name for name in preferred if name in usable), None)
        if choice is not None:
            self.method_combo.setCurrentIndex(self.method_combo.findData(choice))
        self._method_changed()
        self._update_buttons()

    def _method_changed(self, *_args) -> None:
        name = self.method_combo.currentData()
        if name is None:
            return
        method = self.methods[name]
        model = self.state.model
        recommended = recommended_settings(model, method) if model is not None else {}
        if self.form is not None and self._form_key == (method.Settings, repr(recommended)):
            return
        self._form_key = (method.Settings, repr(recommended))
        self.method_summary.setText(method.summary)
        self.method_summary.setToolTip(method.reference)
        if self.form is not None:
            self.settings_scroll.widget().layout().removeWidget(self.form.native)
            self.form.native.deleteLater()
        self.form = SettingsForm(method.Settings)
        if recommended:  # e.g. deepbet trains its first blocks: the model's measured choice
            self.form.recommend(recommended)
        self.settings_scroll.widget().layout().addWidget(self.form.native)
        fit_height(self.settings_scroll, self.form.native)
        self._update_buttons()

    def _update_buttons(self, *_args) -> None:
        running = self.state.running
        ready = self.state.model is not None and self.target.value is not None
        self.run_button.setEnabled(ready and not running)
        self.run_button.setToolTip("" if ready else "Open a model and an image first")
        self.stop_button.setEnabled(self.state.status == RunStatus.RUNNING)
        for widget in (
            self.target,
            self.reference,
            self.preview_every,
            self.seed,
            self.expected_volume,
        ):
            widget.enabled = not running
        self.method_combo.setEnabled(not running)
        if self.form is not None:
            self.form.enabled = not running
        method = self.methods.get(self.method_combo.currentData())
        if ready and getattr(method, "needs_corrections", False):
            self.run_button.setEnabled(False)
            self.run_button.setToolTip("This method learns from corrected slices only")
        self.tabs.setTabText(self.tabs.indexOf(self.corrections), self.corrections.heading)
        problem = self._round_problem(after_segmentation(self.viewer))
        title = getattr(method, "title", "") or self.method_combo.currentText()
        only = getattr(method, "needs_corrections", False)
        self.corrections.update_buttons(
            problem if ready else "Open a model and an image first",
            "your corrections only" if only else f"your corrections + {title}",
            applying=self.other_scans.busy,
        )

    # -- running ------------------------------------------------------------------------------
    def run(self) -> None:
        """Adapt the loaded model with the current choices: a new start (round 0; slices
        already corrected on this scan stay in the mask). Errors become notifications."""
        self._round_start = None
        self._launch(self.state.model, corrections=None)

    def adapt_with_corrections(self) -> None:
        """One round: adapt the current round's model with the corrected slices as labels
        (and the chosen method's label-free loss, unless it is Corrections only)."""
        after = after_segmentation(self.viewer)
        problem = self._round_problem(after)
        if problem:
            show_error(problem)
            return
        corrections = self.state.corrections.corrections(after.data)
        self._round_start = (np.array(after.data, copy=True), self.state.corrections.snapshot())
        if not self._launch(self.state.rounds.current.result.model, corrections=corrections):
            self._round_start = None

    def _round_problem(self, after) -> str:
        """Why a round cannot start now ("" if it can)."""
        if self.state.rounds.current is None or after is None:
            return "Run a model first, then correct its 'segmentation (after)'."
        if not len(self.state.corrections):
            return "Correct at least one slice of 'segmentation (after)' first."
        target = self.target.value
        if target is None or target.name != self.state.target_layer:
            return (
                f"The corrections belong to '{self.state.target_layer}': choose it as the "
                "target image."
            )
        return ""

    def _launch(self, model, *, corrections: np.ndarray | None) -> bool:
        """Start a run of ``model`` (with ``corrections`` as labels: a round); False if it
        could not start (the reason is shown)."""
        target = self.target.value
        method = self.method_combo.currentData()
        if model is None or target is None or method is None or self.runner.running:
            return False
        if corrections is None and getattr(self.methods[method], "needs_corrections", False):
            show_error(
                f"{method} cannot adapt this model: it learns from corrected slices only: "
                "press Adapt with corrections"
            )
            return False
        try:
            settings = settings_to_dict(plan_run(model, method, self.form.values()).settings)
            volume = layer_volume(target)
            reference = layer_volume(self.reference.value) if self.reference.value else None
            expected = parse_expected_volumes(
                self.expected_volume.value, model.class_names, where="Expected volume"
            )
        except (SettingsError, ValueError) as error:  # AdaptationError is a ValueError
            show_error(str(error))
            return False
        if reference is not None and reference.shape != volume.shape:
            show_error(
                f"The reference {reference.shape} and the image {volume.shape} differ in "
                "shape; choose the mask of this scan."
            )
            return False
        self._keep = corrections if corrections is not None else self._corrections_to_keep(target)
        request = RunRequest(
            model,
            volume,
            method,
            settings,
            reference,
            self.seed.value,
            self.state.device,
            self.preview_every.value,
            self.separate_process,
            None if corrections is None else volume.with_data(corrections),
            self._keep,  # the after layers keep the corrected slices exactly (in the worker)
            expected,
            threads=self.state.threads,
        )
        self.state.result = None
        self.state.target_layer = target.name
        self.state.reference_layer = self.reference.value.name if self.reference.value else None
        self.state.run_info = {
            "method": method,
            "settings": settings,
            "seed": self.seed.value,
            "device": self.state.device_in_use,
            "threads": self.state.threads,
            "preview_every": self.preview_every.value,
            "round": len(self.state.rounds) if corrections is not None else 0,
        }
        self._forget_rolled_back()
        self.plots.clear()
        self._progress = progress(total=0, desc=f"Adapting with {method}")
        self.status.setText("Preparing the scan and predicting with the unadapted model…")
        self.state.status = RunStatus.RUNNING
        self.runner.start(request)
        return True

    def _corrections_to_keep(self, target) -> np.ndarray | None:
        """The corrected slices of ``target``'s current segmentation, which a new run keeps in
        its mask (None if there are none, or they belong to another scan)."""
        after = after_segmentation(self.viewer)
        if not len(self.state.corrections) or after is None:
            return None
        if target.name != self.state.target_layer or after.data.shape != target.data.shape:
            return None
        return self.state.corrections.corrections(after.data)

    def stop(self) -> None:
        """Ask the run to stop after the current step."""
        if self.runner.running:
            self.runner.stop()
            self.state.status = RunStatus.STOPPING
            self.status.setText("Stopping after the current step…")

    def _target_layer(self):
        name = self.state.target_layer
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401

    def _show(self, prediction, *, after: bool) -> None:
        """Queue the before/after layer updates, one layer per event-loop turn."""
        like = self._target_layer()
        if like is not None:
            for name, work in prediction_updates(self.viewer, prediction, like, after=after):
                self.updates.put(work, key=name)

    def _on_yield(self, item) -> None:
        if isinstance(item, StartingPoint):  # the unadapted model: before, and after's start
            self.last_event = item.event
            self.plots.add_event(item.event)
            self._update_progress(item.event)
            self._show(item.event.preview, after=False)
            self._show(item.after, after=True)
            # the worker waits for the layers before it trains (no competition for the CPU)
            self.updates.put(self.runner.layers_shown.set, key="layers shown")
            if self.state.status == RunStatus.RUNNING:
                self.status.setText("Adapting…")
            return
        if not isinstance(item, AdaptationEvent):
            return
        self.last_event = item
        self._pending.append(item)
        if not self._refresh_timer.isActive():
            self._refresh_timer.start()
        if item.preview is not None:
            self._show(item.preview, after=True)
        if item.message:
            show_warning(item.message)

    def _refresh(self) -> None:
        """Plot the events gathered since the last refresh; move the progress and status."""
        self._refresh_timer.stop()
        events, self._pending = self._pending, []
        if not events:
            return
        self.plots.add_events(events)
        self._update_progress(events[-1])
        if self.state.status == RunStatus.RUNNING:
            self.status.setText(self._progress_text(events[-1]))

    def _update_progress(self, event: AdaptationEvent) -> None:
        """Move napari's progress bar (called at each refresh: each move repaints the window)."""
        if self._progress is None:
            return
        if event.step == 0:  # the planned total is known from the first event
            self._progress.total = event.total_steps
            return
        if self._progress.total != event.total_steps:
            self._progress.total = event.total_steps
        self._progress.update(max(0, event.step - self._progress.n))

    def _progress_text(self, event: AdaptationEvent) -> str:
        elapsed = event.elapsed_seconds
        remaining = elapsed / max(event.step, 1) * max(event.total_steps - event.step, 0)
        return (
            f"step {event.step}/{event.total_steps} · epoch {event.epoch} · "
            f"loss {event.main_loss:.4f} · {_clock(elapsed)} elapsed · "
            f"about {_clock(remaining)} left"
        )

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _on_shutdown(self) -> None:
        """The viewer closed during a run: the run has ended; nothing more is shown."""
        self.updates.clear()
        self._refresh_timer.stop()
        self._pending.clear()
        self._close_progress()
        self.state.status = RunStatus.STOPPED

    def _on_return(self, outcome) -> None:
        self._refresh()
        self._close_progress()
        if isinstance(outcome, RunFailure) or not isinstance(outcome, AdaptationResult):
            message = outcome.message if isinstance(outcome, RunFailure) else "no result"
            self.updates.put(lambda: self._fail(message))
            return
        self._show(outcome.prediction, after=True)
        self.updates.put(lambda: self._finish(outcome))

    def _fail(self, message: str) -> None:
        show_error(f"Adaptation failed: {message}")
        self.status.setText(f"Failed: {message}")
        if self._round_start is not None:  # a failed round: back to where it started
            labels, slices = self._round_start
            self._round_start = None
            self._restore(labels, slices, self.state.rounds.current)
        self.state.status = RunStatus.FAILED

    def _finish(self, outcome: AdaptationResult) -> None:
        """Publish the result once the final layers are drawn; record the round."""
        self._record_round(outcome)
        self.state.result = outcome
        self.state.status = RunStatus.STOPPED if outcome.stopped else RunStatus.FINISHED
        self._say_gate(outcome, self._run_summary(outcome))
        self.overrule_button.setVisible(outcome.rolled_back is not None)
        self.corrections.show_slices()

    def _run_summary(self, outcome: AdaptationResult) -> str:
        summary = outcome.summary()
        if self.state.run_info.get("round"):
            summary = f"Round {self.state.run_info['round']}: {summary}"
        return summary

    def _say_gate(self, outcome: AdaptationResult, summary: str) -> None:
        """The run's summary and the gate's decision in the status (:func:`status_lines`); a
        napari warning for a roll-back, an overruled gate and every loud line (implausible
        volume, large change of volume)."""
        gate = outcome.gate
        self.status.setText("\n".join(status_lines(summary, gate)))
        if gate is not None and gate.rolled_back:
            show_warning(f"Adaptation did not look better: {gate.summary}")
        elif gate is not None and gate.overruled:
            show_warning(f"Gate overruled: {gate.summary}")
        else:
            show_info(summary)
        for line in gate.warnings if gate is not None else []:
            show_warning(line)

    # -- overruling the gate ----------------------------------------------------------------
    def use_adapted_result(self) -> None:
        """Keep the adapted result the gate rolled back (the user judged it better): the
        *after* layers show it (with the corrected slices kept), the round history continues
        from its model, and QA, Export and the report use it (the report says the user
        overruled the gate)."""
        result = self.state.result
        self.overrule_button.setVisible(False)
        if self.state.running or result is None or result.rolled_back is None:
            return
        overrule_gate(result)
        self.state.rounds.overruled(self._reference_labels())
        self._show_overruled(result)
        self._say_gate(result, self._run_summary(result))
        self.state.events.result.emit(result)  # the same result, changed: QA and Export refresh

    def _show_overruled(self, result: AdaptationResult) -> None:
        """The adapted prediction in the *after* layers, with the slices the user corrected
        (also since the run ended) kept exactly; later edits are compared with it."""
        like = self._target_layer()
        if like is None:
            return
        keep = self._corrections_to_keep(like)
        if keep is not None:
            result.prediction = corrected_prediction(result.prediction, keep)
            result.predictions[:1] = [result.prediction]
        show_prediction(self.viewer, result.prediction, like, after=True)
        self.corrections.start_from(result.prediction.labels, keep=keep is not None)

    def _forget_rolled_back(self) -> None:
        """A new run or round: the last run's roll-back stands (its adapted model and
        predictions are dropped, the button goes)."""
        self.overrule_button.setVisible(False)
        current = self.state.rounds.current  # the last run's result (state.result is cleared)
        if current is not None:
            current.result.rolled_back = None

    def _record_round(self, outcome: AdaptationResult) -> None:
        """Keep the run as a round; edits from now on are compared with what it showed."""
        rounds, info = self.state.rounds, self.state.run_info
        if self._round_start is None:
            rounds.begin(outcome, info)
        else:
            labels, slices = self._round_start
            rounds.add(outcome, info, self._keep, labels, slices, self._reference_labels())
        self._round_start = None
        after = after_segmentation(self.viewer)
        if after is not None:
            self.corrections.start_from(after.data, keep=self._keep is not None)

    def _reference_labels(self) -> np.ndarray | None:
        """The run's reference mask (QA only), for the round's Dice in the report."""
        name = self.state.reference_layer
        layer = self.viewer.layers[name] if name and name in self.viewer.layers else None
        return None if layer is None else np.asarray(layer.data)

    # -- rounds -------------------------------------------------------------------------------
    def back_one_round(self) -> None:
        """Undo the latest round: its model and result are dropped, and the segmentation and
        corrected slices are as they were when it started."""
        if self.state.running or len(self.state.rounds) < 2:
            return
        dropped = self.state.rounds.back()
        self._restore(dropped.start_labels, dropped.start_slices, self.state.rounds.current)
        self.status.setText(
            f"Back to round {self.state.rounds.current.number}: round {dropped.number} undone."
        )

    def _restore(self, labels, slices, current) -> None:
        """Show ``labels`` as the *after* segmentation (with the entropy of round ``current``),
        the corrected ``slices``, and ``current``'s result as the one to export."""
        self.overrule_button.setVisible(False)
        like = self._target_layer()
        if like is not None and current is not None:
            show_entropy(self.viewer, ENTROPY_AFTER, current.result.prediction.entropy, like)
            show_labels(self.viewer, SEGMENTATION_AFTER, labels, like)
        self.state.corrections = slices
        if current is not None:
            self.state.run_info = dict(current.info)
            self.state.result = current.result
        self.corrections.show_slices()
