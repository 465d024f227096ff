"""Run an adaptation in a napari thread worker and hand its events to the GUI thread.

The job is a generator run by :func:`napari.qt.threading.create_worker`. By default the engine
itself runs in a separate process
(:func:`~napari_uda.adaptation.worker_process.run_adaptation_in_process`), whose events the
worker thread relays: a crash or an out-of-memory kill of the engine cannot take napari down,
and the memory a run used goes back to the system when it ends (inside napari it trains about
as fast as in a thread; starting it costs 2-3 s; docs/responsiveness.md). The job yields every
:class:`~napari_uda.adaptation.events.AdaptationEvent` of the engine (the first, with
``step == 0``, carries the unadapted model's prediction, which becomes the *before* layers; it
is handed over in a :class:`StartingPoint`) and returns the
:class:`~napari_uda.adaptation.events.AdaptationResult` (or a :class:`RunFailure` with a
readable message). Preprocessing, every prediction and training therefore run in the
worker, never on the GUI thread.

Work the GUI thread would otherwise do is done here too: the modules napari imports lazily for
its first labels layer are imported in the worker, and the step-0 prediction is copied for the
*after* layers (:class:`StartingPoint`). After yielding it, the worker waits (briefly, and never
past a stop request) until the GUI has made the result layers, so that napari's layer creation
does not compete with training for the CPU. During a run the garbage collector's existing objects
are frozen (:func:`gc.freeze`), so its full collections, which otherwise pause every thread for
a third of a second in napari's large heap, only look at objects made during the run.
:meth:`AdaptationRunner.stop` sets the flag the engine checks before every optimiser step.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from napari.qt.threading import GeneratorWorker, create_worker

from ..adaptation.events import AdaptationEvent, AdaptationResult
from ..core.inference import Prediction
from ..core.volume import Volume

logger = logging.getLogger(__name__)


#: Modules napari imports when the first labels layer is made (its features table and colour
#: helpers): about 0.4 s of imports, done in the worker instead of the GUI thread.
LAZY_NAPARI_IMPORTS = (
    "pandas",
    "skimage.color",
    "skimage.color.colorconv",
    "skimage.exposure",
    "skimage.util",
)
#: Longest the worker waits for the GUI to make the result layers (seconds).
LAYERS_WAIT = 10.0


@dataclass
class StartingPoint:
    """The engine's step-0 event (the unadapted model) and a copy of its prediction, made in
    the worker, for the *after* layers (which the user may paint on)."""

    event: AdaptationEvent
    after: Prediction


@dataclass
class RunFailure:
    """A run that ended with an error; ``message`` is one readable line."""

    message: str


@dataclass
class RunRequest:
    """Everything one run needs (all copies; the worker shares nothing with the GUI)."""

    model: Any
    target: Volume
    method: str
    settings: dict[str, Any]
    reference: Volume | None = None
    seed: int = 0
    device: str = "auto"
    #: Evaluate (entropy, Dice, collapse guard) and refresh the *after* layers every N steps;
    #: 0: evaluate once per epoch (as the CLI does) and show the result at the end.
    preview_every: int = 10
    #: Run the engine in a separate process (the worker thread relays its events), isolated
    #: from napari (crashes, memory); False: in the worker thread itself.
    separate_process: bool = True
    #: The user's corrections on the target's grid (-1: not corrected) to train on, or None.
    corrections: Volume | None = None
    #: Corrections (int16, -1 elsewhere) that every *after* segmentation of the run keeps
    #: exactly (pasted in the worker), or None.
    keep: np.ndarray | None = None
    #: The user's expected volume per class in ml (replacing the model's own ranges), for the
    #: keep-or-roll-back gate at the end of the run.
    expected_volume: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: PyTorch CPU threads: ``"auto"`` (OMP_NUM_THREADS if set, else the cores free when the
    #: run starts; :mod:`napari_uda.core.threads`) or a number.
    threads: str = "auto"


def readable(error: BaseException) -> str:
    """One line for the user: the error's first line, or its type when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def warm_up() -> None:
    """Do off the GUI thread what napari's first labels layer would do on it: import
    :data:`LAZY_NAPARI_IMPORTS`, and fill vispy's cache of line dash patterns (numpy only, no
    OpenGL; 0.1 s for the layer's polygon-tool outline)."""
    for name in LAZY_NAPARI_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(Exception):  # an optimisation only; vispy internals may move
        from vispy.visuals.line.dash_atlas import DashAtlas

        DashAtlas()


def adaptation_job(
    request: RunRequest,
    should_stop: Callable[[], bool],
    done: threading.Event,
    layers_shown: threading.Event | None = None,
) -> Iterator[Any]:
    """The worker's generator (runs off the GUI thread); see the module docstring."""
    from ..adaptation.engine import EngineOptions, run_adaptation
    from ..adaptation.gate import GateOptions
    from ..adaptation.worker_process import run_adaptation_in_process
    from ..core.threads import apply_threads

    if request.separate_process:
        engine = functools.partial(run_adaptation_in_process, threads=request.threads)
    else:
        engine = run_adaptation
    extra = {} if request.corrections is None else {"corrections": request.corrections}
    try:
        warm_up()
        if not request.separate_process:
            apply_threads(request.threads)
        events = engine(
            request.model,
            [request.target],
            request.method,
            settings=request.settings,
            reference=request.reference,
            seed=request.seed,
            device=request.device,
            preview_every=request.preview_every,
            should_stop=should_stop,
            options=EngineOptions(evaluate_every=request.preview_every),
            gate=GateOptions(),  # keep or roll back, with the model's and the user's ranges
            expected_volumes=request.expected_volume,
            **extra,
        )
        while True:
            try:
                event = next(events)
            except StopIteration as end:
                return _kept_in_result(end.value, request.keep)
            if event.step == 0 and event.preview is not None:
                before = event.preview
                after = Prediction(
                    before.probabilities, before.labels.copy(), before.entropy.copy(), before.source
                )
                yield StartingPoint(event, _kept(after, request.keep))
                _wait(layers_shown, should_stop)
            else:
                if event.preview is not None:
                    event.preview = _kept(event.preview, request.keep)
                yield event
    except Exception as error:  # every failure reaches the user as one line
        logger.exception("adaptation failed")
        return RunFailure(readable(error))
    finally:
        done.set()


