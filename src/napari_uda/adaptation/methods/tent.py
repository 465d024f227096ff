"""TENT: test-time entropy minimisation of the normalisation layers (Wang et al. 2021).

Wang, Shelhamer, Liu, Olshausen, Darrell. "Tent: Fully test-time adaptation by entropy
minimization". ICLR 2021. Only the affine (scale and shift) parameters of the normalisation
layers are updated, to minimise the mean Shannon entropy of the target prediction; every other
parameter is frozen (no gradient is computed for it). BatchNorm layers normalise with the
statistics of the current batch, as in the paper. So that the adapted model is an ordinary
model that can be saved and used for prediction, their running statistics are re-estimated on
the target during each epoch (cumulative average). Works with BatchNorm, GroupNorm and
InstanceNorm (any layer with affine parameters).

Defaults: Adam, learning rate 1e-3 (the paper's Adam setting), batch 16 slices. TENT is online
(one pass over the test stream); a single scan gives few batches, so the default is 5 passes
(set ``epochs=1`` for the online setting). Dropout stays off during adaptation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.models.adapter import NORM_AFFINE
from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, learning_rate_setting, register
from ..losses import entropy_loss
from ..target_statistics import TargetStatistics


@register
class Tent(AdaptationMethod):
    name = "tent"
    title = "TENT"
    summary = (
        "Minimises the prediction entropy on the target by updating only the normalisation "
        "layers' scale and shift."
    )
    reference = (
        "Wang D, Shelhamer E, Liu S, Olshausen B, Darrell T. Tent: Fully test-time adaptation "
        "by entropy minimization. ICLR 2021."
    )
    requires = frozenset({NORM_AFFINE})

    @dataclass
    class Settings(CommonSettings):
        """TENT (Adam, lr 1e-3 as in the paper)."""

        epochs: int = setting(
            5, "Passes over the target slices (the paper's online setting is 1).", min=1
        )
        batch_size: int = setting(16, "Slices per optimiser step.", min=2, max=512)
        learning_rate: float = learning_rate_setting(1e-3)

    def setup(self) -> None:
        self.context.model.network.to(self.context.device)
        self.make_adam(self.select_trainable("norm"))
        self.statistics = TargetStatistics(self.context.model.network)
        self.statistics.start()
        self.steps_in_epoch = self.steps_per_epoch()

    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        if step > 1 and (step - 1) % self.steps_in_epoch == 0:
            self.statistics.restart()
        inputs, mask = self.context.batch(batch_index)
        with self.context.autocast():
            logits = self.context.model.forward(inputs).logits
        loss = entropy_loss(logits, mask)
        self.optimise(loss)
        value = float(loss.detach())
        return StepOutput({"total": value, "entropy": value})

    def finish(self) -> None:
        self.statistics.finish()
