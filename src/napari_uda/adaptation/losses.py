"""Losses shared by the adaptation methods.

Conventions: ``logits`` are (B, C, ...) raw network outputs; ``probabilities`` are softmax
outputs of the same shape; integer ``labels`` are (B, ...) class indices; an optional boolean
``mask`` of shape (B, ...) or (B, 1, ...) marks the voxels that count (e.g. not padding).
Every loss returns a scalar tensor and stays differentiable (an empty mask gives a zero that
still carries a gradient, so an optimiser step never fails on an empty batch).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ConsistencyKind = Literal["mse", "ce", "dice"]


def _voxel_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A (B, ...) boolean mask matching ``like``'s batch and spatial shape, or None."""
    if mask is None:
        return None
    if mask.dim() == like.dim() and mask.shape[1] == 1:
        mask = mask[:, 0]
    return mask.to(device=like.device, dtype=torch.bool).expand(like.shape[0], *like.shape[2:])


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, ...) ``values`` over ``mask`` (all voxels if None)."""
    if mask is None:
        return values.mean()
    if not bool(mask.any()):
        return values.sum() * 0.0
    return values[mask].mean()


class _SoftmaxEntropy(torch.autograd.Function):
    """Shannon entropy (B, ...) of ``softmax(logits)`` over dim 1 that keeps only the logits
    for the backward pass and recomputes the probabilities there.

    Autograd through ``log_softmax``, ``exp`` and the product would keep two more tensors of
    the logits' size until the backward pass (for a 256^3 two-class volume, 134 MB each) and
    make more there; the gradient is ``dH/dz_j = -p_j (log p_j + H)``, computed in place."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        log_p = F.log_softmax(logits, dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (logits,) = ctx.saved_tensors
        log_p = F.log_softmax(logits, dim=1)
        p = log_p.exp()
        entropy = (p * log_p).sum(dim=1, keepdim=True).neg_()
        return p.mul_(log_p.add_(entropy)).mul_(grad.unsqueeze(1)).neg_()


def entropy_map(logits: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
    """Voxel-wise Shannon entropy (B, ...) of ``softmax(logits)`` in nats.

    With ``normalized`` it is divided by log(C), so 0 (certain) .. 1 (uniform). Differentiable
    with little memory (:class:`_SoftmaxEntropy`)."""
    entropy = _SoftmaxEntropy.apply(logits.float())
    return entropy / math.log(logits.shape[1]) if normalized else entropy


def entropy_loss(
    logits: torch.Tensor, mask: torch.Tensor | None = None, *, normalized: bool = False
) -> torch.Tensor:
    """Mean Shannon entropy of the softmax prediction (TENT, AdaEnt). Default in nats."""
    entropy = entropy_map(logits, normalized=normalized)
    return _masked_mean(entropy, _voxel_mask(mask, logits))


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, ...) integer labels -> (B, C, ...) float one-hot (negative labels give all zeros)."""
    valid = labels >= 0
    encoded = F.one_hot(labels.clamp_min(0).long(), num_classes).movedim(-1, 1).float()
    return encoded * valid.unsqueeze(1)


def soft_dice_loss(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """1 - mean soft Dice over classes, summed over the whole batch (Milletari et al. 2016).

    Args:
        probabilities: (B, C, ...) predicted probabilities.
        target: (B, ...) integer labels or (B, C, ...) probabilities / one-hot.
        mask: voxels that count (default: all).
        include_background: also average class 0. Default False (foreground classes only,
            unless the model has a single class).
        smooth: added to numerator and denominator. Default 1e-5.
    """
    num_classes = probabilities.shape[1]
    if target.dim() == probabilities.dim() - 1:
        target = one_hot(target, num_classes)
    target = target.to(probabilities.dtype)
    voxel_mask = _voxel_mask(mask, probabilities)
    if voxel_mask is not None:
        weight = voxel_mask.unsqueeze(1).to(probabilities.dtype)
        probabilities, target = probabilities * weight, target * weight
    dims = [0, *range(2, probabilities.dim())]
    intersection = (probabilities * target).sum(dims)
    denominator = probabilities.sum(dims) + target.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    if not include_background and num_classes > 1:
        dice = dice[1:]
    return 1.0 - dice.mean()


def class_ratio(probabilities: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(C,) predicted class ratio: the mean probability of each class over the masked voxels
    (uniform when no voxel is masked). Reduces in place of copying the voxels out."""
    dims = [0, *range(2, probabilities.dim())]
    voxel_mask = _voxel_mask(mask, probabilities)
    if voxel_mask is None:
        return probabilities.mean(dims)
    count = int(voxel_mask.sum())
    if count == 0:
        return probabilities.new_full((probabilities.shape[1],), 1.0 / probabilities.shape[1])
    return (probabilities * voxel_mask.unsqueeze(1)).sum(dims) / count


