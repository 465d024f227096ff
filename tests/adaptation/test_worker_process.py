"""The engine in a separate process: same events and result, stop, errors, a dying child."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch

from napari_uda.adaptation.engine import AdaptationError, run_adaptation
from napari_uda.adaptation.worker_process import (
    AdaptationProcessError,
    run_adaptation_in_process,
)
from napari_uda.core.models import ModelBundle, UNet2D, UNetBundleAdapter, UNetConfig
from napari_uda.core.models.torchscript import TorchScriptAdapter, TorchScriptSpec
from napari_uda.core.preprocessing import PreprocessingConfig
from napari_uda.settings import SettingsError

SETTINGS = {"epochs": 2, "batch_size": 8}


def drain(run) -> tuple[list, object]:
    """Every event of a run and its result."""
    events = []
    while True:
        try:
            events.append(next(run))
        except StopIteration as finished:
            return events, finished.value


def test_events_and_result_equal_the_engine_in_this_process(tiny_model, tiny_target):
    before = {k: v.clone() for k, v in tiny_model.network.state_dict().items()}
    here_events, here = drain(
        run_adaptation(tiny_model, tiny_target, "tent", SETTINGS, device="cpu")
    )
    # the same number of PyTorch threads on both sides: sums split across another number of
    # threads round differently in the last bits (the child's default is the free cores)
    there_events, there = drain(
        run_adaptation_in_process(
            tiny_model, tiny_target, "tent", SETTINGS, device="cpu", threads=torch.get_num_threads()
        )
    )
    assert [e.to_record()["losses"] for e in there_events] == [
        e.to_record()["losses"] for e in here_events
    ]
    assert there_events[0].step == 0 and there_events[0].preview is not None
    np.testing.assert_array_equal(there.prediction.labels, here.prediction.labels)
    np.testing.assert_allclose(there.prediction.entropy, here.prediction.entropy)
    assert there.checkpoint == here.checkpoint
    for name, value in there.model.network.state_dict().items():
        torch.testing.assert_close(value, here.model.network.state_dict()[name])
    # the user's model was neither changed nor moved into shared memory
    for name, value in tiny_model.network.state_dict().items():
        assert torch.equal(value, before[name]) and not value.is_shared()


def test_a_stop_request_reaches_the_child_within_a_step(tiny_model, tiny_target):
    events = []

    def should_stop() -> bool:
        return len(events) >= 3  # the step-0 event and two steps

    run = run_adaptation_in_process(
        tiny_model, tiny_target, "tent", {"epochs": 20, "batch_size": 4}, should_stop=should_stop
    )
    while True:
        try:
            events.append(next(run))
        except StopIteration as finished:
            result = finished.value
            break
    assert result.stopped and result.stop_reason == "stopped by user"
    total = result.history[-1]["total_steps"]
    assert 2 <= len(result.history) <= 3 < total


def test_errors_come_back_with_their_type_and_message(tiny_model, tiny_target):
    group_norm_model = UNetBundleAdapter(
        ModelBundle.from_model(
            UNet2D(UNetConfig(base_channels=4, depth=2, norm="group")),
            ["background", "brain"],
            PreprocessingConfig(),
        )
    )
    with pytest.raises(SettingsError, match="unknown setting 'no_such_setting'") as error:
        drain(run_adaptation_in_process(tiny_model, tiny_target, "tent", {"no_such_setting": 1}))
    notes = "\n".join(getattr(error.value, "__notes__", []))
    assert "in the adaptation process" in notes or not hasattr(error.value, "add_note")
    with pytest.raises(AdaptationError, match="needs BatchNorm"):  # the engine's own errors
        drain(run_adaptation_in_process(group_norm_model, tiny_target, "adabn"))


class ExitWhenUnpickled:
    """Unpickling this ends the process at once with exit code 3 (a crash in the child)."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_child_that_dies_is_an_error_not_a_hang(tiny_model, tiny_target):
    with pytest.raises(AdaptationProcessError, match="exit code 3"):
        drain(run_adaptation_in_process(tiny_model, tiny_target, "tent", ExitWhenUnpickled()))
    assert not multiprocessing.active_children()


def test_closing_the_run_early_ends_the_child(tiny_model, tiny_target):
    run = run_adaptation_in_process(tiny_model, tiny_target, "tent", {"epochs": 50})
    first = next(run)
    assert first.step == 0 and multiprocessing.active_children()
    run.close()
    assert not multiprocessing.active_children()


def test_torchscript_models_cross_the_process_boundary(tiny_target):
    """ScriptModules do not pickle; the adapter goes to the child and back as TorchScript."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 2, 1),
    ).eval()
    spec = TorchScriptSpec.from_dict(
        {"spatial_dims": 2, "class_names": ["background", "brain"], "normalization": "zscore"}
    )
    model = TorchScriptAdapter(torch.jit.script(network), spec)
    _, here = drain(run_adaptation(model, tiny_target, "tent", SETTINGS, device="cpu"))
    _, there = drain(run_adaptation_in_process(model, tiny_target, "tent", SETTINGS, device="cpu"))
    assert isinstance(there.model, TorchScriptAdapter)
    assert isinstance(there.model.network.scripted, torch.jit.ScriptModule)
    np.testing.assert_array_equal(there.prediction.labels, here.prediction.labels)
    for name, value in there.model.scripted.state_dict().items():
        torch.testing.assert_close(value, here.model.scripted.state_dict()[name])
    trainable = [p.requires_grad for p in here.model.network.parameters()]
    assert [p.requires_grad for p in there.model.network.parameters()] == trainable


@pytest.mark.parametrize("threads", [1, 2])
def test_the_child_computes_with_the_threads_asked_for_and_quiet_openmp(
    tiny_model, tiny_target, threads, monkeypatch
):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("OMP_WAIT_POLICY")  # restored (unset) after the test
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = run_adaptation_in_process(
        tiny_model, tiny_target, "tent", {"epochs": 1}, device="cpu", threads=threads
    )
    _, result = drain(run)
    assert result.extra["cpu_threads"] == threads
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # what the child inherited


def test_what_the_gate_rolled_back_comes_back_from_the_process(tiny_model, tiny_target):
    from napari_uda.adaptation.gate import GateOptions, overrule_gate

    always_back = GateOptions(min_agreement_gain=1.0)  # no run gains that much agreement
    _, result = drain(
        run_adaptation_in_process(
            tiny_model, tiny_target, "tent", SETTINGS, device="cpu", threads=1, gate=always_back
        )
    )
    assert result.gate.rolled_back and result.rolled_back is not None
    source_state = tiny_model.network.state_dict()
    for name, value in result.model.network.state_dict().items():
        assert torch.equal(value, source_state[name])
    adapted = result.rolled_back
    adapted_state = {k: v.clone() for k, v in adapted.model.network.state_dict().items()}
    assert any(not torch.equal(v, source_state[k]) for k, v in adapted_state.items())

    overrule_gate(result)
    for name, value in result.model.network.state_dict().items():
        assert torch.equal(value, adapted_state[name])
    assert result.prediction is adapted.prediction and result.gate.overruled
