"""The adaptation engine: one entry point for the CLI and the napari widgets alike.

:func:`run_adaptation` is a generator. It yields one :class:`AdaptationEvent` per optimiser
step and returns an :class:`AdaptationResult`; :func:`adapt` runs it to the end. The engine

* works on a copy of the user's model (the original is never modified);
* prepares the target volumes with the model's own preprocessing and computes the source
  model's probabilities on them once, with no gradient;
* checks that the model has what the method needs, then calls the method's hooks;
* honours ``should_stop()`` before every optimiser step;
* evaluates label-free signals (mean normalised entropy, change since the start, foreground
  fraction per class, agreement Dice) with a no-grad pass, once per epoch by default, and Dice
  against a reference mask when one is given (QA only: never used for training);
* guards against collapse: :class:`~napari_uda.adaptation.guard.CollapseGuard` applies
  label-free rules (foreground vanishing, exploding or drifting slowly away from the start and
  the prior, entropy collapse, the method's smoothed agreement falling below its early level)
  and the engine keeps a healthy checkpoint (after a collapse, the last one before the drift
  began), so the result is never silently a collapsed model (see :class:`EngineOptions` and
  docs/methods.md).

The pieces, each in its own module: :func:`~napari_uda.adaptation.plan.plan_run` resolves and
checks the method and settings; :class:`~napari_uda.adaptation.targets.TargetSet` prepares and
stacks the volumes; :class:`~napari_uda.adaptation.evaluation.Evaluator` measures;
:class:`~napari_uda.adaptation.checkpoints.CheckpointKeeper` judges and keeps. This module
holds the loop that calls the method and yields the events.

Runs are deterministic on the CPU for a given ``seed`` (the engine seeds torch's global
generator, which dropout uses, and the batch order).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.corrections import NOT_CORRECTED
from ..core.device import resolve_device
from ..core.inference import predict_batches
from ..core.models.adapter import ModelAdapter
from ..core.plausibility import merge_expected
from ..core.volume import Volume
from ..settings import setting, settings_to_dict
from .base import AdaptationContext, AdaptationMethod, StepOutput
from .checkpoints import CheckpointKeeper
from .corrections import CorrectionSettingsInput, resolve_correction_settings
from .evaluation import Evaluator, reference_dice
from .events import AdaptationEvent, AdaptationResult, CheckpointChoice
from .gate import GateOptions, apply_gate, left_right_dim
from .guard import CollapseGuard, GuardOptions, Signals
from .plan import AdaptationError, RunPlan, SettingsInput, plan_run, resolve_settings
from .targets import TargetSet

__all__ = [
    "AdaptationError",
    "EngineOptions",
    "SettingsInput",
    "adapt",
    "resolve_settings",
    "run_adaptation",
]


@dataclass
class EngineOptions(GuardOptions):
    """How the engine runs, evaluates and guards a run (the guard's fields come from
    :class:`~napari_uda.adaptation.guard.GuardOptions`). Defaults suit one-shot adaptation."""

    evaluate_every: int = setting(
        0,
        "Recompute the label-free signals every N steps with a no-grad pass "
        "(0: once per epoch, after its last step).",
        min=0,
    )
    preview_every: int = setting(
        0,
        "Attach a preview segmentation of the first volume to every N-th event (0: none). "
        "A positive preview_every argument of run_adaptation takes precedence.",
        min=0,
    )
    inference_batch_size: int = setting(
        32, "Slices per no-grad forward pass (initial prediction, evaluation).", min=1
    )
    mixed_precision: bool = setting(
        True,
        "float16 autocast with gradient scaling in training steps on CUDA (no effect on CPU or "
        "MPS; no-grad passes use core.inference's autocast on CUDA).",
    )


def _map_corrections(
    targets: TargetSet, corrections: Volume | np.ndarray | None, num_classes: int
) -> tuple[torch.Tensor | None, dict[str, int] | None]:
    """The corrections on the target inputs (-1 where not corrected) and their summary."""
    if corrections is None:
        return None, None
    data = np.asarray(corrections.data if isinstance(corrections, Volume) else corrections)
    values = np.unique(data)
    wrong = values[(values < NOT_CORRECTED) | (values >= num_classes) | (values != np.rint(values))]
    if wrong.size:
        raise AdaptationError(
            f"the corrections hold the value {wrong[0]:g}; use {NOT_CORRECTED} (not corrected) "
            f"or a class from 0 to {num_classes - 1}"
        )
    mapped = targets.labels_on_inputs(corrections, fill=NOT_CORRECTED, what="corrections")
    mapped = mapped.to(torch.int16)  # classes and -1: 2 bytes a voxel, not 8 (256^3: 134 MB)
    if not (data >= 0).any():
        raise AdaptationError("the corrections hold no corrected voxel")
    summary = {
        "voxels": int((data >= 0).sum()),
        "input_voxels": int((mapped >= 0).sum()),
    }
    return mapped, summary


def _prior(model: ModelAdapter) -> list[float] | None:
    """The source class ratios the model's bundle records, one per class (None: unknown)."""
    ratios = (model.source_statistics() or {}).get("class_ratios")
    if isinstance(ratios, dict):
        ratios = [ratios.get(name) for name in model.class_names]
    if not ratios or len(ratios) != model.num_classes or any(r is None for r in ratios):
        return None
    return [float(r) for r in ratios]


