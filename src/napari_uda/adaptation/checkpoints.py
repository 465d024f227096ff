"""Which weights a run returns: the collapse guard's verdicts and the checkpoint policy.

The :class:`CheckpointKeeper` receives every evaluation (its signals and probabilities) and
the method's per-step agreement values. It asks the :class:`~napari_uda.adaptation.guard.
CollapseGuard` for reasons and keeps a copy of the weights by the policy of
:class:`~napari_uda.adaptation.guard.GuardOptions`:

* ``last_healthy`` (default): the latest healthy evaluation; after a collapse, the latest one
  whose drift stayed within half ``drift_tolerance`` (the *onset* of the drift), since the
  evaluations just before a collapse are often already on their way down;
* ``lowest_entropy``: the healthy evaluation with the lowest mean entropy.

After a collapse nothing more is kept. Before the first evaluation the unadapted model is kept
(copied before the method's setup, which may change buffers such as BatchNorm statistics).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .guard import CollapseGuard, GuardOptions, Signals


@dataclass
class Checkpoint:
    """Weights kept at an evaluation, with its probabilities, signals and why it was kept."""

    step: int
    state: dict[str, torch.Tensor]
    probabilities: torch.Tensor
    signals: Signals
    reason: str


def state_copy(network: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


class CheckpointKeeper:
    """The kept checkpoint and the collapse record of one run.

    Args:
        network: the network being adapted (its state is copied, never changed here).
        initial_probabilities: the unadapted model's probabilities on the target.
        guard: the run's collapse guard.
        options: the guard's options (policy and whether to guard at all).

    Attributes:
        kept: the checkpoint the policy keeps so far.
        onset: the latest healthy checkpoint whose drift was within half the tolerance.
        collapse: ``{"step": n, "reasons": [...]}`` of the first collapse, or None.
    """

    def __init__(
        self,
        network: nn.Module,
        initial_probabilities: torch.Tensor,
        guard: CollapseGuard,
        options: GuardOptions,
    ):
        self.network, self.guard, self.options = network, guard, options
        self.kept = Checkpoint(
            0, state_copy(network), initial_probabilities, guard.start, "the unadapted model"
        )
        self.onset = self.kept
        self.collapse: dict[str, Any] | None = None
        self._agreements: list[float] = []

    @property
    def last_healthy(self) -> bool:
        return self.options.checkpoint_policy == "last_healthy"

    def note_agreement(self, agreement: float) -> None:
        """Record a step's agreement Dice (the guard sees them at the next evaluation)."""
        self._agreements.append(agreement)

    def review(
        self, step: int, epoch: int, probabilities: torch.Tensor, signals: Signals
    ) -> list[str]:
        """Judge an evaluation after ``step`` in ``epoch``; keep it if the policy says so.
        Returns the collapse reasons (empty: healthy)."""
        reasons = self.guard.check(signals, epoch, self._agreements)
        self._agreements.clear()
        if reasons:
            self.collapse = self.collapse or {"step": step, "reasons": reasons}
        elif self.collapse is None:
            self._consider(step, probabilities, signals)
        return reasons

    def _consider(self, step: int, probabilities: torch.Tensor, signals: Signals) -> None:
        if self.last_healthy:
            reason = "last healthy evaluation"
        elif signals.mean_entropy <= self.kept.signals.mean_entropy:
            reason = "lowest mean entropy among healthy evaluations"
        else:
            return
        self.kept = Checkpoint(step, state_copy(self.network), probabilities, signals, reason)
        if self.last_healthy and self.guard.settled():
            self.onset = dataclasses.replace(
                self.kept, reason="last healthy evaluation before the drift began"
            )

    def _choice(self) -> Checkpoint:
        return self.onset if self.collapse is not None and self.last_healthy else self.kept

    def collapse_message(self, reasons: list[str]) -> str:
        """The event message of an evaluation that found collapse."""
        return f"collapse detected: {'; '.join(reasons)}; keeping step {self._choice().step}"

    def final(self) -> tuple[Checkpoint, str]:
        """The checkpoint the run returns, and why (for the result)."""
        kept = self._choice()
        if self.collapse is None:
            return kept, kept.reason if kept.step else "the unadapted model"
        reasons = "; ".join(self.collapse["reasons"])
        return kept, (
            f"collapse detected at step {self.collapse['step']} ({reasons}); "
            f"kept {kept.reason} (step {kept.step})"
        )
