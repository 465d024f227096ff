"""Mean Teacher: EMA update, ramp-up, aligned consistency, and a real domain shift."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from napari_uda.adaptation.base import AdaptationContext
from napari_uda.adaptation.engine import adapt
from napari_uda.adaptation.methods.mean_teacher import (
    MeanTeacher,
    MeanTeacherSettings,
    ema_update,
    sigmoid_rampup,
)
from napari_uda.core.models.adapter import ModelAdapter, ModelInfo


def test_ema_update_follows_the_formula():
    torch.manual_seed(0)
    student, teacher = nn.Conv2d(2, 3, 3), nn.Conv2d(2, 3, 3)
    before = copy.deepcopy(teacher)
    ema_update(teacher, student, alpha=0.9)
    for new, old, current in zip(teacher.parameters(), before.parameters(), student.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * current)
    ema_update(teacher, student, alpha=0.0)  # alpha 0 copies the student
    for new, current in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(new, current)


def test_sigmoid_rampup():
    assert sigmoid_rampup(0.0) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0.5) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(1.0) == 1.0
    assert sigmoid_rampup(3.0) == 1.0
    values = [sigmoid_rampup(t / 10) for t in range(11)]
    assert values == sorted(values)


class PixelwiseAdapter(ModelAdapter):
    """A network that commutes with any spatial transform (1x1 convolutions only)."""

    def __init__(self):
        self.class_names = ["background", "foreground"]
        self.network = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Tanh(), nn.Conv2d(4, 2, 1))

    def prepare(self, volume):  # pragma: no cover - not used
        raise NotImplementedError

    def info(self) -> ModelInfo:
        return ModelInfo("pixelwise", self.class_names, 2, "none", None, set())


def _context(adapter: ModelAdapter, inputs: torch.Tensor) -> AdaptationContext:
    frozen = adapter.clone()
    with torch.no_grad():
        initial = torch.softmax(frozen.network(inputs), 1)
    return AdaptationContext(
        model=adapter,
        source_model=frozen,
        target_inputs=inputs,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        initial_probabilities=initial,
    )


def test_student_input_and_teacher_prediction_get_the_same_transform():
    """For an equivariant network the consistency is zero only if both sides are aligned."""
    torch.manual_seed(0)  # smooth images, so that resampling commutes with the network
    inputs = torch.nn.functional.interpolate(torch.randn(6, 1, 6, 8), (24, 32), mode="bicubic")
    settings = MeanTeacherSettings(batch_size=6, rotation_degrees=30, max_translation=0.2)
    method = MeanTeacher(settings, _context(PixelwiseAdapter(), inputs))
    method.setup()
    output = method.step(torch.arange(6), step=1)
    assert output.losses["consistency"] < 1e-5
    assert output.agreement == pytest.approx(1.0)
    # the same network compared without the paired transform is far from consistent
    with torch.no_grad():
        other = method.augmentation.sample(inputs, generator=torch.Generator().manual_seed(9))
        unpaired = torch.softmax(method.student(other(inputs)), 1)
        target = method._transform(inputs)(torch.softmax(method.teacher(inputs), 1))
    assert float(((unpaired - target) ** 2).mean()) > 1e-3


def test_schedule_raises_alpha_after_the_rampup_and_teacher_follows_the_student():
    torch.manual_seed(1)
    inputs = torch.randn(8, 1, 16, 16)
    settings = MeanTeacherSettings(epochs=10, batch_size=4, rampup_fraction=0.3)
    method = MeanTeacher(settings, _context(PixelwiseAdapter(), inputs))
    method.setup()
    assert method.total_steps() == 20 and method.rampup_steps == pytest.approx(6)
    assert [method.ema_alpha(s) for s in (1, 6, 7, 20)] == [0.99, 0.99, 0.999, 0.999]
    assert method.consistency_weight(1) == pytest.approx(20 * sigmoid_rampup(1 / 6))
    assert method.consistency_weight(6) == pytest.approx(20.0)

    teacher_before = [p.clone() for p in method.teacher.parameters()]
    student_before = [p.clone() for p in method.student.parameters()]
    method.step(torch.arange(4), step=1)
    for t_old, s_old, t_new, s_new in zip(
        teacher_before, student_before, method.teacher.parameters(), method.student.parameters()
    ):
        assert not torch.equal(s_new, s_old)  # the student learned
        assert torch.allclose(t_new, 0.99 * t_old + 0.01 * s_new, atol=1e-7)


def test_source_pack_adds_a_dice_task_loss_unless_source_free(tiny_model, tiny_target):
    settings = {"epochs": 1, "batch_size": 8}
    with_source = adapt(tiny_model, tiny_target, "mean_teacher", settings, device="cpu")
    assert "source_dice_loss" in with_source.history[0]["losses"]
    alone = adapt(
        tiny_model, tiny_target, "mean_teacher", {**settings, "source_free": True}, device="cpu"
    )
    assert "source_dice_loss" not in alone.history[0]["losses"]


def test_mean_teacher_improves_dice_on_the_demo_scanner_shift(adapt_demo):
    _result, before, after = adapt_demo(
        "mean_teacher", {"epochs": 3, "batch_size": 8, "source_free": True}
    )
    assert after > before + 0.1, (before, after)