@dataclass
class _Run:
    """One run: its pieces (built by :func:`_start_run` before the first step) and its
    progress (steps done, history, why it ended)."""

    model: ModelAdapter
    plan: RunPlan
    options: EngineOptions
    started: float
    targets: TargetSet
    context: AdaptationContext
    method: AdaptationMethod
    evaluator: Evaluator
    keeper: CheckpointKeeper
    total_steps: int
    corrections: dict[str, int] | None = None
    preview_every: int = 0
    steps_done: int = 0
    last_evaluated: int = 0
    agreement: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    stop_reason: str = "completed"

    def evaluate(self, epoch: int) -> list[str]:
        """Evaluate after the steps done and let the keeper judge it; the collapse reasons."""
        self.last_evaluated = self.steps_done
        probabilities, signals = self.evaluator.evaluate()
        return self.keeper.review(self.steps_done, epoch, probabilities, signals)

    def event(self, epoch: int, output: StepOutput | None) -> AdaptationEvent:
        """The event after the steps done (0: the unadapted model) with the latest signals."""
        signals: Signals = self.evaluator.latest
        agreement = self.agreement
        return AdaptationEvent(
            step=self.steps_done,
            total_steps=self.total_steps,
            epoch=epoch,
            losses={} if output is None else {k: float(v) for k, v in output.losses.items()},
            elapsed_seconds=time.perf_counter() - self.started,
            mean_entropy=signals.mean_entropy,
            agreement_dice=agreement if agreement is not None else signals.dice_with_start,
            change_since_start=signals.change_since_start,
            foreground_fraction=list(signals.foreground_fraction),
            reference_dice=signals.reference_dice,
        )

    def first_event(self) -> AdaptationEvent:
        """The unadapted model's event, with its prediction, so a UI can show "before"."""
        event = self.event(0, None)
        event.evaluated, event.message = True, "unadapted model"
        event.preview = self.evaluator.preview_of(self.context.initial_probabilities)
        return event

    def epoch(
        self, epoch: int, should_stop: Callable[[], bool] | None
    ) -> Generator[AdaptationEvent, None, bool]:
        """The steps of one epoch, an event after each; returns whether the run ends here
        (a stop request, a collapse with ``stop_on_collapse``, or the method converged)."""
        batches = self.method.epoch_batches()
        for number, index in enumerate(batches, start=1):
            if should_stop is not None and should_stop():
                self.stopped, self.stop_reason = True, "stopped by user"
                return True
            output = self.method.run_step(index, self.steps_done + 1)
            self.steps_done = self.context.steps_done = self.steps_done + 1
            yield self._after_step(epoch, output, last_of_epoch=number == len(batches))
            if self.keeper.collapse is not None and self.options.stop_on_collapse:
                self.stop_reason = f"collapse detected at step {self.keeper.collapse['step']}"
                return True
        self.method.end_epoch(epoch)
        converged = self.method.finished(epoch, self.agreement)
        if converged:
            self.stop_reason = f"converged: {converged}"
        return bool(converged)

    def _after_step(self, epoch: int, output: StepOutput, last_of_epoch: bool) -> AdaptationEvent:
        """Note the step's agreement, evaluate when due, and make (and record) its event."""
        step, every = self.steps_done, self.options.evaluate_every
        messages = [output.message] if output.message else []
        if output.agreement is not None:
            self.agreement = float(output.agreement)
            self.keeper.note_agreement(self.agreement)
        evaluated = (step % every == 0 if every else last_of_epoch) or step == self.total_steps
        if evaluated:
            reasons = self.evaluate(epoch)
            if reasons:
                messages.append(self.keeper.collapse_message(reasons))
        event = self.event(epoch, output)
        event.evaluated, event.message = evaluated, "; ".join(messages)
        if self.preview_every and step % self.preview_every == 0:
            event.preview = self.evaluator.preview(evaluated=evaluated)
        self.history.append(event.to_record())
        return event


