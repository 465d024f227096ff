"""The one evented state the dock widgets share (one per viewer), careamics-napari style.

Widgets never reach into each other: the Model widget sets :attr:`SessionState.model`, the Adapt
widget sets :attr:`~SessionState.status` and :attr:`~SessionState.result`, and the QA and Export
widgets listen to ``state.events.<field>``.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from psygnal import evented

from ..adaptation.events import AdaptationResult
from ..core.models.adapter import ModelAdapter
from ..corrected_slices import CorrectedSlices, Rounds


class RunStatus(StrEnum):
    """Where the Adapt widget's run is (as careamics-napari's ``TrainingState``); evented as
    :attr:`SessionState.status`. A ``StrEnum``: each member equals its lower-case name."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


@evented(
    equality_operators={
        "model": operator.is_,
        "result": operator.is_,
        "corrections": operator.is_,
        "rounds": operator.is_,
    }
)
@dataclass
class SessionState:
    """What the widgets of one viewer share.

    Attributes:
        model: the loaded model (``None`` until one is opened).
        model_source: where it came from (a path, or ``"demo model"``).
        device: the user's device choice: ``auto`` (default), ``cpu``, ``cuda`` or ``mps``.
        device_in_use: the device ``device`` resolves to here.
        threads: PyTorch CPU threads: ``auto`` (default: OMP_NUM_THREADS if set, else the
            cores free when a run starts) or a number.
        status: the run's :class:`RunStatus` (``IDLE`` until the first run).
        target_layer: name of the image layer of the last run.
        reference_layer: name of the reference labels layer of the last run, if any.
        result: the last run's :class:`~napari_uda.adaptation.events.AdaptationResult`.
        run_info: method name, settings and inputs of the last run (for reports).
        corrections: the slices of ``segmentation (after)`` the user corrected.
        rounds: the first run and each round of Adapt with corrections since (for going back
            and for reports).
    """

    model: ModelAdapter | None = None
    model_source: str = ""
    device: str = "auto"
    device_in_use: str = "cpu"
    threads: str = "auto"
    status: RunStatus = RunStatus.IDLE
    target_layer: str | None = None
    reference_layer: str | None = None
    result: AdaptationResult | None = None
    run_info: dict[str, Any] = field(default_factory=dict)
    corrections: CorrectedSlices = field(default_factory=CorrectedSlices)
    rounds: Rounds = field(default_factory=Rounds)

    @property
    def running(self) -> bool:
        return self.status in (RunStatus.RUNNING, RunStatus.STOPPING)


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_state(viewer) -> SessionState:
    """The shared state of ``viewer`` (made on first use; proxies of one viewer share it)."""
    viewer = getattr(viewer, "__wrapped__", viewer)
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = SessionState()
    return state
