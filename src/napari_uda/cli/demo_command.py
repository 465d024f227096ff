"""``napari-uda demo``: the whole story headless, on the shipped demo data.

The demo model was trained on one head from the *source* scanner only. It segments a different
head as seen by a simulated *new* scanner; the command prints the Dice against the reference
mask before adaptation, adapts a copy of the model without labels, and prints the Dice after.
The reference is used for these numbers only, never for adaptation.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from ..core.inference import Prediction, predict_volume
from ..core.metrics import dice_per_class
from ..core.models import load_model
from ..core.outputs import OutputSet
from ..core.threads import import_in_background
from ..core.volume import Volume, load_volume
from ..data import demo_files
from . import CLIError, add_settings_option, add_threads_option

#: Adaptation method the demo uses unless ``--method`` says otherwise.
DEFAULT_METHOD = "adabn"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="run the demo: predict on a new-scanner head, adapt, compare Dice",
        description="Run the whole story headless on the shipped demo data: segment a head "
        "from a new scanner with a model trained on another scanner, print the Dice before, "
        "adapt a copy of the model without labels, print the Dice after. The reference mask "
        "is used for the printed numbers only.",
    )
    parser.add_argument(
        "--method", default=DEFAULT_METHOD, help=f"adaptation method (default {DEFAULT_METHOD})"
    )
    add_settings_option(parser, "settings", "a method setting, e.g. --set epochs=5 (repeatable)")
    parser.add_argument(
        "--no-adapt", action="store_true", help="only predict and print the Dice before"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="also write the segmentations and entropy maps before/after (NIfTI) here",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default auto"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_threads_option(parser)
    parser.set_defaults(run=run)
    return parser


def foreground_dice(prediction: Prediction, reference: Volume) -> float:
    """Mean Dice of the foreground classes against the reference."""
    num_classes = prediction.probabilities.shape[0]
    labels = np.asarray(reference.data).round().astype(np.int64)
    return float(np.mean(dice_per_class(prediction.labels, labels, num_classes)[1:]))


def engine_available() -> bool:
    return importlib.util.find_spec("napari_uda.adaptation.engine") is not None


def run(args: argparse.Namespace) -> int:
    try:
        files = demo_files(require_model=True)
    except FileNotFoundError as error:
        raise CLIError(str(error)) from error
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        raise CLIError(f"{args.out_dir}: exists and is not a folder")
    if args.out_dir is not None:  # writable? found out now, not after the adaptation
        with OutputSet() as probe:
            probe.add(args.out_dir / "target_before_labels.nii.gz", "--out-dir")
    adapt_now = not args.no_adapt and engine_available()
    if adapt_now:
        import_in_background()  # torch's optimiser imports, while the demo predicts
    model = load_model(files.model)
    if adapt_now:
        from ..adaptation.plan import plan_run

        plan = plan_run(model, args.method, args.settings)
    image = load_volume(files.target_image)
    reference = load_volume(files.target_mask)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    print(
        f"demo: model trained on the source head only ({files.model.name}); target: "
        f"{files.target_image.name} {image.shape}, a different head from a new scanner"
    )
    started = time.perf_counter()
    before = predict_volume(model, image, device=args.device)
    dice_before = foreground_dice(before, reference)
    print(f"Dice before adaptation: {dice_before:.3f}  ({time.perf_counter() - started:.1f} s)")
    outputs = {"before_labels": before.label_volume(), "before_entropy": before.entropy_volume()}

    if args.no_adapt:
        pass
    elif not engine_available():
        print("adaptation engine not available in this installation; stopping after prediction")
    else:
        from ..adaptation.engine import adapt

        def progress(event) -> None:
            if event.evaluated and event.step > 0:
                entropy = f"{event.mean_entropy:.4f}" if event.mean_entropy is not None else "-"
                dice = f"{np.mean(event.reference_dice):.3f}" if event.reference_dice else "-"
                say(
                    f"  epoch {event.epoch} step {event.step}/{event.total_steps}  "
                    f"loss {event.main_loss:.4f}  entropy {entropy}  "
                    f"Dice (QA) {dice}"
                )

        print(f"adapting with {args.method} (no labels) ...")
        result = adapt(
            model,
            image,
            plan,
            reference=reference,
            seed=args.seed,
            device=args.device,
            on_event=progress,
        )
        dice_after = foreground_dice(result.prediction, reference)
        print(
            f"Dice after adaptation:  {dice_after:.3f}  ({dice_after - dice_before:+.3f}) "
            f"with {args.method} in {result.seconds:.1f} s; {result.stop_reason}"
        )
        outputs["after_labels"] = result.prediction.label_volume()
        outputs["after_entropy"] = result.prediction.entropy_volume()

    if args.out_dir is not None:
        from .predict_command import write_outputs

        dtypes = {"labels": np.uint8, "entropy": np.float32}
        write_outputs(
            {
                args.out_dir / f"target_{key}.nii.gz": (volume, dtypes[key.split("_")[1]])
                for key, volume in outputs.items()
            }
        )
    return 0