def _start_run(
    model: ModelAdapter,
    volumes: Volume | Sequence[Volume],
    plan: RunPlan,
    reference: Volume | None,
    corrections: Volume | np.ndarray | None,
    seed: int | None,
    device: torch.device,
    options: EngineOptions,
    correction_settings: CorrectionSettingsInput = None,
) -> _Run:
    """Copy the model, prepare the targets, predict once with the source model, set up (and
    attach the correction step when there are corrections)."""
    started = time.perf_counter()
    if corrections is None and plan.method.needs_corrections:
        raise AdaptationError(
            f"{plan.method.name} needs corrections: correct at least one slice first"
        )
    if corrections is not None:  # the user's labels may move the mask far: no drift rule
        options = dataclasses.replace(options, drift_tolerance=0.0)
    if seed is not None:
        torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    working, frozen = model.clone(), model.clone()
    targets = TargetSet.prepare(working, volumes)
    reference_labels = None
    if reference is not None:
        labels = targets.labels_on_inputs(reference, what="reference mask")
        reference_labels = labels[targets.first]
    corrected, corrections_summary = _map_corrections(targets, corrections, working.num_classes)
    working.network.to(device)
    frozen.network.to(device).eval().requires_grad_(False)
    initial = predict_batches(
        frozen, targets.inputs, device=device, batch_size=options.inference_batch_size
    )
    context = AdaptationContext(
        model=working,
        source_model=frozen,
        target_inputs=targets.inputs,
        device=device,
        generator=generator,
        initial_probabilities=initial,
        source_pack=working.source_pack(),
        valid_mask=targets.valid_mask,
        mixed_precision=options.mixed_precision and device.type == "cuda",
        inference_batch_size=options.inference_batch_size,
        corrections=corrected,
    )
    evaluator = Evaluator(context, targets, reference_labels)
    method = plan.method(plan.settings, context)
    guard = CollapseGuard(
        evaluator.start, _prior(model), options, working.class_names, method.steps_per_epoch()
    )
    keeper = CheckpointKeeper(working.network, initial, guard, options)  # before setup
    method.setup()  # may change buffers (AdaBN and TENT restart BatchNorm statistics)
    if corrected is not None:
        chosen = resolve_correction_settings(plan.method, plan.settings, correction_settings, model)
        try:
            method.attach_corrections(chosen)
        except ValueError as error:
            raise AdaptationError(str(error)) from None
    return _Run(
        model=model,
        plan=plan,
        options=options,
        started=started,
        targets=targets,
        context=context,
        method=method,
        evaluator=evaluator,
        keeper=keeper,
        total_steps=method.total_steps(),
        corrections=corrections_summary,
    )


