"""``napari-uda adapt``: adapt a model to new-scanner volumes, write the masks.

Without labels (a label-free ``--method``), or with a few corrected slices of the first image
(``--corrections``, :mod:`.corrections_option`): the model then learns from them (with the
method, or alone when ``--method`` is left out), the written mask keeps them exactly, and the
label-free gate only warns.

Everything is checked before any work starts (files, method, settings, what the model offers,
output paths); on bad input the command prints one line and exits 2 without writing anything.
Progress goes to stderr, one line per epoch. Outputs are written together at the end: all of
them or, on any error or Ctrl-C, none (:class:`~napari_uda.core.outputs.OutputSet`).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import numpy as np

from ..adaptation.report import jsonable, run_metrics, run_report, write_json
from ..adaptation.rounds import corrected_prediction, describe_corrections
from ..core.device import resolve_device
from ..core.models import load_model
from ..core.outputs import OutputSet
from ..core.threads import import_in_background
from ..core.volume import is_nifti_path, load_volume, save_volume
from . import CLIError, add_settings_option, add_threads_option
from .checks import check_reference, load_scan
from .corrections_option import add_corrections_options, load_corrections
from .expected_volume import add_expected_volume_option, expected_volumes, warn_lines


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help="adapt a model to new-scanner volumes without labels",
        description=(
            "Adapt a copy of MODEL to the target image(s) with an unsupervised method and write "
            "the adapted segmentation. See `napari-uda methods` for methods and settings."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model: bundle (.safetensors), TorchScript (.pt + .json), nnU-Net v2 folder, deepbet",
    )
    parser.add_argument(
        "--image", required=True, nargs="+", help="target NIfTI volume(s) from the new scanner"
    )
    parser.add_argument(
        "--method",
        help="adaptation method (see `methods`); default with --corrections: corrections alone",
    )
    add_settings_option(
        parser,
        "settings",
        "a method setting, e.g. --set epochs=5, or a corrections_* setting (repeatable)",
    )
    add_corrections_options(parser)
    parser.add_argument(
        "--out", required=True, nargs="+", help="segmentation NIfTI, one per --image"
    )
    parser.add_argument("--entropy-out", nargs="+", help="entropy map NIfTI, one per --image")
    parser.add_argument(
        "--save-model",
        help=(
            "write the adapted model: a bundle (.safetensors) for bundles, a TorchScript file "
            "(.pt) with its .json spec next to it for TorchScript models and deepbet, a new "
            "folder for nnU-Net models"
        ),
    )
    parser.add_argument("--report", help="write a JSON report (settings, history, checkpoint)")
    parser.add_argument(
        "--reference", help="reference mask of the first image, for QA Dice (never trained on)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda", "mps"),
        help="compute device (default auto: CUDA, then MPS, then CPU)",
    )
    add_expected_volume_option(parser)
    parser.add_argument(
        "--no-gate",
        action="store_true",
        help="keep the adapted model even when the label-free gate finds it no better than the "
        "unadapted one (the decision and volume warnings are still reported)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_threads_option(parser)
    parser.set_defaults(run=run)


def _inputs(args) -> list[str]:
    return [p for p in [args.model, *args.image, args.reference, args.corrections] if p]


def _check_outputs(args, outputs: OutputSet) -> None:
    """Every output path, checked before the work: right suffix and count, distinct, never an
    input, in a folder that can be written (see :class:`~napari_uda.core.outputs.OutputSet`)."""
    for flag, paths in (("--out", args.out), ("--entropy-out", args.entropy_out)):
        if paths is None:
            continue
        if len(paths) != len(args.image):
            raise CLIError(
                f"{flag} needs one path per --image ({len(args.image)}), got {len(paths)}"
            )
        for path in paths:
            if not is_nifti_path(path):
                raise CLIError(f"{flag} {path}: must end in .nii or .nii.gz")
            outputs.add(path, flag)
    if args.report:
        outputs.add(args.report, "--report")


def _check_model_output(args, model, outputs: OutputSet) -> None:
    """``--save-model``: the model can be saved, with that suffix, and none of the files it
    writes (a TorchScript model also writes its .json spec) is an input or another output."""
    from ..core.models import ModelSaveError

    try:
        model.check_save_path(args.save_model)
    except ModelSaveError as error:
        raise CLIError(str(error)) from None
    for path in model.saved_files(args.save_model):
        outputs.add(path, "--save-model")


def _progress_line(event, class_names: list[str]) -> str:
    if event.step == 0:
        parts = [f"before adaptation ({event.total_steps} steps planned)"]
    else:
        parts = [f"epoch {event.epoch}", f"step {event.step}/{event.total_steps}"]
        parts.append(f"loss {event.main_loss:.4f}")
    if event.mean_entropy is not None:
        parts.append(f"entropy {event.mean_entropy:.4f}")
    if event.agreement_dice is not None:
        parts.append(f"agreement {event.agreement_dice:.3f}")
    if event.foreground_fraction:
        fractions = ", ".join(
            f"{name} {fraction:.1%}"
            for name, fraction in zip(class_names[1:], event.foreground_fraction[1:])
        )
        parts.append(f"fraction {fractions}")
    if event.reference_dice is not None:
        parts.append("Dice " + ", ".join(f"{d:.3f}" for d in event.reference_dice))
    parts.append(f"{event.elapsed_seconds:.1f} s")
    return "  ".join(parts)


def split_settings(method, settings: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` items for the method and ``corrections_*`` items for the correction step (a
    method that is the correction step, ``corrections``, takes them all)."""
    if method.needs_corrections:
        return list(settings), []
    mine = [item for item in settings if item.strip().startswith("corrections_")]
    return [item for item in settings if item not in mine], mine


