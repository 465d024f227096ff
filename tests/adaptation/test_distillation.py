"""Knowledge distillation: the temperature-scaled loss, and a real domain shift."""

from __future__ import annotations

import pytest
import torch

from napari_uda.adaptation.base import AdaptationContext
from napari_uda.adaptation.engine import adapt
from napari_uda.adaptation.methods.distillation import (
    DistillationSettings,
    KnowledgeDistillation,
    distillation_loss,
    soften,
)
from napari_uda.core.inference import predict_batches


def test_soften_equals_softmax_at_the_temperature():
    logits = torch.randn(2, 3, 5, 4) * 4
    for temperature in (1.0, 2.0, 5.0):
        expected = torch.softmax(logits / temperature, 1)
        assert torch.allclose(soften(torch.softmax(logits, 1), temperature), expected, atol=1e-6)


def test_distillation_loss_is_t_squared_times_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    temperature = 2.0
    teacher_soft = torch.softmax(teacher / temperature, 1)
    student_soft = torch.softmax(student / temperature, 1)
    kl = (teacher_soft * (teacher_soft.log() - student_soft.log())).sum(1).mean()
    loss = distillation_loss(student, teacher_soft, temperature)
    assert float(loss) == pytest.approx(4.0 * float(kl), rel=1e-5)
    same = distillation_loss(teacher, teacher_soft, temperature)
    assert float(same) == pytest.approx(0, abs=1e-6)


def test_distillation_gradient_is_t_times_the_softened_difference():
    """d/dz [T^2 KL(p_T || softmax(z/T))] = T (softmax(z/T) - p_T) per voxel: the T^2 scaling
    keeps gradients the same size whatever the temperature."""
    torch.manual_seed(1)
    teacher = torch.randn(1, 4, 3, 3)
    for temperature in (1.0, 2.0, 4.0):
        student = torch.randn(1, 4, 3, 3, requires_grad=True)
        teacher_soft = torch.softmax(teacher / temperature, 1)
        distillation_loss(student, teacher_soft, temperature).backward()
        voxels = 9
        expected = temperature * (torch.softmax(student.detach() / temperature, 1) - teacher_soft)
        assert torch.allclose(student.grad * voxels, expected, atol=1e-6)


def test_mask_excludes_voxels():
    student, teacher = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    teacher_soft = torch.softmax(teacher / 2, 1)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True
    masked = distillation_loss(student, teacher_soft, 2.0, mask)
    top = distillation_loss(student[..., :2, :], teacher_soft[..., :2, :], 2.0)
    assert float(masked) == pytest.approx(float(top), rel=1e-6)


def test_teacher_uses_batch_statistics_without_touching_the_source_model(tiny_model):
    inputs = tiny_model.source_pack().images * 0.6 + 0.3  # an intensity-shifted batch
    context = AdaptationContext(
        model=tiny_model.clone(),
        source_model=tiny_model.clone(),
        target_inputs=inputs,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        initial_probabilities=predict_batches(tiny_model, inputs, device="cpu"),
    )
    source_state = {k: v.clone() for k, v in context.source_model.network.state_dict().items()}
    method = KnowledgeDistillation(DistillationSettings(augment=False), context)
    method.setup()
    with torch.no_grad():
        batch_normalised = torch.softmax(method.teacher(inputs), 1)
    # the shifted batch is normalised with its own statistics: not the stored-statistics answer
    assert (batch_normalised - context.initial_probabilities).abs().max() > 0.05
    method.step(torch.arange(len(inputs)), step=1)
    for key, value in context.source_model.network.state_dict().items():
        assert torch.equal(value, source_state[key]), key
    for key, value in method.teacher.state_dict().items():
        if "running" in key:
            assert torch.equal(value, source_state[key]), key

    literal = KnowledgeDistillation(
        DistillationSettings(augment=False, teacher_batch_statistics=False), context
    )
    literal.setup()
    output = literal.step(torch.arange(len(inputs)), step=1)
    assert output.losses["target_distillation"] >= 0.0


def test_source_pack_terms_are_used_when_present(tiny_model, tiny_target):
    result = adapt(
        tiny_model, tiny_target, "distillation", {"epochs": 1, "batch_size": 10}, device="cpu"
    )
    losses = result.history[0]["losses"]
    assert {"target_distillation", "source_cross_entropy", "source_distillation"} <= set(losses)
    alone = adapt(
        tiny_model,
        tiny_target,
        "distillation",
        {"epochs": 1, "batch_size": 10, "source_weight": 0.0},
        device="cpu",
    )
    assert set(alone.history[0]["losses"]) == {"total", "target_distillation"}


def test_distillation_improves_dice_on_the_demo_scanner_shift(adapt_demo):
    _result, before, after = adapt_demo("distillation", {"epochs": 3, "batch_size": 8})
    assert after > before + 0.1, (before, after)