#: Why a round with corrections is never rolled back (the gate's first reason there).
CORRECTIONS_OUTRANK_GATE = (
    "your corrections outrank the label-free gate, which alone would have kept the model this "
    "round started from"
)


def run_adaptation(
    model: ModelAdapter,
    volumes: Volume | Sequence[Volume],
    method: str | type[AdaptationMethod] | RunPlan,
    settings: SettingsInput = None,
    *,
    reference: Volume | None = None,
    seed: int | None = 0,
    device: str | torch.device = "auto",
    preview_every: int = 0,
    should_stop: Callable[[], bool] | None = None,
    options: EngineOptions | None = None,
    corrections: Volume | np.ndarray | None = None,
    gate: GateOptions | None = None,
    expected_volumes: Mapping[str, tuple[float, float]] | None = None,
    correction_settings: CorrectionSettingsInput = None,
) -> Generator[AdaptationEvent, None, AdaptationResult]:
    """Adapt a copy of ``model`` to ``volumes`` with ``method``; yield events, return the result.

    Args:
        model: the user's model (never modified).
        volumes: one target volume or several (``reference`` and previews concern the first).
        method: a registered method name, a method class, or a :class:`RunPlan` from
            :func:`plan_run` (then ``settings`` is ignored: the plan holds them).
        settings: None (paper defaults), the method's Settings, a dict or ``key=value`` strings.
        reference: a label volume on the first volume's grid, for QA Dice only.
        seed: seeds batch order, augmentation and dropout (None: not seeded). Default 0.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda`` or ``mps``.
        preview_every: attach a preview :class:`Prediction` of the first volume to every N-th
            event (0: ``options.preview_every``, which defaults to none).
        should_stop: polled before every optimiser step; True ends the run (result.stopped).
        options: :class:`EngineOptions` (evaluation, collapse guard, batch size, precision).
        corrections: a label map on the first volume's grid: the user's label where they
            corrected it, :data:`~napari_uda.core.corrections.NOT_CORRECTED` (-1) elsewhere.
            Methods see it as ``AdaptationContext.corrections``; None (default): none. With
            corrections, one correction step follows every step of the method
            (:mod:`~napari_uda.adaptation.corrections`), the guard's drift rule is off and
            the gate only warns.
        correction_settings: the correction step's settings (``CorrectionSettings``, a dict
            or ``corrections_*=value`` strings); ignored for the ``corrections`` method, whose
            own settings hold them. None: defaults with the model's recommendations.
        gate: :class:`~napari_uda.adaptation.gate.GateOptions`: at the end, compare the
            adapted and the unadapted model with label-free signals and roll back when
            adaptation does not look better (``result.gate`` says what and why). None
            (default): not gated; the CLI and the napari widgets always gate.
        expected_volumes: the user's expected volume per class in ml (``{"brain": (1000,
            1800)}``), replacing the model's own ranges, for the gate's volume rules and flags.

    Raises:
        AdaptationError: the model lacks what the method needs, bad settings, reference or
            corrections.
    """
    options = options or EngineOptions()
    plan = method if isinstance(method, RunPlan) else plan_run(model, method, settings)
    device = resolve_device(device) if isinstance(device, str) else device
    run = _start_run(
        model, volumes, plan, reference, corrections, seed, device, options, correction_settings
    )
    run.preview_every = preview_every or options.preview_every
    yield run.first_event()
    for epoch in range(1, plan.settings.epochs + 1):
        if (yield from run.epoch(epoch, should_stop)):
            break
    run.method.finish()
    if run.steps_done > run.last_evaluated:
        run.evaluate(epoch)
    result = _result(run, reference, seed, device)
    if gate is not None:
        if corrections is not None:  # the user's labels outrank the label-free gate: it warns
            gate = dataclasses.replace(gate, gate=False, off_reason=CORRECTIONS_OUTRANK_GATE)
        _gate_result(run, result, gate, expected_volumes, device, seed)
    return result