class _SoftmaxClassRatio(torch.autograd.Function):
    """:func:`class_ratio` of ``softmax(logits)`` that keeps only the logits (and the mask)
    for the backward pass and recomputes the probabilities there, instead of keeping them."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(logits, mask)
        return class_ratio(torch.softmax(logits, dim=1), mask)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, mask = ctx.saved_tensors
        p = torch.softmax(logits, dim=1)
        shape = (1, -1) + (1,) * (logits.dim() - 2)
        voxel_mask = _voxel_mask(mask, logits)
        count = logits.numel() // logits.shape[1] if voxel_mask is None else voxel_mask.sum()
        weight = grad.reshape(shape) / count  # d ratio_c / d p_c on each counted voxel
        # softmax backward: p * (g - sum_c p_c g_c)
        inner = (p * weight).sum(dim=1, keepdim=True)
        result = p.mul_(weight - inner)
        if voxel_mask is not None:
            result.mul_(voxel_mask.unsqueeze(1))
        return result, None


def softmax_class_ratio(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``class_ratio(softmax(logits), mask)`` with little memory for its gradient
    (:class:`_SoftmaxClassRatio`): AdaEnt's predicted class ratio on a training batch."""
    voxel_mask = _voxel_mask(mask, logits)
    if voxel_mask is not None and not bool(voxel_mask.any()):
        return class_ratio(torch.softmax(logits.float(), dim=1), mask)
    return _SoftmaxClassRatio.apply(logits.float(), mask)


def kl_prior_loss(prior: torch.Tensor, predicted_ratio: torch.Tensor, eps: float = 1e-6):
    """KL(prior || predicted class ratio) = sum_c prior_c * log(prior_c / predicted_c).

    The class-ratio prior term of AdaEnt (Bateson et al. 2020). Both are (C,) distributions;
    they are clamped at ``eps`` and renormalised. Zero when the prediction matches the prior.
    """
    prior = prior.to(predicted_ratio).clamp_min(eps)
    prior = prior / prior.sum()
    predicted = predicted_ratio.clamp_min(eps)
    predicted = predicted / predicted.sum()
    return (prior * (prior.log() - predicted.log())).sum()


def class_balanced_weights(labels: torch.Tensor, num_classes: int, ignore_index: int = -1):
    """(C,) weights inversely proportional to each class's share of the labelled voxels.

    Weights average to 1 over the classes present; absent classes get weight 0.
    """
    valid = labels[labels != ignore_index]
    counts = torch.bincount(valid.long().flatten(), minlength=num_classes)[:num_classes].float()
    weights = torch.where(
        counts > 0, counts.sum() / counts.clamp_min(1.0), torch.zeros_like(counts)
    )
    present = counts > 0
    if bool(present.any()):
        weights = weights / weights[present].mean()
    return weights


def pseudo_label_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -1,
    class_weights: torch.Tensor | None = None,
    class_balanced: bool = False,
) -> torch.Tensor:
    """Cross-entropy on the labelled voxels only (``ignore_index`` elsewhere).

    Args:
        logits: (B, C, ...) network output.
        labels: (B, ...) pseudo-labels, ``ignore_index`` where unconfident.
        class_weights: (C,) fixed weights, or None.
        class_balanced: weight classes by the inverse of their share in ``labels``
            (ignored when ``class_weights`` is given). Default False.
    """
    labels = labels.to(logits.device).long()
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0
    if class_weights is None and class_balanced:
        class_weights = class_balanced_weights(labels, logits.shape[1], ignore_index)
    if class_weights is not None:
        class_weights = class_weights.to(device=logits.device, dtype=torch.float32)
    return F.cross_entropy(logits.float(), labels, weight=class_weights, ignore_index=ignore_index)


class _SoftCrossEntropy(torch.autograd.Function):
    """Per-voxel ``-sum_c q_c log softmax(z)_c`` (B, ...) that keeps only the logits and the
    (fixed) targets for the backward pass; the gradient ``p * sum_c q_c - q`` is computed
    there, in place, instead of autograd keeping ``log_softmax`` and the product."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, target)
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, target = ctx.saved_tensors
        p = torch.softmax(logits, dim=1)
        p.mul_(target.sum(dim=1, keepdim=True)).sub_(target)
        return p.mul_(grad.unsqueeze(1)), None


def soft_cross_entropy(
    logits: torch.Tensor, target_probabilities: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy against soft targets: mean over voxels of -sum_c q_c log p_c. With fixed
    targets (no gradient wanted for them) it needs little memory for its gradient
    (:class:`_SoftCrossEntropy`); targets that require a gradient go through autograd."""
    logits = logits.float()
    target = target_probabilities.to(logits)
    if target.requires_grad and torch.is_grad_enabled():  # UDAS without detached targets
        per_voxel = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    else:
        per_voxel = _SoftCrossEntropy.apply(logits, target)
    return _masked_mean(per_voxel, _voxel_mask(mask, logits))


def consistency_loss(
    student_logits: torch.Tensor,
    teacher_probabilities: torch.Tensor,
    kind: ConsistencyKind = "mse",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Consistency between a student's prediction and a teacher's (fixed) probabilities.

    ``kind``: ``"mse"`` (mean squared error of the probabilities; Perone et al.'s default),
    ``"ce"`` (cross-entropy with the teacher's probabilities as soft targets) or ``"dice"``
    (soft Dice loss with the teacher's probabilities as target). The teacher is detached.
    """
    teacher = teacher_probabilities.detach()
    if kind == "ce":
        return soft_cross_entropy(student_logits, teacher, mask)
    student = torch.softmax(student_logits.float(), dim=1)
    if kind == "mse":
        squared = ((student - teacher.to(student)) ** 2).mean(dim=1)
        return _masked_mean(squared, _voxel_mask(mask, student_logits))
    if kind == "dice":
        return soft_dice_loss(student, teacher.to(student), mask)
    raise ValueError(f"unknown consistency loss {kind!r}; choose mse, ce or dice")
