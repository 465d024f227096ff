"""How many threads PyTorch computes with, chosen from the cores that are actually free.

PyTorch's default is one intra-op thread per core it may use. On a busy workstation (a viewer,
a PACS client, a browser, other jobs) that is often the slowest choice: OpenMP threads that
wait for a core spin while they wait (by default ~300 000 spins, about a millisecond, per
barrier) and fight the other work for the cores, so a step can take several times longer than
with fewer threads (docs/performance.md has the measurements). This module

* tells the OpenMP runtime not to spin while it waits (:func:`quiet_openmp_waiting`:
  ``OMP_WAIT_POLICY=PASSIVE`` for GNU OpenMP, which PyTorch's Linux wheels use, and
  ``KMP_BLOCKTIME=0`` for Intel/LLVM OpenMP). The runtime reads these once, when it is loaded,
  i.e. at ``import torch``: call it before the first ``import torch`` of a process (the CLI
  does, at its entry) or in the parent before starting a process (children inherit the
  environment; the engine's process and batch workers get it that way);
* chooses the number of intra-op threads (:func:`choose_threads`): the user's number if given,
  else ``OMP_NUM_THREADS`` if the environment sets it, else the cores idle right now (see
  :func:`free_cores`), at least 1 and at most the cores this process may run on;
* applies it (:func:`apply_threads`, ``torch.set_num_threads``, which works at any time).

Nothing here imports torch at module level, so importing it never starts OpenMP.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: Environment that keeps waiting OpenMP threads from spinning (GNU and Intel/LLVM runtimes).
QUIET_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
#: Seconds over which :func:`idle_cores` measures the idle time of the cores, per sample.
IDLE_WINDOW = 0.125
#: Consecutive samples :func:`idle_cores` takes (it keeps the least idle one).
IDLE_SAMPLES = 2
#: What ``--threads`` and the Model widget accept besides a positive number.
AUTO = "auto"


def quiet_openmp_waiting(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`QUIET_OPENMP` in ``environ`` (default ``os.environ``) where it is not set.

    Values the user set are kept. Returns what was set. Effective for this process only if
    torch has not been imported yet (the OpenMP runtime reads them when it is loaded), and for
    every process started from this one afterwards.
    """
    environ = os.environ if environ is None else environ
    changed = {}
    for name, value in QUIET_OPENMP.items():
        if name not in environ:
            environ[name] = changed[name] = value
    if changed and environ is os.environ and "torch" in sys.modules:
        logger.debug("torch is already loaded: %s applies to child processes only", changed)
    return changed


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; all cores where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def _cpu_times(cpus: set[int] | None) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over ``cpus`` (all when None) from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    idle = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or len(fields) < 5:
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]
        idle += values[3] + values[4]  # idle + iowait
        total += sum(values)
    return (idle, total) if total > 0 else None


def idle_cores(window: float = IDLE_WINDOW, samples: int = IDLE_SAMPLES) -> float | None:
    """How many of this process's cores were idle, from /proc/stat: the least over ``samples``
    consecutive windows of ``window`` seconds (defaults :data:`IDLE_SAMPLES` x
    :data:`IDLE_WINDOW`), so a pause of bursty work in one window is not taken for free cores.
    None where /proc/stat does not exist."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    cores = len(cpus) if cpus else usable_cores()
    least = None
    previous = _cpu_times(cpus)
    for _ in range(max(1, samples)):
        if previous is None:
            return None
        time.sleep(window)
        current = _cpu_times(cpus)
        if current is None or current[1] <= previous[1]:
            return None
        idle = (current[0] - previous[0]) / (current[1] - previous[1]) * cores
        least = idle if least is None else min(least, idle)
        previous = current
    return least


def load_average() -> float | None:
    """The 1-minute load average (runnable tasks, machine-wide); None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def free_cores(
    cores: int | None = None,
    load: float | None = None,
    idle: float | None = None,
    machine_cores: int | None = None,
) -> float:
    """Cores free for this process: the cores idle right now (:func:`idle_cores`, the least
    of two samples of an eighth of a second) where that can be measured (Linux), else what
    the 1-minute load average leaves (``cores`` minus this process's share of the machine's
    load: macOS, where /proc/stat does not exist), else all ``cores``.

    The idle sample comes first because the load average trails the machine by about a minute:
    right after other work ends (a previous adaptation round, a batch job) it still counts that
    work, and a choice made from it would leave the now idle cores unused. Arguments default to
    measuring (:func:`usable_cores`, :func:`load_average`, :func:`idle_cores`,
    ``os.cpu_count()``); the load average is read only when the idle sample is unavailable.
    """
    cores = usable_cores() if cores is None else cores
    idle = idle_cores() if idle is None else idle
    if idle is not None:
        return idle
    load = load_average() if load is None else load
    if load is None:
        return float(cores)
    machine_cores = machine_cores or os.cpu_count() or cores
    return cores - load * cores / max(machine_cores, cores)


