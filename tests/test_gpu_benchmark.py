"""benchmarks/gpu.py's mechanics, on the CPU: device choice, memory accounting and release,
mixed precision on CUDA only, the simulated corrections, and the one line without a GPU."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CUDA_CALLS = (
    "synchronize",
    "empty_cache",
    "reset_peak_memory_stats",
    "memory_allocated",
    "max_memory_allocated",
)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu")


def test_without_cuda_one_line_exit_0_and_nothing_written(gpu, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "RESULTS", tmp_path / "gpu.json")
    monkeypatch.setattr(gpu, "DOCS", tmp_path / "performance.md")
    assert gpu.main([]) == 0
    assert capsys.readouterr().out.splitlines() == [gpu.NO_GPU]
    assert list(tmp_path.iterdir()) == []


def test_measure_on_the_cpu_makes_no_cuda_call(gpu, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a CUDA call on the CPU")

    for name in CUDA_CALLS:
        monkeypatch.setattr(torch.cuda, name, forbidden)
    row = gpu.measure(lambda: torch.ones(100), torch.device("cpu"))
    assert row["seconds"] >= 0
    assert row["peak_gpu_memory_mb"] is None and row["gpu_memory_left_mb"] is None


class FakeCuda:
    """Allocated bytes and a peak, as torch.cuda keeps them; records the calls in order."""

    def __init__(self):
        self.allocated, self.peak, self.calls = 10 * 2**20, 0, []

    def install(self, monkeypatch):
        for name in CUDA_CALLS:
            monkeypatch.setattr(torch.cuda, name, self._recorder(name))

    def _recorder(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            if name == "reset_peak_memory_stats":
                self.peak = self.allocated
            if name == "memory_allocated":
                return self.allocated
            if name == "max_memory_allocated":
                return self.peak
            return None

        return call

    def tensor(self, megabytes: int):
        """An object holding ``megabytes`` of GPU memory until it is garbage."""
        fake = self

        class Held:
            def __init__(self):
                fake.calls.append("work")
                fake.allocated += megabytes * 2**20
                fake.peak = max(fake.peak, fake.allocated)

            def __del__(self):
                fake.allocated -= megabytes * 2**20

        return Held()


def test_measure_on_cuda_resets_the_peak_first_and_checks_the_memory_is_released(gpu, monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    held = []
    row = gpu.measure(lambda: fake.tensor(300), torch.device("cuda"))
    assert fake.calls.index("reset_peak_memory_stats") < fake.calls.index("work")
    assert fake.calls[-2:] == ["empty_cache", "memory_allocated"]
    assert row["peak_gpu_memory_mb"] == pytest.approx(300)
    assert row["gpu_memory_left_mb"] == pytest.approx(0)  # the result was dropped

    row = gpu.measure(lambda: held.append(fake.tensor(50)), torch.device("cuda"))
    assert row["gpu_memory_left_mb"] == pytest.approx(50)  # a leak shows


def test_mixed_precision_on_cuda_only(gpu, monkeypatch):
    from napari_uda.core.device import autocast

    assert gpu.engine_options(torch.device("cuda")).mixed_precision
    assert not gpu.engine_options(torch.device("cpu")).mixed_precision
    assert not autocast(torch.device("cpu"))._enabled
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = autocast(torch.device("cuda"))
    assert cuda._enabled and cuda.fast_dtype == torch.float16


def test_cuda_is_chosen_when_there_is_one(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu.cuda_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.cuda_device() is None


def test_simulated_corrections_are_a_few_slices_of_the_reference(gpu):
    from napari_uda.core.corrections import NOT_CORRECTED

    reference = np.zeros((6, 7, 20), dtype=np.uint8)
    reference[2:4, 2:5, 5:15] = 1
    corrections = gpu.simulated_corrections(reference, slices=3)
    corrected = [z for z in range(20) if (corrections[..., z] != NOT_CORRECTED).any()]
    assert len(corrected) == 3 and all(5 <= z < 15 for z in corrected)
    for z in corrected:
        np.testing.assert_array_equal(corrections[..., z], reference[..., z])
    with pytest.raises(ValueError, match="no foreground"):
        gpu.simulated_corrections(np.zeros((4, 4, 4)))


def test_demo_cases_run_on_the_device_given(gpu, monkeypatch):
    import napari_uda.adaptation.engine as engine

    seen = []
    monkeypatch.setattr(engine, "adapt", lambda *args, **kwargs: seen.append(kwargs))
    cases = gpu.demo_cases(torch.device("cpu"))
    assert {"demo inference", "demo TENT one-shot", "demo correction round"} <= set(cases)
    cases["demo correction round"]()
    [kwargs] = seen
    assert kwargs["device"] == torch.device("cpu") and "corrections" in kwargs
    assert not kwargs["options"].mixed_precision