def run(args: argparse.Namespace) -> int:
    """Adapt and write every output together at the end, or nothing (error, Ctrl-C)."""
    with OutputSet(protected=_inputs(args)) as outputs:
        return _adapt(args, outputs)


def _load_inputs(args, outputs: OutputSet) -> dict:
    """Everything the run needs, checked before any work: method, settings, model, images,
    reference, corrections (raises with one line on bad input)."""
    from ..adaptation.base import get_method
    from ..adaptation.plan import plan_run

    if args.method is None and args.corrections is None:
        raise CLIError("--method is required (or give --corrections to adapt with them alone)")
    method = get_method(args.method or "corrections")
    method_settings, correction_settings = split_settings(method, args.settings)
    _check_outputs(args, outputs)
    import_in_background()  # torch's optimiser imports, while the scans are read and prepared
    device = resolve_device(args.device)
    model = load_model(args.model)
    settings = plan_run(model, method, method_settings, model_name=args.model).settings
    if args.save_model:
        _check_model_output(args, model, outputs)
    expected = expected_volumes(args, model)
    volumes = [load_scan(path) for path in args.image]
    reference = load_volume(args.reference) if args.reference else None
    if reference is not None:  # same grid, and only labels the model has
        check_reference(reference, volumes[0], model.class_names)
    corrections = load_corrections(args, volumes[0], list(model.class_names))
    return {
        "method": method,
        "settings": settings,
        "correction_settings": correction_settings,
        "device": device,
        "model": model,
        "expected": expected,
        "volumes": volumes,
        "reference": reference,
        "corrections": corrections,
    }


def _adapt(args: argparse.Namespace, outputs: OutputSet) -> int:
    from ..adaptation.engine import adapt
    from ..adaptation.gate import GateOptions

    inputs = _load_inputs(args, outputs)
    method, settings, device = inputs["method"], inputs["settings"], inputs["device"]
    model, volumes, reference = inputs["model"], inputs["volumes"], inputs["reference"]
    corrections, expected = inputs["corrections"], inputs["expected"]

    last_event = None
    class_names = list(model.class_names)

    def on_event(event) -> None:
        nonlocal last_event
        if event.message and not args.quiet:
            print(f"napari-uda adapt: {event.message}", file=sys.stderr, flush=True)
        if last_event is not None and event.epoch != last_event.epoch and not args.quiet:
            print(_progress_line(last_event, class_names), file=sys.stderr, flush=True)
        last_event = event

    if not args.quiet:
        threads = getattr(args, "thread_choice", None)  # set by cli.main
        on = f", threads {threads.reason}" if threads and device.type == "cpu" else ""
        print(
            f"napari-uda adapt: {method.name} on {len(volumes)} volume(s), device {device}{on}",
            file=sys.stderr,
            flush=True,
        )
    result = adapt(
        model,
        volumes,
        method,
        settings,
        reference=reference,
        seed=args.seed,
        device=str(device),
        on_event=on_event,
        gate=GateOptions(gate=not args.no_gate),  # with corrections it only warns
        expected_volumes=expected,
        corrections=corrections,
        correction_settings=inputs["correction_settings"],
    )
    if last_event is not None and not args.quiet:
        print(_progress_line(last_event, class_names), file=sys.stderr, flush=True)
    decision = result.gate

    predictions = list(result.predictions)
    if corrections is not None:  # the corrected voxels stay exactly as the user made them
        predictions[0] = result.prediction = corrected_prediction(predictions[0], corrections)
    for index, prediction in enumerate(predictions):
        outputs.write(args.out[index], partial(save_volume, prediction.label_volume()))
        if args.entropy_out:
            entropy = prediction.entropy_volume()
            outputs.write(args.entropy_out[index], partial(save_volume, entropy))
    if args.save_model:
        adapted = {"method": method.name, "settings": result.settings, "seed": args.seed}
        adapted["from"] = str(args.model)
        if decision is not None:  # a rolled-back run saves the unadapted weights: say so
            adapted["gate"] = {"kept": decision.keep, "summary": decision.summary}
        provenance = {"adapted": jsonable(adapted)}
        outputs.write(args.save_model, partial(result.model.save, provenance=provenance))
    if args.report:
        report = _report(args, result, class_names, volumes[0], reference, corrections)
        outputs.write(args.report, partial(write_json, report))
    outputs.commit()
    if not args.quiet:
        print(f"napari-uda adapt: {result.summary()}", file=sys.stderr, flush=True)
    # one line with the decision, always (also with --quiet), then the loud warnings
    print(f"napari-uda adapt: gate: {decision.summary}", file=sys.stderr, flush=True)
    warn_lines("adapt", decision.warnings)
    return 0


def _report(args, result, class_names, image, reference, corrections) -> dict:
    """The JSON report: inputs (with the corrected slices), settings, history, metrics."""
    inputs = {
        "command": "napari-uda adapt",
        "model": str(args.model),
        "images": [str(p) for p in args.image],
        "reference": args.reference,
        "outputs": {"segmentation": args.out, "entropy": args.entropy_out},
    }
    if corrections is not None:
        inputs["corrections"] = {
            "file": args.corrections,
            "corrected_slices_option": args.corrected_slices,
            **describe_corrections(corrections),
        }
    truth = None if reference is None else np.rint(np.asarray(reference.data)).astype(int)
    metrics = run_metrics(result, class_names, image.spacing, truth)
    return run_report(result, inputs=inputs, metrics=metrics)
