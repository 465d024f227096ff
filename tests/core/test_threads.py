"""The thread policy: free cores from (mocked) load and idle time, precedence, environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from napari_uda.core import threads as policy
from napari_uda.core.threads import (
    QUIET_OPENMP,
    choose_threads,
    free_cores,
    openmp_environment,
    parse_threads,
    quiet_openmp_waiting,
)


@pytest.mark.parametrize(
    ("load", "idle", "expected"),
    [
        (0.0, 2.0, 2.0),  # idle machine
        (7.0, 0.1, 0.1),  # 7 runnable tasks on 2 cores: nothing free
        (0.5, 0.2, 0.2),  # a burst the load average has not seen yet: the idle sample wins
        (3.0, 1.9, 1.9),  # work that just ended is still in the load average: the sample wins
        (None, 1.2, 1.2),  # no load average (Windows)
        (1.0, None, 1.0),  # no /proc/stat (macOS): what the load average leaves
        (7.0, None, -5.0),  # ... which may be nothing
    ],
)
def test_free_cores_is_the_idle_sample_else_what_the_load_leaves(load, idle, expected, monkeypatch):
    monkeypatch.setattr(policy, "load_average", lambda: None)  # None: cannot be measured
    monkeypatch.setattr(policy, "idle_cores", lambda: None)
    assert free_cores(2, load, idle, machine_cores=2) == pytest.approx(expected)


def test_free_cores_counts_only_this_process_share_of_the_machine_load(monkeypatch):
    monkeypatch.setattr(policy, "idle_cores", lambda: None)  # macOS: no idle sample
    # 4 of 16 cores allowed, machine load 8: this process's share of it is 2
    assert free_cores(4, 8.0, machine_cores=16) == pytest.approx(2.0)


def test_idle_cores_keeps_the_least_idle_sample(monkeypatch):
    # jiffies (idle, total) at each read: 2 cores idle in the first window, 0.5 in the second
    reads = iter([(0.0, 0.0), (50.0, 50.0), (62.5, 100.0)])
    monkeypatch.setattr(policy, "_cpu_times", lambda cpus: next(reads))
    monkeypatch.setattr(policy.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert policy.idle_cores(0.25, samples=2) == pytest.approx(0.5)


def test_free_cores_without_any_measurement_is_all_cores(monkeypatch):
    monkeypatch.setattr(policy, "load_average", lambda: None)
    monkeypatch.setattr(policy, "idle_cores", lambda: None)
    assert free_cores(3) == 3.0


@pytest.mark.parametrize(
    ("cores", "load", "idle", "workers", "threads"),
    [
        (2, 0.1, 1.9, 1, 2),
        (2, 7.0, 0.0, 1, 1),  # never fewer than one
        (2, 1.2, 0.8, 1, 1),  # 0.8 free rounds to 1
        (32, 4.0, 30.0, 1, 30),  # the idle sample, not the trailing load average
        (32, 0.0, 32.0, 4, 8),  # shared by four batch workers
        (8, 0.0, 64.0, 1, 8),  # never more than the cores this process may use
    ],
)
def test_auto_threads_from_mocked_load_and_affinity(cores, load, idle, workers, threads):
    choice = choose_threads(
        "auto", environ={}, workers=workers, cores=cores, load=load, idle=idle, machine_cores=cores
    )
    assert choice.threads == threads
    assert choice.reason.startswith(f"{threads} auto")


def test_affinity_limits_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert policy.usable_cores() == 3
    choice = choose_threads("auto", environ={}, load=0.0, idle=10.0, machine_cores=3)
    assert choice.threads == 3


def test_the_user_wins_then_the_environment_then_auto():
    measured = {"cores": 2, "load": 7.0, "idle": 0.0}
    environ = {"OMP_NUM_THREADS": "3"}
    assert choose_threads(4, environ=environ, **measured).threads == 4
    assert choose_threads("4", environ=environ, **measured).reason == "4 as asked"
    assert choose_threads("auto", environ=environ, **measured).threads == 3
    assert "OMP_NUM_THREADS" in choose_threads(None, environ=environ, **measured).reason
    for ignored in ({"OMP_NUM_THREADS": ""}, {"OMP_NUM_THREADS": "0"}, {"OMP_NUM_THREADS": "x"}):
        assert choose_threads("auto", environ=ignored, **measured).threads == 1


@pytest.mark.parametrize("bad", ["-1", "two", "1.5", -3])
def test_bad_thread_requests_are_one_line_errors(bad):
    with pytest.raises(ValueError, match="neither a positive number nor auto"):
        parse_threads(bad)


def test_quiet_openmp_keeps_what_the_user_set():
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert quiet_openmp_waiting(environ) == {"KMP_BLOCKTIME": "0"}
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "0"}
    assert quiet_openmp_waiting(environ) == {}


def test_openmp_environment_for_batch_workers():
    assert openmp_environment() == QUIET_OPENMP
    assert openmp_environment(3)["OMP_NUM_THREADS"] == "3"
    assert openmp_environment(3)["MKL_NUM_THREADS"] == "3"


def test_idle_cores_measures_this_machine():
    idle = policy.idle_cores(0.05)
    if idle is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= idle <= policy.usable_cores()


def _cli_threads(*arguments: str, environ: dict[str, str]) -> str:
    """What `napari-uda adapt` says about threads and wait policy, in a fresh process."""
    code = (
        "import sys, torch; from napari_uda.cli import main;"
        "import napari_uda.cli.adapt_command as a;"
        "a.run = lambda args: print(torch.get_num_threads(), __import__('os').environ.get("
        "'OMP_WAIT_POLICY')) or 0;"
        "sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", code, "adapt", "--model", "m", "--image", "i"]
    command += ["--method", "tent", "--out", "o.nii", *arguments]
    done = subprocess.run(command, env=environ, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_cli_applies_threads_and_quiet_openmp():
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *QUIET_OPENMP)}
    assert _cli_threads("--threads", "1", environ=environ) == "1 PASSIVE"
    environ["OMP_NUM_THREADS"] = "1"
    environ["OMP_WAIT_POLICY"] = "ACTIVE"
    assert _cli_threads("--threads", "2", environ=environ) == "2 ACTIVE"


def test_background_imports_load_the_module_and_swallow_failures():
    sys.modules.pop("json.tool", None)
    thread = policy.import_in_background(("no_such_module_here", "json.tool"))
    thread.join(60)
    assert not thread.is_alive() and thread.daemon
    assert "json.tool" in sys.modules
