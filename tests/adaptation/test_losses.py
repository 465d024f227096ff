"""Shared losses: values against hand computations, masks, gradients, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from napari_uda.adaptation.losses import (
    class_balanced_weights,
    class_ratio,
    consistency_loss,
    entropy_loss,
    entropy_map,
    kl_prior_loss,
    one_hot,
    pseudo_label_cross_entropy,
    soft_cross_entropy,
    soft_dice_loss,
    softmax_class_ratio,
)


def logits_for(probabilities: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax over dim 1 is ``probabilities``."""
    return probabilities.clamp_min(1e-12).log()


def test_entropy_matches_hand_values():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).T.reshape(1, 2, 1, 2)  # two voxels
    expected = [math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
    torch.testing.assert_close(entropy_map(logits_for(p))[0, 0], torch.tensor(expected))
    assert entropy_loss(logits_for(p)).item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert entropy_loss(logits_for(p), normalized=True).item() == pytest.approx(
        sum(expected) / 2 / math.log(2), rel=1e-5
    )
    mask = torch.tensor([[[True, False]]])
    assert entropy_loss(logits_for(p), mask).item() == pytest.approx(math.log(2), rel=1e-5)


def test_entropy_gradient_sharpens_and_empty_mask_is_zero():
    logits = torch.tensor([[[[0.3]], [[0.0]]]], requires_grad=True)
    entropy_loss(logits).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # descent raises the leading class
    empty = entropy_loss(logits, torch.zeros(1, 1, 1, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_entropy_gradient_equals_autograd_through_the_plain_formula():
    """entropy_map keeps only the logits and computes its own gradient: it must equal
    autograd's through -sum softmax * log_softmax."""
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 3, 5, 4, generator=generator)).requires_grad_(True)
    weights = torch.rand(2, 5, 4, generator=generator)
    (entropy_map(logits) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    log_p = torch.log_softmax(logits, 1)
    plain = -(log_p.exp() * log_p).sum(1)
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad)
    torch.testing.assert_close(entropy_map(logits), plain)


def test_class_ratio_gradient_with_a_mask():
    probabilities = torch.rand(2, 3, 4, 4, requires_grad=True)
    mask = torch.rand(2, 1, 4, 4) > 0.5
    class_ratio(probabilities, mask)[1].backward()
    expected = torch.zeros(2, 3, 4, 4)
    expected[:, 1] = mask[:, 0].float() / mask.sum()
    torch.testing.assert_close(probabilities.grad, expected)


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_class_ratio_equals_autograd_through_softmax(masked):
    generator = torch.Generator().manual_seed(1)
    logits = (2 * torch.randn(2, 3, 4, 5, generator=generator)).requires_grad_(True)
    mask = torch.rand(2, 1, 4, 5, generator=generator) > 0.4 if masked else None
    weights = torch.tensor([0.3, -1.2, 2.0])
    ours = softmax_class_ratio(logits, mask)
    (ours * weights).sum().backward()
    gradient = logits.grad.clone()
    logits.grad = None
    plain = class_ratio(torch.softmax(logits, 1), mask)
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(gradient, logits.grad)


def test_floored_log_of_softmax_outputs_has_the_gradient_of_clamp_and_log():
    from napari_uda.core.models.scripted import PROBABILITY_FLOOR, outputs_to_logits

    probabilities = torch.tensor([[0.7, 0.3, 0.0, 1e-13], [0.3, 0.7, 1.0, 1.0]])[None]
    probabilities = probabilities.clone().requires_grad_(True)
    weights = torch.rand(1, 2, 4)
    (outputs_to_logits(probabilities, "softmax") * weights).sum().backward()
    ours = probabilities.grad.clone()
    probabilities.grad = None
    plain = probabilities.clamp_min(PROBABILITY_FLOOR).log()
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours, probabilities.grad)
    torch.testing.assert_close(outputs_to_logits(probabilities, "softmax"), plain)


@pytest.mark.parametrize("masked", [False, True])
def test_soft_cross_entropy_gradients_equal_autograd_through_the_formula(masked):
    """Fixed targets: the lean gradient equals autograd's; targets that require a gradient
    (UDAS without detached pseudo-labels) still get theirs."""
    generator = torch.Generator().manual_seed(2)
    logits = (2 * torch.randn(2, 3, 4, 5, generator=generator)).requires_grad_(True)
    target = torch.softmax(torch.randn(2, 3, 4, 5, generator=generator), 1)
    mask = torch.rand(2, 1, 4, 5, generator=generator) > 0.4 if masked else None
    ours = soft_cross_entropy(logits, target, mask)
    ours.backward()
    gradient = logits.grad.clone()
    logits.grad = None
    per_voxel = -(target * torch.log_softmax(logits, 1)).sum(1)
    plain = per_voxel[mask[:, 0]].mean() if masked else per_voxel.mean()
    plain.backward()
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(gradient, logits.grad)
    learned = target.clone().requires_grad_(True)
    soft_cross_entropy(logits, learned, mask).backward()
    assert learned.grad is not None and bool(learned.grad.abs().sum() > 0)