def _kept(prediction: Prediction, keep: np.ndarray | None) -> Prediction:
    """``prediction`` with the corrected voxels of ``keep`` exactly as the user made them."""
    if keep is None:
        return prediction
    from ..adaptation.rounds import corrected_prediction

    return corrected_prediction(prediction, keep)


def _kept_in_result(result: Any, keep: np.ndarray | None) -> Any:
    """The run's result whose final segmentation of the target keeps ``keep`` (and so does
    the adapted one the gate rolled back, should the user take it anyway)."""
    if keep is None or not isinstance(result, AdaptationResult):
        return result
    for held in (result, result.rolled_back):
        if held is not None:
            held.prediction = _kept(held.prediction, keep)
            if held.predictions:
                held.predictions[0] = held.prediction
    return result


def _wait(flag: threading.Event | None, should_stop: Callable[[], bool]) -> None:
    """Wait until ``flag`` is set, a stop is requested or :data:`LAYERS_WAIT` passed."""
    if flag is None:
        return
    deadline = time.monotonic() + LAYERS_WAIT
    while not flag.wait(0.05) and not should_stop() and time.monotonic() < deadline:
        pass


#: What closing the viewer during a run does, as napari's close prompt shows it (after
#: "napari-worker: Executing ").
CLOSE_PROMPT = (
    "the napari-uda adaptation ({method}).\n"
    "Closing the window stops it after the current step; nothing is saved.\n"
    "To keep the result so far: Cancel, press Stop in the Adapt widget, then Export."
)


class AdaptationJob(functools.partial):
    """:func:`adaptation_job` with its arguments, shown by napari as :data:`CLOSE_PROMPT`.

    napari lists running workers as ``Executing <function>`` when the user closes the viewer;
    this says what closing does instead of a function's address.
    """

    def __str__(self) -> str:
        return CLOSE_PROMPT.format(method=self.args[0].method)

    __repr__ = __str__


class GracefulWorker(GeneratorWorker):
    """A generator worker whose :meth:`quit` calls ``on_quit`` (the runner's shutdown: stop
    after the current step, wait for the engine to end) instead of abandoning the generator at
    a yield. napari calls ``quit`` on running workers when the viewer closes."""

    on_quit: Callable[[], object] | None = None

    def quit(self) -> None:
        if self.on_quit is None:
            super().quit()
        else:
            self.on_quit()


class AdaptationRunner:
    """Owns one run's worker and its stop flag.

    Args:
        on_yield: called on the GUI thread with each yielded item.
        on_return: called on the GUI thread with the result or a :class:`RunFailure`.
        on_shutdown: called after :meth:`shutdown` (the viewer is closing), instead of
            ``on_return``.
    """

    def __init__(
        self,
        on_yield: Callable[[Any], None],
        on_return: Callable[[Any], None],
        on_shutdown: Callable[[], None] | None = None,
    ):
        self.on_yield = on_yield
        self.on_return = on_return
        self.on_shutdown = on_shutdown
        self.worker: GeneratorWorker | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()
        #: set by the GUI once the result layers of the step-0 event are made
        self.layers_shown = threading.Event()
        self._gc_frozen = False

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def start(self, request: RunRequest) -> GeneratorWorker:
        """Start a run in a thread worker (one at a time)."""
        if self.running:
            raise RuntimeError("a run is already in progress")
        self._stop.clear()
        self._done.clear()
        self.layers_shown.clear()
        job = AdaptationJob(
            adaptation_job, request, self._stop.is_set, self._done, self.layers_shown
        )
        worker = create_worker(
            job,
            _start_thread=False,
            _worker_class=GracefulWorker,
        )
        worker.on_quit = self.shutdown
        worker.yielded.connect(self.on_yield)
        worker.returned.connect(self.on_return)
        worker.finished.connect(self._thaw)
        self.worker = worker
        self._freeze()
        worker.start()
        return worker

    def _freeze(self) -> None:
        if not self._gc_frozen:
            gc.freeze()
            self._gc_frozen = True

    def _thaw(self) -> None:
        if self._gc_frozen:
            gc.unfreeze()
            self._gc_frozen = False

    def stop(self) -> None:
        """Ask the engine to stop before its next optimiser step; the run then ends normally."""
        self._stop.set()

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Stop, drop the GUI callbacks and wait (up to ``timeout`` s) for the thread to end.

        For when the viewer closes: nothing is delivered to the GUI afterwards. The engine is
        left to end on its own (rather than aborting the worker at a yield) so that the
        generator's clean-up runs.
        """
        self._stop.set()
        if self.worker is not None:
            for signal, slot in (
                (self.worker.yielded, self.on_yield),
                (self.worker.returned, self.on_return),
            ):
                with contextlib.suppress(TypeError, RuntimeError):
                    signal.disconnect(slot)
        ended = self._done.wait(timeout)
        self._thaw()
        if self.on_shutdown is not None:
            self.on_shutdown()
        return ended
