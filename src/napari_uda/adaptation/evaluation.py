"""What the engine measures on the target during a run: label-free signals, previews, Dice.

An :class:`Evaluator` knows the target set, the unadapted model's labels and (for QA only) the
reference mask. It evaluates the adapted model with one no-grad pass over every target input,
through :meth:`AdaptationContext.predict_target`, so a pass a method already made after the
same step (UDAS's agreement pass) is reused rather than repeated.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.inference import Prediction, class_labels, predict_batches
from ..core.metrics import dice_per_class
from ..core.volume import Volume
from .base import AdaptationContext, preserved_modes
from .guard import Signals, compute_signals
from .targets import TargetSet


class Evaluator:
    """Signals, previews and reference Dice of one run.

    Args:
        context: the run's context (the adapted model, the initial probabilities, the
            prediction cache it shares with the method).
        targets: the run's target set.
        reference_labels: the reference mask on the first volume's inputs (QA only), or None.

    Attributes:
        start: the unadapted model's signals.
        latest: the signals of the latest evaluation (``start`` until the first).
    """

    def __init__(
        self,
        context: AdaptationContext,
        targets: TargetSet,
        reference_labels: torch.Tensor | None = None,
    ):
        self.context, self.targets = context, targets
        self.reference_labels = compact_labels(reference_labels)
        self.initial_labels = compact_labels(class_labels(context.initial_probabilities))
        context.remember_prediction(context.initial_probabilities)
        self.start = self.latest = self.signals_of(context.initial_probabilities)

    def signals_of(self, probabilities: torch.Tensor) -> Signals:
        """The signals of (N, C, ...) probabilities on every target input."""
        return compute_signals(
            probabilities, self.initial_labels, self.targets.valid, self.reference_labels
        )

    def evaluate(self) -> tuple[torch.Tensor, Signals]:
        """One no-grad pass of the adapted model (or the cached one after this step): its
        probabilities and signals, which become :attr:`latest`."""
        with torch.no_grad():
            probabilities = self.context.predict_target()
        self.latest = self.signals_of(probabilities)
        return probabilities, self.latest

    def preview(self, *, evaluated: bool) -> Prediction:
        """The adapted model's prediction of the first volume: the evaluation of this step
        when there was one, else a no-grad pass over the first volume's inputs only."""
        context = self.context
        latest = context.predictions.at(context.steps_done) if evaluated else None
        return self.preview_of(latest)

    def preview_of(self, probabilities: torch.Tensor | None) -> Prediction:
        """The first volume's prediction from whole-target probabilities (None: predict)."""
        first = self.targets.first
        if probabilities is None:
            context = self.context
            with torch.no_grad(), preserved_modes(context.model.network):
                part = predict_batches(
                    context.model,
                    self.targets.inputs[first],
                    device=context.device,
                    batch_size=context.inference_batch_size,
                )
        else:
            part = probabilities[first]
        return self.targets.prediction(part)


def compact_labels(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Class labels as uint8 when every value fits (one byte per voxel instead of eight for
    the int64 that arg-max gives: 16 MB instead of 134 MB for one 256^3 input)."""
    if labels is None or labels.numel() == 0:
        return labels
    if int(labels.min()) >= 0 and int(labels.max()) <= 255:
        return labels.to(torch.uint8)
    return labels


def reference_dice(prediction: Prediction, reference: Volume, num_classes: int) -> list[float]:
    """Dice per foreground class of a prediction against a reference on its grid."""
    truth = np.rint(np.asarray(reference.data)).astype(np.int64)
    return dice_per_class(prediction.labels.astype(np.int64), truth, num_classes)[1:]
