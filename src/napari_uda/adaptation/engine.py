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

Runs are deterministic on the CPU for a given ``seed`` (the engine seeds torch's global
generator, which dropout uses, and the batch order).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..core.device import resolve_device
from ..core.inference import Prediction, predict_batches
from ..core.metrics import dice_per_class
from ..core.models.adapter import ModelAdapter
from ..core.preprocessing import PreparedVolume
from ..core.volume import Volume
from ..settings import apply_overrides, check_value, describe, setting, settings_to_dict
from .base import (
    AdaptationContext,
    AdaptationMethod,
    CommonSettings,
    fraction_setting,
    get_method,
    preserved_modes,
)
from .events import AdaptationEvent, AdaptationResult, CheckpointChoice
from .guard import CollapseGuard, Signals, compute_signals

SettingsInput = CommonSettings | dict[str, Any] | Sequence[str] | None


class AdaptationError(ValueError):
    """A run that cannot start (unmet needs, bad settings, mismatched reference); one line."""


@dataclass
class EngineOptions:
    """How the engine runs, evaluates and guards a run. Defaults suit one-shot adaptation."""

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
    collapse_guard: bool = setting(
        True,
        "Watch the label-free signals for collapse (vanish, explode, drift, entropy, agreement "
        "rules) and keep a healthy checkpoint.",
    )
    stop_on_collapse: bool = setting(True, "End the run as soon as collapse is detected.")
    checkpoint_policy: Literal["last_healthy", "lowest_entropy"] = setting(
        "last_healthy",
        "Which healthy evaluation to keep: the latest one (after a collapse, the latest whose "
        "drift stayed within half drift_tolerance: the onset of the drift), or the one with "
        "the lowest mean entropy.",
    )
    foreground_vanish_ratio: float = fraction_setting(
        0.2,
        "Vanish: collapse when a foreground class's predicted fraction falls below this times "
        "the smaller of its fraction at the start and its source prior.",
    )
    foreground_explode_ratio: float = setting(
        3.0,
        "Explode: collapse when a foreground class's predicted fraction exceeds this times the "
        "larger of its fraction at the start, its source prior and min_reference_fraction.",
        min=1.0,
    )
    min_reference_fraction: float = fraction_setting(
        0.01,
        "Floor of the reference fraction in the explosion and drift tests (classes smaller "
        "than this are not tested for a downward drift).",
    )
    drift_tolerance: float = setting(
        0.1,
        "Drift (slow, cumulative): after the first epoch, collapse when a foreground class's "
        "fraction lies more than this (relative: 0.1 = 10 % above the top or below the "
        "bottom) outside the range of its fraction at the start, its source prior and its "
        "fractions during the first epoch (0: off).",
        min=0.0,
        max=10.0,
    )
    entropy_collapse_ratio: float = fraction_setting(
        0.05, "Entropy collapse: mean entropy below this times its value at the start ..."
    )
    entropy_collapse_agreement: float = fraction_setting(
        0.3, "... together with a Dice between the current and the initial segmentation below this."
    )
    agreement_smoothing: int = setting(
        3,
        "Epochs averaged into the smoothed agreement: the mean of the method's per-step "
        "agreement Dice over the last this many epochs' steps (independent of evaluate_every).",
        min=1,
        max=100,
    )
    agreement_drop_ratio: float = fraction_setting(
        0.5,
        "Agreement: collapse when the method's smoothed agreement Dice falls below this times "
        "its early level (its mean over the first epoch's steps; 0: off).",
    )

    def __post_init__(self):
        for spec in describe(type(self)):
            check_value(spec, getattr(self, spec.name))


@dataclass
class _Checkpoint:
    step: int
    state: dict[str, torch.Tensor]
    probabilities: torch.Tensor
    signals: Signals
    reason: str


# -- preparation -------------------------------------------------------------------------------
def resolve_settings(
    method_class: type[AdaptationMethod],
    settings: SettingsInput,
    model: ModelAdapter | None = None,
):
    """The method's settings from None (defaults), an instance, a dict or ``key=value`` strings.

    With ``model``, its :meth:`~ModelAdapter.recommended_settings` for the method replace the
    paper defaults beneath the user's own values (e.g. deepbet, which has no normalisation
    parameters, trains its first blocks). An instance is taken as it is.
    """
    defaults = method_class.Settings()
    recommended = model.recommended_settings(method_class.name) if model is not None else {}
    if recommended:
        defaults = apply_overrides(defaults, dict(recommended))
    if settings is None:
        return defaults
    if isinstance(settings, CommonSettings):
        if not isinstance(settings, method_class.Settings):
            raise AdaptationError(
                f"settings of type {type(settings).__name__} do not belong to method "
                f"{method_class.name!r}"
            )
        for spec in describe(type(settings)):
            check_value(spec, getattr(settings, spec.name))
        return dataclasses.replace(settings)
    if isinstance(settings, str):
        settings = [settings]
    return apply_overrides(defaults, settings if isinstance(settings, dict) else list(settings))