@dataclass(frozen=True)
class ThreadChoice:
    """A number of intra-op threads and why (for logs and the UI)."""

    threads: int
    reason: str


def parse_threads(value: str | int | None) -> int | None:
    """``"auto"`` / None / 0 -> None (choose), a positive number -> itself.

    Raises:
        ValueError: anything else (one readable line).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in (AUTO, "")):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        raise ValueError(f"threads {value!r} is neither a positive number nor auto")
    return number or None


def choose_threads(
    request: str | int | None = AUTO,
    *,
    environ: MutableMapping[str, str] | None = None,
    workers: int = 1,
    **measured,
) -> ThreadChoice:
    """The number of intra-op threads to use, in order of precedence:

    1. ``request``, a positive number (``--threads N``, the Model widget): the user wins;
    2. ``OMP_NUM_THREADS`` from ``environ`` (default ``os.environ``) when it is a positive
       number: an explicit setting of the environment is respected;
    3. the free cores (:func:`free_cores`; ``measured`` passes its arguments, for tests)
       divided by ``workers`` (processes sharing the machine, e.g. batch workers), rounded,
       at least 1 and at most :func:`usable_cores`.
    """
    number = parse_threads(request)
    if number is not None:
        return ThreadChoice(number, f"{number} as asked")
    environ = os.environ if environ is None else environ
    from_env = environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return ThreadChoice(int(from_env), f"{from_env} from OMP_NUM_THREADS")
    cores = measured.pop("cores", None) or usable_cores()
    free = free_cores(cores, **measured)
    threads = min(cores, max(1, int(free / max(1, workers) + 0.5)))
    share = f" shared by {workers} workers" if workers > 1 else ""
    free_text = f"{max(free, 0.0):.1f} of {cores} cores free{share}"
    return ThreadChoice(threads, f"{threads} auto ({free_text})")


def apply_threads(request: str | int | None = AUTO, **kwargs) -> ThreadChoice:
    """Choose (:func:`choose_threads`, same arguments) and set torch's intra-op threads."""
    import torch

    choice = choose_threads(request, **kwargs)
    torch.set_num_threads(choice.threads)
    logger.info("PyTorch threads: %s", choice.reason)
    return choice


def configure_worker(threads: str | int | None = AUTO, workers: int = 1) -> ThreadChoice:
    """For a batch worker process (e.g. a Dask worker's setup callback): quiet OpenMP's waiting
    for the processes it starts and set this process's threads, sharing the free cores with
    ``workers - 1`` other workers on the machine. For the waiting policy to apply to the worker
    itself, start it with :func:`openmp_environment` in its environment."""
    quiet_openmp_waiting()
    return apply_threads(threads, workers=workers)


def openmp_environment(threads: int | None = None) -> dict[str, str]:
    """Environment variables for a process started to compute: :data:`QUIET_OPENMP`, and
    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` when ``threads`` is given (e.g. Dask's
    ``distributed.nanny.pre-spawn-environ``, which otherwise sets them to 1)."""
    environment = dict(QUIET_OPENMP)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = environment["MKL_NUM_THREADS"] = str(int(threads))
    return environment


#: Modules PyTorch imports the first time an optimiser is made (``torch.optim`` wraps its
#: methods with ``torch._disable_dynamo``, which imports ``torch._dynamo``): about 1.3 s of CPU
#: and, on a loaded machine, tens of seconds of waiting.
OPTIMISER_IMPORTS = ("torch._dynamo",)


def import_in_background(modules: tuple[str, ...] = OPTIMISER_IMPORTS) -> threading.Thread:
    """Import ``modules`` (default :data:`OPTIMISER_IMPORTS`) in a daemon thread, so that the
    import overlaps reading and preparing the scans and the first prediction (which release
    the GIL) instead of delaying the first optimiser step. A failure is left for the import
    that needs the module to report."""

    def target() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # the real import will raise it again
                logger.debug("background import of %s failed", name, exc_info=True)

    thread = threading.Thread(target=target, name="napari-uda imports", daemon=True)
    thread.start()
    return thread
