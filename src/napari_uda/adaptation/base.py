"""The interface every adaptation method implements, and the registry that lists them.

A method is a class with a typed ``Settings`` dataclass (paper defaults, every field documented
with :func:`napari_uda.settings.setting`), the capabilities it ``requires`` from a model (see
:mod:`napari_uda.core.models.adapter`), and three hooks the engine calls:

* :meth:`AdaptationMethod.setup` once, before the first step (copy teachers, choose trainable
  parameters, build the optimiser, compute things that need no gradient);
* :meth:`AdaptationMethod.step` once per optimiser step; returns the losses of that step;
* :meth:`AdaptationMethod.finished` after each epoch, to stop early (UDAS's convergence rule).

The engine (:mod:`napari_uda.adaptation.engine`) owns the loop, cancellation, evaluation,
events, the collapse guard and checkpoints; methods own only their losses and updates.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..core.models.adapter import ModelAdapter
from ..core.models.bundle import SourcePack
from ..settings import setting


@dataclass
class CommonSettings:
    """Settings every method shares (each method's Settings subclasses this).

    Attributes are documented in their ``help`` metadata.
    """

    epochs: int = setting(10, "Passes over the target slices.", min=1, max=1000)
    batch_size: int = setting(16, "Slices per optimiser step.", min=1, max=512)
    learning_rate: float = setting(1e-4, "Adam learning rate.", min=1e-7, max=1.0)


@dataclass
class StepOutput:
    """What one optimiser step reports: named losses (``total`` first) and optionally a
    method-specific label-free agreement Dice (e.g. student/teacher, early/final)."""

    losses: dict[str, float]
    agreement: float | None = None


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
    """

    model: ModelAdapter
    source_model: ModelAdapter
    target_inputs: torch.Tensor
    device: torch.device
    generator: torch.Generator
    initial_probabilities: torch.Tensor
    source_pack: SourcePack | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_target(self) -> int:
        return int(self.target_inputs.shape[0])

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

    def __init__(self, settings: CommonSettings, context: AdaptationContext):
        self.settings = settings
        self.context = context
        self.optimizer: torch.optim.Optimizer | None = None

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

    def finished(self, epoch: int, agreement: float | None) -> str | None:
        """After each epoch: a reason to stop early, or None to go on."""
        return None

    def end_epoch(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Called after each epoch (e.g. to refresh pseudo-labels)."""

    # -- helpers for subclasses -----------------------------------------------------------------
    @classmethod
    def unmet_needs(cls, capabilities: set[str]) -> list[str]:
        """Human reasons this method cannot run on a model with ``capabilities`` (empty: can)."""
        reasons = [CAPABILITY_REASONS.get(c, c) for c in sorted(cls.requires - capabilities)]
        if cls.requires_any and not (cls.requires_any & capabilities):
            reasons.append(
                " or ".join(CAPABILITY_REASONS.get(c, c) for c in sorted(cls.requires_any))
            )
        return reasons


CAPABILITY_REASONS = {
    "early_head": "needs a model with an early segmentation head (UDAS bundles have one)",
    "bottleneck": "needs access to the model's bottleneck features",
    "batchnorm": "needs BatchNorm layers (this model has none to re-estimate)",
    "norm_affine": "needs normalisation layers with affine parameters",
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
