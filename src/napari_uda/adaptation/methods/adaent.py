"""AdaEnt: source-free entropy minimisation guided by a class-ratio prior (Bateson et al.).

Bateson, Kervadec, Dolz, Lombaert, Ben Ayed. "Source-relaxed domain adaptation for image
segmentation", MICCAI 2020, and "Source-free domain adaptation for image segmentation", Medical
Image Analysis 2022. No source image is used. The loss on target slices is

    mean Shannon entropy of the prediction + lambda * KL(prior || predicted class ratio)

with lambda = 1e-2. The prior keeps entropy minimisation from the trivial solution (one class
everywhere). Here the predicted class ratio is the mean softmax probability over the voxels of
the batch (the papers use a per-slice prior from an auxiliary network; a scan-level prior over a
batch of slices is its source-free, single-scan counterpart).

Choices made here (documented deviations from the papers): by default only the normalisation
layers' scale and shift are updated (``parameters="norm"``, Adam lr 1e-3, as TENT) and
BatchNorm uses the target's statistics. Updating the whole network on a single scan
(``parameters="all"``, as the papers' code does over a whole target data set) lets the
foreground grow far beyond the organ within one epoch, with the KL term at lambda = 1e-2 too
weak to hold it; the norm-only update stays close to the prior. Five passes over the scan by
default (the papers train for many epochs over many target images). Measured results are in
docs/benchmarks.md.

The prior comes, in this order for ``prior="auto"``: from the user (``class_ratios``), from the
model bundle's source statistics (``class_ratios``, stored by ``napari-uda train``), or from an
estimate: the unadapted model's mean probabilities on the target. Which one was used is shown
in the first event's message and recorded in ``result.extra["prior_source"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...settings import setting
from ..base import AdaptationMethod, CommonSettings, StepOutput, learning_rate_setting, register
from ..losses import class_ratio, entropy_loss, kl_prior_loss, softmax_class_ratio
from ..target_statistics import TargetStatistics


@register
class AdaEnt(AdaptationMethod):
    name = "adaent"
    title = "AdaEnt (entropy + class-ratio prior)"
    summary = (
        "Source-free: minimises the prediction entropy plus a KL term that keeps the predicted "
        "class ratio near a prior (from the bundle, the user or an estimate)."
    )
    reference = (
        "Bateson M, Kervadec H, Dolz J, Lombaert H, Ben Ayed I. Source-relaxed domain "
        "adaptation for image segmentation. MICCAI 2020; Source-free domain adaptation for "
        "image segmentation. Medical Image Analysis 2022."
    )

    @dataclass
    class Settings(CommonSettings):
        """AdaEnt (lambda 1e-2 as in the papers)."""

        epochs: int = setting(5, "Passes over the target slices.", min=1, max=1000)
        batch_size: int = setting(16, "Slices per optimiser step.", min=1, max=512)
        learning_rate: float = learning_rate_setting(
            1e-3, "Adam learning rate (1e-3 for norm-only, as TENT; try 1e-5 for all)."
        )
        kl_weight: float = setting(
            1e-2, "lambda: weight of KL(prior || predicted class ratio).", min=0.0
        )
        prior: Literal["auto", "user", "bundle", "estimate"] = setting(
            "auto",
            "Where the class-ratio prior comes from; auto: class_ratios if given, else the "
            "bundle's source statistics, else an estimate from the unadapted prediction.",
        )
        class_ratios: tuple | None = setting(
            None, "Your class-ratio prior, one number per class (e.g. 0.85,0.15)."
        )
        target_statistics: bool = setting(
            True,
            "Normalise with the target's BatchNorm statistics (training-mode BatchNorm, as in "
            "the papers' code); False keeps the source statistics.",
        )
        parameters: Literal["all", "norm"] = setting(
            "norm",
            "Parameters to update: norm (the normalisation layers' scale and shift, as TENT; "
            "stable on one scan) or all (the whole network, as in the MICCAI 2020 code).",
        )

    def setup(self) -> None:
        context = self.context
        network = context.model.network.to(context.device)
        self.prior, self.prior_source = self._choose_prior()
        self.prior = self.prior.to(context.device)
        self.make_adam(self.select_trainable(self.settings.parameters))
        network.eval()  # dropout off
        self.statistics = TargetStatistics(network) if self.settings.target_statistics else None
        if self.statistics is not None:
            self.statistics.start()
        self.steps_in_epoch = self.steps_per_epoch()

    def _choose_prior(self) -> tuple[torch.Tensor, str]:
        settings, context = self.settings, self.context
        num_classes = context.model.num_classes
        wanted = settings.prior
        if wanted in ("auto", "user") and settings.class_ratios:
            ratios = [float(v) for v in settings.class_ratios]
            if len(ratios) != num_classes or min(ratios) < 0 or sum(ratios) <= 0:
                raise ValueError(
                    f"class_ratios needs {num_classes} non-negative numbers, got {ratios}"
                )
            return torch.tensor(ratios) / sum(ratios), "user"
        if wanted == "user":
            raise ValueError("prior=user needs class_ratios (e.g. class_ratios=0.85,0.15)")
        stored = (context.model.source_statistics() or {}).get("class_ratios")
        if isinstance(stored, dict):
            stored = [stored.get(name) for name in context.model.class_names]
        usable = stored is not None and len(stored) == num_classes and None not in stored
        if wanted in ("auto", "bundle") and usable:
            ratios = torch.tensor([float(v) for v in stored])
            return ratios / ratios.sum(), "bundle"
        if wanted == "bundle":
            raise ValueError("prior=bundle, but the model stores no class_ratios")
        return class_ratio(context.initial_probabilities, context.valid_mask), "estimate"

    def step(self, batch_index: torch.Tensor, step: int) -> StepOutput:
        if self.statistics is not None and step > 1 and (step - 1) % self.steps_in_epoch == 0:
            self.statistics.restart()
        inputs, mask = self.context.batch(batch_index)
        with self.context.autocast():
            logits = self.context.model.forward(inputs).logits
        entropy = entropy_loss(logits, mask)
        predicted = softmax_class_ratio(logits, mask)
        kl = kl_prior_loss(self.prior, predicted)
        loss = entropy + self.settings.kl_weight * kl
        self.optimise(loss)
        message = ""
        if step == 1:
            ratios = ", ".join(f"{v:.3f}" for v in self.prior.tolist())
            message = f"class-ratio prior from {self.prior_source}: {ratios}"
        return StepOutput(
            {"total": loss.item(), "entropy": entropy.item(), "kl_prior": kl.item()},
            message=message,
        )

    def finish(self) -> None:
        if self.statistics is not None:
            self.statistics.finish()

    def report(self) -> dict:
        return {"prior_source": self.prior_source, "prior": self.prior.tolist()}