def _gate_result(
    run: _Run,
    result: AdaptationResult,
    options: GateOptions,
    expected: Mapping[str, tuple[float, float]] | None,
    device: torch.device,
    seed: int | None,
) -> None:
    """The keep-or-roll-back gate on the finished run, reusing its prepared inputs and both
    models' probabilities (:func:`~napari_uda.adaptation.gate.apply_gate`)."""
    kept, _ = run.keeper.final()
    apply_gate(
        result,
        run.context.source_model,
        expected=merge_expected(run.model.expected_volumes(), dict(expected or {})),
        options=options,
        device=device,
        inputs=run.targets.inputs,
        valid=run.targets.valid,
        source_probabilities=run.context.initial_probabilities,
        adapted_probabilities=kept.probabilities,
        lr_dim=left_right_dim(run.targets.prepared[0]),
        seed=seed or 0,
    )


def _result(
    run: _Run,
    reference: Volume | None,
    seed: int | None,
    device: torch.device,
) -> AdaptationResult:
    """Restore the kept checkpoint into the working copy and describe the run."""
    kept, reason = run.keeper.final()
    working = run.context.model
    working.network.load_state_dict(kept.state)
    working.network.requires_grad_(True)
    working.network.eval().to("cpu")
    predictions = run.targets.predictions(kept.probabilities)
    initial_predictions = run.targets.predictions(run.context.initial_probabilities)
    before = after = None
    if reference is not None:
        before = reference_dice(initial_predictions[0], reference, working.num_classes)
        after = reference_dice(predictions[0], reference, working.num_classes)
    plan = run.plan
    method_report = run.method.report()
    return AdaptationResult(
        model=working,
        prediction=predictions[0],
        initial_prediction=initial_predictions[0],
        history=run.history,
        checkpoint=CheckpointChoice(kept.step, reason, kept.signals.mean_entropy),
        stopped=run.stopped,
        stop_reason=run.stop_reason,
        seconds=time.perf_counter() - run.started,
        method=plan.method.name,
        settings=settings_to_dict(plan.settings),
        seed=seed,
        device=str(device),
        reference_dice_before=before,
        reference_dice_after=after,
        extra={
            "steps_done": run.steps_done,
            "steps_per_epoch": run.method.steps_per_epoch(),
            "initial_signals": dataclasses.asdict(run.evaluator.start),
            "kept_signals": dataclasses.asdict(kept.signals),
            "final_signals": dataclasses.asdict(run.evaluator.latest),
            "collapse": run.keeper.collapse,
            "collapse_guard": run.keeper.guard.report(),
            "prior_class_ratios": run.keeper.guard.prior,
            "model_recommended_settings": plan.recommended,
            "engine_options": dataclasses.asdict(run.options),
            **method_report,
            "corrections": _corrections_report(run, method_report),
        },
        predictions=predictions,
        initial_predictions=initial_predictions,
    )


def _corrections_report(run: _Run, method_report: dict[str, Any]) -> dict[str, Any] | None:
    """The engine's summary of the corrections with the correction step's facts (reported
    by the step the engine attached, or by a method that is the step itself), or None."""
    if run.corrections is None:
        return None
    step = run.method.correction_step
    facts = step.report() if step is not None else method_report
    return {**run.corrections, **facts.get("corrections", {})}


def adapt(
    model: ModelAdapter,
    volumes: Volume | Sequence[Volume],
    method: str | type[AdaptationMethod] | RunPlan,
    settings: SettingsInput = None,
    *,
    on_event: Callable[[AdaptationEvent], None] | None = None,
    **kwargs,
) -> AdaptationResult:
    """Run :func:`run_adaptation` to the end (calling ``on_event`` per event); the result."""
    run = run_adaptation(model, volumes, method, settings, **kwargs)
    while True:
        try:
            event = next(run)
        except StopIteration as finished:
            return finished.value
        if on_event is not None:
            on_event(event)