def test_soft_dice_loss_hand_values():
    labels = torch.tensor([[[0, 1, 1, 0]]])  # (1, 1, 4)
    perfect = one_hot(labels, 2)
    assert soft_dice_loss(perfect, labels).item() == pytest.approx(0.0, abs=1e-5)
    half = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]], [[[0.0, 0.0, 1.0, 1.0]]]]).permute(1, 0, 2, 3)
    # foreground predicted at voxels 2,3; truth at 1,2: Dice = 2*1/(2+2) = 0.5
    assert soft_dice_loss(half, labels).item() == pytest.approx(0.5, abs=1e-4)
    with_background = soft_dice_loss(half, labels, include_background=True).item()
    assert with_background == pytest.approx(0.5, abs=1e-4)  # background also 0.5
    mask = torch.tensor([[[False, True, True, False]]])  # only voxels 1,2: fg Dice 2*1/(1+2)
    assert soft_dice_loss(half, labels, mask).item() == pytest.approx(1 - 2 / 3, abs=1e-4)


def test_class_ratio_and_kl_prior():
    p = torch.tensor([[0.8, 0.2], [0.4, 0.6]]).T.reshape(1, 2, 1, 2)
    torch.testing.assert_close(class_ratio(p), torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(class_ratio(p, torch.tensor([[[True, False]]])), p[0, :, 0, 0])
    prior = torch.tensor([0.9, 0.1])
    expected = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    assert kl_prior_loss(prior, class_ratio(p)).item() == pytest.approx(expected, rel=1e-5)
    assert kl_prior_loss(prior, prior).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_prior_pulls_the_predicted_ratio_towards_the_prior():
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)  # ratio 0.5 / 0.5
    prior = torch.tensor([0.8, 0.2])
    kl_prior_loss(prior, class_ratio(torch.softmax(logits, 1))).backward()
    assert bool((logits.grad[:, 0] < 0).all() and (logits.grad[:, 1] > 0).all())


def test_pseudo_label_cross_entropy_ignores_unlabelled_voxels():
    logits = torch.tensor([[[[2.0, 0.0, -1.0]], [[0.0, 1.0, 3.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, -1, 1]]])
    log_p = torch.log_softmax(logits, 1)
    expected = -(log_p[0, 0, 0, 0] + log_p[0, 1, 0, 2]) / 2
    assert pseudo_label_cross_entropy(logits, labels).item() == pytest.approx(expected.item())
    nothing = pseudo_label_cross_entropy(logits.requires_grad_(), torch.full_like(labels, -1))
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_class_balanced_weights_and_weighted_cross_entropy():
    labels = torch.tensor([0, 0, 0, 1, -1])
    weights = class_balanced_weights(labels, 3)
    assert weights[2] == 0 and weights[1] == pytest.approx(3 * weights[0])
    assert weights[:2].mean() == pytest.approx(1.0)
    logits = torch.randn(1, 3, 1, 5, generator=torch.Generator().manual_seed(0))
    balanced = pseudo_label_cross_entropy(logits, labels.view(1, 1, 5), class_balanced=True)
    explicit = torch.nn.functional.cross_entropy(
        logits, labels.view(1, 1, 5), weight=weights, ignore_index=-1
    )
    assert balanced.item() == pytest.approx(explicit.item(), rel=1e-6)


def test_consistency_losses():
    student = torch.tensor([[[[1.0, -1.0]], [[0.0, 2.0]]]], requires_grad=True)
    teacher = torch.softmax(torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]]), 1)  # uniform
    p = torch.softmax(student.detach(), 1)
    mse = consistency_loss(student, teacher, "mse")
    assert mse.item() == pytest.approx(((p - 0.5) ** 2).mean().item(), rel=1e-6)
    ce = consistency_loss(student, teacher, "ce")
    assert ce.item() == pytest.approx(soft_cross_entropy(student, teacher).item())
    assert ce.item() == pytest.approx(-(0.5 * torch.log_softmax(student, 1)).sum(1).mean().item())
    dice = consistency_loss(student, teacher, "dice")
    assert dice.item() == pytest.approx(soft_dice_loss(p, teacher).item(), rel=1e-6)
    same = consistency_loss(student, torch.softmax(student, 1), "mse")
    assert same.item() == pytest.approx(0.0, abs=1e-8)
    (mse + ce + dice).backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(ValueError, match="unknown consistency loss"):
        consistency_loss(student, teacher, "l1")
