"""Run the adaptation engine in a separate Python process, with the same interface.

:func:`run_adaptation_in_process` takes the arguments of
:func:`~napari_uda.adaptation.engine.run_adaptation`, yields the same events and returns the
same result, but the engine runs in a child process (``spawn``; CUDA-safe). A GUI uses it so
that training shares nothing with the GUI thread: not the GIL (PyTorch needs it between
operations, the GUI for every event it handles), not the memory allocator, and the memory a
run used is given back to the system when the child ends. A crash of the child (out of memory,
a fault in a native library) becomes an error, not a dead viewer.

* Events, the result, the model and the volumes cross the process boundary by pickling;
  TorchScript networks are pickled through :func:`torch.jit.save` (see
  :class:`~napari_uda.core.models.scripted.LogitsNetwork`).
* ``should_stop`` is polled every :data:`POLL_SECONDS` while waiting for the child and relayed
  to it; the engine in the child honours it before its next optimiser step.
* After the first event (``step == 0``: the unadapted model), the child waits until the caller
  asks for the next event, so whatever the caller does with that event (a GUI making its
  layers) does not compete with training for the CPU.
* Errors raised in the child are raised again here, with their type when it can be pickled
  (else as :class:`AdaptationProcessError` with the same message). Closing the generator early
  stops the child (then terminates it after :data:`END_TIMEOUT` seconds).

Starting the child costs the import of PyTorch and this package (2-3 s on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import traceback
from collections.abc import Callable, Generator
from typing import Any

import torch

from ..core.threads import choose_threads, import_in_background, quiet_openmp_waiting
from .engine import run_adaptation
from .events import AdaptationEvent, AdaptationResult

logger = logging.getLogger(__name__)

#: Seconds between checks of ``should_stop`` and of the child being alive.
POLL_SECONDS = 0.05
#: Seconds the child gets to end on its own after a stop, before it is terminated.
END_TIMEOUT = 30.0


class AdaptationProcessError(RuntimeError):
    """The child process failed with an error that could not be passed back as it was, or
    ended without a result (for example killed for lack of memory)."""


def run_adaptation_in_process(
    *args: Any,
    should_stop: Callable[[], bool] | None = None,
    threads: str | int | None = "auto",
    **kwargs: Any,
) -> Generator[AdaptationEvent, None, AdaptationResult]:
    """:func:`~napari_uda.adaptation.engine.run_adaptation` in a child process (see the module
    docstring); same arguments, events and result.

    ``threads`` (default ``"auto"``) is the child's number of PyTorch threads, chosen here, just
    before the start, by :func:`~napari_uda.core.threads.choose_threads` (a number wins, then
    ``OMP_NUM_THREADS``, then the cores free now); the child's OpenMP does not spin while it
    waits (:func:`~napari_uda.core.threads.quiet_openmp_waiting`, inherited environment)."""
    choice = choose_threads(threads)
    quiet_openmp_waiting()
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    stop, resume = context.Event(), context.Event()
    # pickled here with the standard pickler: the child gets copies (multiprocessing's
    # pickler, as PyTorch extends it, would move the user's tensors into shared memory)
    payload = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    child = context.Process(
        target=_serve,
        args=(payload, sender, stop, resume, choice.threads),
        name="napari-uda adaptation",
        daemon=True,
    )
    child.start()
    sender.close()  # the child holds the sending end; a dead child then reads as end of file
    try:
        while True:
            kind, value = _receive(receiver, child, stop, should_stop)
            if kind == "event":
                yield value
                if value.step == 0:
                    resume.set()
            elif kind == "result":
                return value
            else:
                raise value
    finally:
        stop.set()
        resume.set()
        receiver.close()
        child.join(END_TIMEOUT)
        if child.is_alive():
            logger.warning("the adaptation process did not end; terminating it")
            child.terminate()
            child.join()


def _receive(receiver, child, stop, should_stop: Callable[[], bool] | None) -> tuple[str, Any]:
    """The child's next message, relaying stop requests while waiting."""
    while True:
        if should_stop is not None and should_stop():
            stop.set()
        if receiver.poll(POLL_SECONDS):
            try:
                return pickle.loads(receiver.recv_bytes())
            except EOFError:
                break
        elif not child.is_alive() and not receiver.poll():
            break
    child.join(END_TIMEOUT)
    raise AdaptationProcessError(
        f"the adaptation process ended without a result (exit code {child.exitcode}); "
        "it may have run out of memory"
    )


def _serve(payload: bytes, sender, stop, resume, threads: int = 0) -> None:
    """The child: run the engine with ``threads`` PyTorch threads (0: torch's default), send
    ``(kind, value)`` messages, never raise."""
    try:
        if threads:
            torch.set_num_threads(threads)
        import_in_background()  # torch's optimiser imports, while the engine prepares
        args, kwargs = pickle.loads(payload)
        events = run_adaptation(*args, should_stop=stop.is_set, **kwargs)
        while True:
            try:
                event = next(events)
            except StopIteration as finished:
                finished.value.extra["cpu_threads"] = torch.get_num_threads()
                _send(sender, "result", finished.value)
                return
            _send(sender, "event", event)
            if event.step == 0:
                while not resume.wait(POLL_SECONDS) and not stop.is_set():
                    pass
    except BaseException as error:  # every failure goes back to the caller
        if hasattr(error, "add_note"):  # Python >= 3.11: keep the child's traceback
            error.add_note("in the adaptation process:\n" + traceback.format_exc())
        with contextlib.suppress(OSError):  # the caller may be gone
            _send(sender, "error", _picklable(error))
    finally:
        sender.close()


def _send(sender, kind: str, value: Any) -> None:
    """Send with the standard pickler: tensors travel as copies, not as shared-memory handles
    (multiprocessing's pickler, as PyTorch extends it, needs the child alive to hand them
    over)."""
    sender.send_bytes(pickle.dumps((kind, value), protocol=pickle.HIGHEST_PROTOCOL))


def _picklable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else an :class:`AdaptationProcessError` with its
    message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        text = str(error).strip() or type(error).__name__
        return AdaptationProcessError(text)
    return error
