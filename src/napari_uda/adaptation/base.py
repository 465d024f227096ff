"""The interface every adaptation method implements, and the registry that lists them.

A method is a class with a typed ``Settings`` dataclass (paper defaults, every field documented
with :func:`napari_uda.settings.setting`), the capabilities it ``requires`` from a model (see
:mod:`napari_uda.core.models.adapter`), and three hooks the engine calls:

* :meth:`AdaptationMethod.setup` once, before the first step (copy teachers, choose trainable
  parameters, build the optimiser, compute things that need no gradient);
* :meth:`AdaptationMethod.step` once per optimiser step; returns the losses of that step;
* :meth:`AdaptationMethod.end_epoch` after each epoch (e.g. refresh pseudo-labels), then
  :meth:`AdaptationMethod.finished`, to stop early (UDAS's convergence rule);
* :meth:`AdaptationMethod.finish` once after the last step (undo temporary changes), and
  :meth:`AdaptationMethod.report`: facts for ``AdaptationResult.extra``.

Helpers for methods: :meth:`AdaptationMethod.select_trainable` (freeze all but one parameter
group, so gradients are computed only where parameters change), :meth:`~AdaptationMethod.make_adam`,
:meth:`~AdaptationMethod.optimise` (mixed precision aware), :meth:`AdaptationContext.batch` and
:meth:`AdaptationContext.predict_target` (a no-grad pass, reusing the engine's evaluation).

The engine (:mod:`napari_uda.adaptation.engine`) owns the loop, cancellation, evaluation,
events, the collapse guard and checkpoints; methods own only their losses and updates.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.device import autocast
from ..core.inference import predict_batches
from ..core.models.adapter import ModelAdapter
from ..core.models.bundle import SourcePack
from ..settings import setting


@contextlib.contextmanager
def preserved_modes(network: nn.Module):
    """Restore every submodule's train/eval mode on exit (``Module.train(mode)`` would set all
    of them alike, which breaks methods that keep only some layers in training mode)."""
    modes = {module: module.training for module in network.modules()}
    try:
        yield network
    finally:
        for module, training in modes.items():
            module.training = training


def fraction_setting(default: float, help: str) -> Any:
    """A documented setting between 0 and 1 (a ratio, a portion, a probability, a Dice)."""
    return setting(default, help, min=0.0, max=1.0)


def learning_rate_setting(default: float, help: str = "Adam learning rate.") -> Any:
    """A documented learning-rate setting, from 1e-7 to 1 (what every optimiser here takes)."""
    return setting(default, help, min=1e-7, max=1.0)


@dataclass
class CommonSettings:
    """Settings every method shares (each method's Settings subclasses this).

    Attributes are documented in their ``help`` metadata.
    """

    epochs: int = setting(10, "Passes over the target slices.", min=1, max=1000)
    batch_size: int = setting(16, "Slices per optimiser step.", min=1, max=512)
    learning_rate: float = learning_rate_setting(1e-4)


@dataclass
class StepOutput:
    """What one optimiser step reports: named losses (``total`` first), optionally a
    method-specific label-free agreement Dice (e.g. student/teacher, early/final) and a short
    note for the user (shown as the event's ``message``)."""

    losses: dict[str, float]
    agreement: float | None = None
    message: str = ""


@dataclass
class PredictionCache:
    """The adapted model's latest (N, C, ...) probabilities on all target inputs, with the
    number of optimiser steps done when they were computed, so that a method's own
    whole-target pass and the engine's evaluation after the same step share one pass."""

    step: int | None = None
    probabilities: torch.Tensor | None = field(default=None, repr=False)

    def remember(self, step: int, probabilities: torch.Tensor) -> None:
        self.step, self.probabilities = step, probabilities

    def at(self, step: int) -> torch.Tensor | None:
        """The probabilities computed after ``step`` steps, or None."""
        return self.probabilities if self.step == step else None


@dataclass
class AdaptationContext:
    """Everything a method may use. Built by the engine; methods never touch the original model.

    Attributes:
        model: the model being adapted (a copy of the user's model).
        source_model: a frozen copy of the user's model, in eval mode.
        target_inputs: (N, C_in, ...) network inputs of the target volume(s), on the CPU.
        source_pack: labelled source inputs, if the model has them.
        device: where to compute.
        generator: seeded random generator for batches and augmentation.
        initial_probabilities: (N, C, ...) the source model's probabilities on the target,
            computed once with no gradient.
        valid_mask: (N, 1, ...) boolean, True on image voxels and False on padding (None:
            all voxels count).
        mixed_precision: use float16 autocast in training steps (the engine sets it on CUDA
            only).
        inference_batch_size: slices per no-grad forward pass in :meth:`predict_target`.
        steps_done: optimiser steps completed so far (kept by the engine).
        predictions: the latest whole-target prediction of the adapted model (shared with the
            engine's evaluation; see :meth:`predict_target`).
        corrections: (N, ...) int16 aligned with :attr:`target_inputs`: the user's label where
            they corrected the first volume, :data:`~napari_uda.core.corrections.NOT_CORRECTED`
            (-1) elsewhere (padding and other volumes too); None when no corrections were given.
    """

    model: ModelAdapter
    source_model: ModelAdapter
    target_inputs: torch.Tensor
    device: torch.device
    generator: torch.Generator
    initial_probabilities: torch.Tensor
    source_pack: SourcePack | None = None
    valid_mask: torch.Tensor | None = None
    mixed_precision: bool = False
    inference_batch_size: int = 32
    steps_done: int = 0
    predictions: PredictionCache = field(default_factory=PredictionCache)
    corrections: torch.Tensor | None = None

    @property
    def num_target(self) -> int:
        return int(self.target_inputs.shape[0])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target inputs and their valid-voxel mask at ``index``, on the device."""
        inputs = self.target_inputs[index].to(self.device, non_blocking=True)
        mask = None if self.valid_mask is None else self.valid_mask[index].to(self.device)
        return inputs, mask

    def autocast(self):
        """Context for a training forward pass: float16 autocast on CUDA if enabled."""
        return autocast(self.device, enabled=self.mixed_precision)

    def predict_target(
        self, model: ModelAdapter | None = None, *, cached: bool = True
    ) -> torch.Tensor:
        """(N, C, ...) probabilities on all target inputs, no gradient, eval mode, on the CPU.

        For the adapted model (the default) the engine's latest evaluation is reused when no
        step happened since, so a method that refreshes pseudo-labels at the end of an epoch
        costs no extra pass (``cached=False`` forces a pass, e.g. after changing BatchNorm
        statistics without a step). The modules' train/eval modes are restored afterwards.
        """
        model = model or self.model
        adapted = model is self.model
        if adapted and cached:
            latest = self.predictions.at(self.steps_done)
            if latest is not None:
                return latest
        with preserved_modes(model.network):
            probabilities = predict_batches(
                model, self.target_inputs, device=self.device, batch_size=self.inference_batch_size
            )
        if adapted:
            self.remember_prediction(probabilities)
        return probabilities

    def remember_prediction(self, probabilities: torch.Tensor, step: int | None = None) -> None:
        """Record the adapted model's (N, C, ...) probabilities on all target inputs (CPU, as
        :meth:`predict_target` returns them) after ``step`` (default: the steps done so far).

        A method that predicts the whole target anyway at the end of an epoch (UDAS's
        agreement pass) records it with the step's number, so the engine's evaluation after
        that step reuses it instead of predicting again."""
        self.predictions.remember(self.steps_done if step is None else step, probabilities)

    def target_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Indices of one shuffled epoch over the target inputs, in batches."""
        order = torch.randperm(self.num_target, generator=self.generator)
        for start in range(0, self.num_target, batch_size):
            yield order[start : start + batch_size]

    def source_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A random batch (images, labels) of the source pack on the device, or None."""
        if self.source_pack is None or len(self.source_pack) == 0:
            return None
        index = torch.randint(len(self.source_pack), (batch_size,), generator=self.generator)
        return (
            self.source_pack.images[index].to(self.device),
            self.source_pack.labels[index].to(self.device),
        )


class AdaptationMethod(ABC):
    """Base class of all methods. Subclasses set the class attributes and implement the hooks.

    Class attributes:
        name: registry key used by the CLI (``--method``) and the UI.
        title: human name.
        summary: one line on what it does.
        reference: the paper.
        Settings: the typed settings dataclass (subclass of :class:`CommonSettings`).
        requires: capabilities the model must have (all of them).
        requires_any: capabilities of which the model must have at least one (empty: none).
        uses_source_data: whether the method reads source images when present.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    Settings: ClassVar[type[CommonSettings]] = CommonSettings
    requires: ClassVar[frozenset[str]] = frozenset()
    requires_any: ClassVar[frozenset[str]] = frozenset()
    uses_source_data: ClassVar[bool] = False
    #: True for a method that is itself the correction step (``corrections``).
    needs_corrections: ClassVar[bool] = False
    #: One line on why the method cannot combine with corrections ("" : it can).
    corrections_unsupported: ClassVar[str] = ""

    def __init__(self, settings: CommonSettings, context: AdaptationContext):
        self.settings = settings
        self.context = context
        self.optimizer: torch.optim.Optimizer | None = None
        self.correction_step = None

    # -- what the engine calls ----------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.context.num_target / self.settings.batch_size))

    def total_steps(self) -> int:
        return self.steps_per_epoch() * self.settings.epochs

    @abstractmethod
    def setup(self) -> None:
        """Prepare parameters, optimiser and anything computed once."""

    @abstractmethod
    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        """One optimiser step on the target inputs at ``batch_index``."""

    def attach_corrections(self, settings) -> None:
        """Called by the engine after :meth:`setup` when the run has corrections: from then on
        :meth:`run_step` adds one :class:`~.corrections.CorrectionStep` (with ``settings``, a
        :class:`~.corrections.CorrectionSettings`) after every step of the method."""
        from .corrections import CorrectionStep

        if self.corrections_unsupported:
            raise ValueError(f"{self.name} cannot use corrections: {self.corrections_unsupported}")
        if not self.needs_corrections:  # the corrections method runs the step itself
            self.correction_step = CorrectionStep(self.context, settings)

    def run_step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        """:meth:`step`, then the correction step if attached (its losses join the output's;
        ``total`` becomes the sum of both totals)."""
        output = self.step(batch_index, step)
        if self.correction_step is not None:
            extra = self.correction_step.step(batch_index, self.settings.batch_size)
            total = output.losses.get("total", 0.0) + extra["corrections_total"]
            merged = {**output.losses, **extra}
            merged.pop("total", None)
            output.losses = {"total": total, **merged}
        return output

    def epoch_batches(self) -> list[torch.Tensor]:
        """The batches of one epoch (default: one shuffled pass over the target inputs)."""
        return list(self.context.target_batches(self.settings.batch_size))

    def finished(self, epoch: int, agreement: float | None) -> str | None:
        """After each epoch: a reason to stop early, or None to go on."""
        return None

    def end_epoch(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Called after each epoch (e.g. to refresh pseudo-labels)."""

    def finish(self) -> None:  # noqa: B027 - optional hook
        """Called once after the last step (also after a stop), before the engine restores the
        kept checkpoint: undo temporary changes to the model (e.g. BatchNorm momentum)."""

    def report(self) -> dict[str, Any]:
        """JSON-able facts about the run for ``AdaptationResult.extra`` (e.g. which prior)."""
        return {}

    # -- helpers for subclasses -----------------------------------------------------------------
    def select_trainable(self, group: str = "all") -> list[nn.Parameter]:
        """Freeze every parameter except the model's parameter group ``group`` and return it.

        Gradients are then computed only where parameters change. Groups come from
        :meth:`ModelAdapter.parameter_groups` (``all``, ``norm``, ``early``, ...).
        """
        groups = self.context.model.parameter_groups()
        if group not in groups or not groups[group]:
            known = ", ".join(name for name, params in groups.items() if params)
            raise ValueError(f"this model has no {group!r} parameters; it has: {known}")
        self.context.model.network.requires_grad_(False)
        parameters = groups[group]
        for parameter in parameters:
            parameter.requires_grad_(True)
        return parameters

    def make_adam(self, parameters, learning_rate: float | None = None) -> torch.optim.Adam:
        """An Adam optimiser (the methods' default) stored as :attr:`optimizer`."""
        rate = self.settings.learning_rate if learning_rate is None else learning_rate
        self.optimizer = torch.optim.Adam(parameters, lr=rate)
        return self.optimizer

    def source_loss(
        self,
        terms: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
        enabled: bool = True,
    ) -> tuple[torch.Tensor | float, dict[str, float]]:
        """Loss terms on one random batch of labelled source-pack slices.

        ``terms(images, labels)`` returns named loss tensors (the images and labels are on the
        device); the result is their sum and their values for the step's losses, or
        ``(0.0, {})`` when the model has no source pack or ``enabled`` is False, so that
        ``total = total + weight * source`` needs no branch.
        """
        source = self.context.source_batch(self.settings.batch_size) if enabled else None
        if source is None:
            return 0.0, {}
        named = terms(*source)
        total = sum(named.values())
        return total, {name: float(value.detach()) for name, value in named.items()}

    def optimise(self, loss: torch.Tensor) -> None:
        """Zero the gradients, back-propagate ``loss`` (scaled under mixed precision) and step."""
        if self.optimizer is None:
            raise RuntimeError("call make_adam (or set self.optimizer) in setup() first")
        scaler = getattr(self, "_grad_scaler", None)
        if scaler is None:
            enabled = self.context.mixed_precision and self.context.device.type == "cuda"
            scaler = self._grad_scaler = torch.amp.GradScaler("cuda", enabled=enabled)
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(self.optimizer)
        scaler.update()

    @classmethod
    def unmet_needs(cls, capabilities: set[str]) -> list[str]:
        """Human reasons this method cannot run on a model with ``capabilities`` (empty: can)."""
        reasons = [CAPABILITY_REASONS.get(c, c) for c in sorted(cls.requires - capabilities)]
        if cls.requires_any and not (cls.requires_any & capabilities):
            reasons.append(
                " or ".join(CAPABILITY_REASONS.get(c, c) for c in sorted(cls.requires_any))
            )
        return reasons


#: What each capability is, for listings of what a method needs.
CAPABILITY_NAMES = {
    "early_head": "an early segmentation head",
    "bottleneck": "access to the bottleneck features",
    "batchnorm": "BatchNorm layers",
    "norm_affine": "normalisation layers with affine parameters",
    "source_pack": "labelled source slices in the bundle (a source pack)",
    "source_statistics": "source statistics stored in the bundle",
}

#: Why a model lacking a capability cannot be adapted by a method that needs it.
CAPABILITY_REASONS = {
    "early_head": "needs a model with an early segmentation head (UDAS bundles have one)",
    "bottleneck": "needs access to the model's bottleneck features",
    "batchnorm": (
        "needs BatchNorm layers to re-estimate on the target, and this model has none "
        "(it normalises with GroupNorm, InstanceNorm or nothing)"
    ),
    "norm_affine": (
        "needs normalisation layers with affine (scale and shift) parameters, and this model "
        "has none"
    ),
    "source_pack": "needs labelled source slices in the bundle (a source pack)",
    "source_statistics": "needs source statistics stored in the bundle",
}

_REGISTRY: dict[str, type[AdaptationMethod]] = {}


def register(cls: type[AdaptationMethod]) -> type[AdaptationMethod]:
    """Class decorator that adds a method to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods are called {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[AdaptationMethod]]:
    """All registered methods by name (importing the built-in ones first)."""
    from . import methods  # noqa: F401  (registers the built-in methods)

    return dict(_REGISTRY)


def get_method(name: str) -> type[AdaptationMethod]:
    methods = available_methods()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; methods are: {', '.join(sorted(methods))}")
    return methods[name]
