"""Corrections only: learn from the slices the user corrected, with no label-free loss.

Each step is one :class:`~napari_uda.adaptation.corrections.CorrectionStep` (supervised
cross-entropy and Dice on the corrected voxels, an anchor to the round's starting model on
confident voxels far from every correction). With ``target_statistics`` (default) a model with
BatchNorm first re-estimates its statistics on the target, once, with no gradient (as AdaBN), and
the anchor then follows that model's prediction; models without BatchNorm are unaffected.

Needs corrections (``run_adaptation(..., corrections=...)``, ``napari-uda adapt --corrections``).
The engine evaluates once per epoch; an epoch here is ``steps_per_epoch`` correction steps, so a
3D model (one input per scan) is not re-predicted after every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, register
from ..corrections import NOT_CORRECTED, CorrectionSettings, CorrectionStep
from ..target_statistics import TargetStatistics


@dataclass
class CorrectionsOnlySettings(CorrectionSettings, CommonSettings):
    """Corrections only: the correction step's settings plus how long to run."""

    epochs: int = setting(
        2, "Evaluations of the whole scan (each after steps_per_epoch steps).", min=1, max=1000
    )
    steps_per_epoch: int = setting(5, "Correction steps between two evaluations.", min=1, max=1000)
    batch_size: int = setting(
        8, "Items per step (2D: slices, at most half of them corrected ones).", min=1, max=512
    )
    learning_rate: float = setting(
        0.0, "Not used: the step uses corrections_learning_rate.", min=0.0, hidden=True
    )
    target_statistics: bool = setting(
        True,
        "Re-estimate BatchNorm statistics on the target once before training (as AdaBN); no "
        "effect on models without BatchNorm.",
    )


@register
class CorrectionsOnly(AdaptationMethod):
    name = "corrections"
    title = "Corrections only"
    summary = (
        "Learns from the slices you corrected (cross-entropy and Dice there), anchored to the "
        "model on confident voxels far from your corrections; no label-free loss."
    )
    reference = (
        "Supervised fine-tuning on user corrections (interactive test-time adaptation), as in "
        "'You Point, I Learn' and HiTTA; see docs/corrections.md."
    )
    Settings = CorrectionsOnlySettings
    needs_corrections = True

    settings: CorrectionsOnlySettings

    def steps_per_epoch(self) -> int:
        return self.settings.steps_per_epoch

    def epoch_batches(self) -> list[torch.Tensor]:
        """``steps_per_epoch`` random batches of target items (the correction step puts the
        corrected ones first)."""
        count, size = self.context.num_target, self.settings.batch_size
        generator = self.context.generator
        return [
            torch.randperm(count, generator=generator)[:size] for _ in range(self.steps_per_epoch())
        ]

    def setup(self) -> None:
        context, settings = self.context, self.settings
        network = context.model.network.to(context.device)
        starting, self.target_statistics_used = None, False
        if settings.target_statistics:
            statistics = TargetStatistics(network)
            statistics.start()
            estimate = statistics.layer_count > 0
            if estimate:
                statistics.estimate(context, max(settings.batch_size, context.inference_batch_size))
            statistics.finish()
            network.eval()
            if estimate:  # the anchor follows the model with the target's statistics
                starting, self.target_statistics_used = context.predict_target(cached=False), True
        network.eval()
        self.correction = CorrectionStep(context, settings, starting)

    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        losses = self.correction.step(batch_index, self.settings.batch_size)
        return StepOutput(
            {"total": losses.pop("corrections_total"), **losses},
            agreement=self.correction.last_fit,
        )

    def report(self) -> dict:
        corrected = int((self.context.corrections != NOT_CORRECTED).sum())
        return {
            **self.correction.report(),
            "corrections_target_statistics": self.target_statistics_used,
            "corrected_voxels": corrected,
        }