def _stack_inputs(
    prepared: list[PreparedVolume],
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, int]]]:
    """All volumes' slices in one tensor (padded to a common size), their valid-voxel mask
    and each volume's slice range."""
    inputs = [p.inputs for p in prepared]
    if inputs[0].dim() != 4:  # 3D windows or whole volumes (padded to a common shape)
        from ..core.models.volumetric import stack_volumes

        try:
            return stack_volumes(prepared)
        except ValueError as error:
            raise AdaptationError(str(error)) from None
    height = max(t.shape[-2] for t in inputs)
    width = max(t.shape[-1] for t in inputs)
    padded, masks, ranges, start = [], [], [], 0
    for volume, tensor in zip(prepared, inputs):
        pad = (0, width - tensor.shape[-1], 0, height - tensor.shape[-2])
        padded.append(F.pad(tensor, pad, value=float(tensor.min())))
        mask = torch.zeros(tensor.shape[0], 1, height, width, dtype=torch.bool)
        valid_h, valid_w = getattr(volume, "padded_hw", tensor.shape[-2:])
        mask[:, :, :valid_h, :valid_w] = True
        masks.append(mask)
        ranges.append((start, start + tensor.shape[0]))
        start += tensor.shape[0]
    return torch.cat(padded), torch.cat(masks), ranges


def _reference_slices(prepared: PreparedVolume, reference: Volume, shape) -> torch.Tensor:
    """The reference mask as (N, H, W) labels aligned with the stacked inputs."""
    if reference.shape != prepared.source.shape:
        raise AdaptationError(
            f"the reference mask's shape {reference.shape} does not match the image's "
            f"{prepared.source.shape}"
        )
    labels = prepared.labels_to_slices(reference)
    pad = (0, shape[-1] - labels.shape[-1], 0, shape[-2] - labels.shape[-2])
    return F.pad(labels, pad, value=0)


def _prior(model: ModelAdapter) -> list[float] | None:
    ratios = (model.source_statistics() or {}).get("class_ratios")
    if isinstance(ratios, dict):
        ratios = [ratios.get(name) for name in model.class_names]
    if not ratios or len(ratios) != model.num_classes or any(r is None for r in ratios):
        return None
    return [float(r) for r in ratios]


# -- evaluation --------------------------------------------------------------------------------
def _source_grid_dice(prediction: Prediction, reference: Volume, num_classes: int) -> list[float]:
    truth = np.rint(np.asarray(reference.data)).astype(np.int64)
    return dice_per_class(prediction.labels.astype(np.int64), truth, num_classes)[1:]


def _state_copy(model: ModelAdapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


# -- the run -----------------------------------------------------------------------------------
def run_adaptation(
    model: ModelAdapter,
    volumes: Volume | Sequence[Volume],
    method: str | type[AdaptationMethod],
    settings: SettingsInput = None,
    *,
    reference: Volume | None = None,
    seed: int | None = 0,
    device: str | torch.device = "auto",
    preview_every: int = 0,
    should_stop: Callable[[], bool] | None = None,
    options: EngineOptions | None = None,
) -> Generator[AdaptationEvent, None, AdaptationResult]:
    """Adapt a copy of ``model`` to ``volumes`` with ``method``; yield events, return the result.

    Args:
        model: the user's model (never modified).
        volumes: one target volume or several (``reference`` and previews concern the first).
        method: a registered method name (or a method class).
        settings: None (paper defaults), the method's Settings, a dict or ``key=value`` strings.
        reference: a label volume on the first volume's grid, for QA Dice only.
        seed: seeds batch order, augmentation and dropout (None: not seeded). Default 0.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda`` or ``mps``.
        preview_every: attach a preview :class:`Prediction` of the first volume to every N-th
            event (0: ``options.preview_every``, which defaults to none).
        should_stop: polled before every optimiser step; True ends the run (result.stopped).
        options: :class:`EngineOptions` (evaluation, collapse guard, batch size, precision).

    Raises:
        AdaptationError: the model lacks what the method needs, bad settings or reference.
    """
    options = options or EngineOptions()
    method_class = get_method(method) if isinstance(method, str) else method
    method_settings = resolve_settings(method_class, settings, model)
    unmet = method_class.unmet_needs(model.capabilities)
    if unmet:
        raise AdaptationError(f"{method_class.name} cannot adapt this model: {'; '.join(unmet)}")
    volumes = [volumes] if isinstance(volumes, Volume) else list(volumes)
    if not volumes:
        raise AdaptationError("no target volume given")
    device = resolve_device(device) if isinstance(device, str) else device
    preview_every = preview_every or options.preview_every
    started = time.perf_counter()
    if seed is not None:
        torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))

    working, frozen = model.clone(), model.clone()
    prepared = [working.prepare(volume) for volume in volumes]
    inputs, valid_mask, ranges = _stack_inputs(prepared)
    valid = (
        valid_mask[:, 0]
        if valid_mask is not None
        else torch.ones(inputs.shape[0], *inputs.shape[2:], dtype=torch.bool)
    )
    reference_labels = (
        None if reference is None else _reference_slices(prepared[0], reference, inputs.shape)
    )
    working.network.to(device)
    frozen.network.to(device).eval().requires_grad_(False)
    initial = predict_batches(
        frozen, inputs, device=device, batch_size=options.inference_batch_size
    )
    initial_labels = initial.argmax(1)
    context = AdaptationContext(
        model=working,
        source_model=frozen,
        target_inputs=inputs,
        device=device,
        generator=generator,
        initial_probabilities=initial,
        source_pack=working.source_pack(),
        valid_mask=valid_mask,
        mixed_precision=options.mixed_precision and device.type == "cuda",
        inference_batch_size=options.inference_batch_size,
    )
    context.remember_prediction(initial)
    start_signals = compute_signals(initial, initial_labels, valid, reference_labels)
    prior = _prior(model)
    # copied before setup, which may change buffers (AdaBN and TENT restart BatchNorm statistics)
    kept = _Checkpoint(0, _state_copy(working), initial, start_signals, "the unadapted model")
    runner = method_class(method_settings, context)
    runner.setup()
    total_steps = runner.total_steps()
    steps_per_epoch = runner.steps_per_epoch()

    step, last_evaluated, signals = 0, 0, start_signals
    stopped, stop_reason, collapse = False, "completed", None
    method_agreement, agreements = None, []
    guard = CollapseGuard(start_signals, prior, options, working.class_names, steps_per_epoch)
    onset = kept  # the latest healthy checkpoint whose drift was within half the tolerance

    def evaluate(epoch: int) -> tuple[Signals, list[str]]:
        nonlocal kept, onset, collapse
        with torch.no_grad():  # reuses a method's own whole-target pass after this step
            probabilities = context.predict_target()
        current = compute_signals(probabilities, initial_labels, valid, reference_labels)
        reasons = guard.check(current, epoch, agreements)
        agreements.clear()
        if reasons:
            collapse = collapse or {"step": step, "reasons": reasons}
        elif collapse is None:  # after a collapse nothing more is kept
            checkpoint = None
            if options.checkpoint_policy == "last_healthy":
                checkpoint = _Checkpoint(
                    step, _state_copy(working), probabilities, current, "last healthy evaluation"
                )
            elif current.mean_entropy <= kept.signals.mean_entropy:
                checkpoint = _Checkpoint(
                    step,
                    _state_copy(working),
                    probabilities,
                    current,
                    "lowest mean entropy among healthy evaluations",
                )
            if checkpoint is not None:
                kept = checkpoint
                if guard.settled() and options.checkpoint_policy == "last_healthy":
                    onset = dataclasses.replace(
                        checkpoint, reason="last healthy evaluation before the drift began"
                    )
        return current, reasons

    def preview(probabilities: torch.Tensor | None) -> Prediction:
        first = slice(*ranges[0])
        if probabilities is None:
            with torch.no_grad(), preserved_modes(working.network):
                part = predict_batches(
                    working,
                    inputs[first],
                    device=device,
                    batch_size=options.inference_batch_size,
                )
        else:
            part = probabilities[first]
        grid = prepared[0].to_source_grid(part)
        return Prediction.from_probabilities(grid, prepared[0].source)

    # step 0: the unadapted model's prediction, so a UI can show "before" without recomputing it
    initial_event = AdaptationEvent(
        step=0,
        total_steps=total_steps,
        epoch=0,
        losses={},
        elapsed_seconds=time.perf_counter() - started,
        mean_entropy=start_signals.mean_entropy,
        agreement_dice=start_signals.dice_with_start,
        change_since_start=0.0,
        foreground_fraction=list(start_signals.foreground_fraction),
        reference_dice=start_signals.reference_dice,
        evaluated=True,
        message="unadapted model",
    )
    initial_event.preview = preview(initial)
    yield initial_event

    history: list[dict[str, Any]] = []
    for epoch in range(1, method_settings.epochs + 1):
        batches = list(context.target_batches(method_settings.batch_size))
        for batch_number, index in enumerate(batches, start=1):
            if should_stop is not None and should_stop():
                stopped, stop_reason = True, "stopped by user"
                break
            output = runner.step(index, step + 1)
            step += 1
            context.steps_done = step
            messages = [output.message] if output.message else []
            if output.agreement is not None:
                method_agreement = float(output.agreement)
                agreements.append(method_agreement)
            end_of_epoch = batch_number == len(batches)
            due = step % options.evaluate_every == 0 if options.evaluate_every else end_of_epoch
            evaluated = due or step == total_steps
            if evaluated:
                signals, reasons = evaluate(epoch)
                last_evaluated = step
                if reasons:
                    keeping = onset if options.checkpoint_policy == "last_healthy" else kept
                    messages.append(
                        f"collapse detected: {'; '.join(reasons)}; keeping step {keeping.step}"
                    )
            event = AdaptationEvent(
                step=step,
                total_steps=total_steps,
                epoch=epoch,
                losses={k: float(v) for k, v in output.losses.items()},
                elapsed_seconds=time.perf_counter() - started,
                mean_entropy=signals.mean_entropy,
                agreement_dice=method_agreement
                if method_agreement is not None
                else signals.dice_with_start,
                change_since_start=signals.change_since_start,
                foreground_fraction=list(signals.foreground_fraction),
                reference_dice=signals.reference_dice,
                evaluated=evaluated,
                message="; ".join(messages),
            )
            if preview_every and step % preview_every == 0:
                latest = context._latest_prediction
                event.preview = preview(latest[1] if evaluated and latest else None)
            history.append(event.to_record())
            yield event
            if collapse is not None and options.stop_on_collapse:
                stop_reason = f"collapse detected at step {collapse['step']}"
                break
        if stopped or (collapse is not None and options.stop_on_collapse):
            break
        runner.end_epoch(epoch)
        reason = runner.finished(epoch, method_agreement)
        if reason:
            stop_reason = f"converged: {reason}"
            break

    runner.finish()
    if step > last_evaluated:
        signals, _ = evaluate(epoch)
    if collapse is not None and options.checkpoint_policy == "last_healthy":
        kept = onset
    reason = kept.reason if kept.step else "the unadapted model"
    if collapse is not None:
        reason = (
            f"collapse detected at step {collapse['step']} "
            f"({'; '.join(collapse['reasons'])}); kept {kept.reason} (step {kept.step})"
        )
    working.network.load_state_dict(kept.state)
    working.network.requires_grad_(True)
    working.network.eval().to("cpu")
    predictions = [
        Prediction.from_probabilities(p.to_source_grid(kept.probabilities[a:b]), p.source)
        for p, (a, b) in zip(prepared, ranges)
    ]
    initial_predictions = [
        Prediction.from_probabilities(p.to_source_grid(initial[a:b]), p.source)
        for p, (a, b) in zip(prepared, ranges)
    ]
    before = after = None
    if reference is not None:
        before = _source_grid_dice(initial_predictions[0], reference, working.num_classes)
        after = _source_grid_dice(predictions[0], reference, working.num_classes)
    return AdaptationResult(
        model=working,
        prediction=predictions[0],
        initial_prediction=initial_predictions[0],
        history=history,
        checkpoint=CheckpointChoice(kept.step, reason, kept.signals.mean_entropy),
        stopped=stopped,
        stop_reason=stop_reason,
        seconds=time.perf_counter() - started,
        method=method_class.name,
        settings=settings_to_dict(method_settings),
        seed=seed,
        device=str(device),
        reference_dice_before=before,
        reference_dice_after=after,
        extra={
            "steps_done": step,
            "steps_per_epoch": steps_per_epoch,
            "initial_signals": dataclasses.asdict(start_signals),
            "kept_signals": dataclasses.asdict(kept.signals),
            "final_signals": dataclasses.asdict(signals),
            "collapse": collapse,
            "collapse_guard": guard.report(),
            "prior_class_ratios": prior,
            "model_recommended_settings": model.recommended_settings(method_class.name),
            "engine_options": dataclasses.asdict(options),
            **runner.report(),
        },
        predictions=predictions,
        initial_predictions=initial_predictions,
    )


def adapt(
    model: ModelAdapter,
    volumes: Volume | Sequence[Volume],
    method: str | type[AdaptationMethod],
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
