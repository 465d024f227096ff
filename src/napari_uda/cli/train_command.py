"""``napari-uda train``: train a model bundle on labelled source volumes."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch

from ..core.fields import FieldError
from ..core.models.adapter import UNetBundleAdapter
from ..core.models.bundle import ModelBundle
from ..core.models.unet import UNetConfig
from ..core.outputs import OutputSet
from ..core.plausibility import parse_expected_volumes
from ..core.preprocessing import PreprocessingConfig
from ..core.training import TrainingProgress, TrainingSettings, train_bundle
from ..core.volume import load_volume
from ..settings import apply_overrides, describe
from . import CLIError, add_settings_option, add_threads_option
from .expected_volume import add_expected_volume_option


def add_parser(subparsers) -> argparse.ArgumentParser:
    settings_help = "; ".join(
        f"{spec.name} (default {spec.default})" for spec in describe(TrainingSettings)
    )
    parser = subparsers.add_parser(
        "train",
        help="train a 2D U-Net bundle on labelled source volumes",
        description="Train a 2D U-Net model bundle (with early head, source statistics and a "
        "source pack) on labelled NIfTI volumes from the source scanner.",
    )
    parser.add_argument("--images", nargs="+", required=True, type=Path, help="training images")
    parser.add_argument(
        "--masks", nargs="+", required=True, type=Path, help="label maps, one per image, in order"
    )
    parser.add_argument("--out", required=True, type=Path, help="output bundle (.safetensors)")
    parser.add_argument(
        "--classes",
        nargs="+",
        default=["background", "foreground"],
        help="class names, background first (default: background foreground)",
    )
    add_settings_option(
        parser, "overrides", f"change a training setting (repeatable). Settings: {settings_help}"
    )
    parser.add_argument("--seed", type=int, help="random seed (same as --set seed=N)")
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default auto"
    )
    model = parser.add_argument_group("network")
    model.add_argument("--base-channels", type=int, default=16, help="default 16")
    model.add_argument("--depth", type=int, default=4, help="down-sampling steps (default 4)")
    model.add_argument("--norm", choices=("batch", "group", "instance"), default="batch")
    model.add_argument("--dropout", type=float, default=0.1, help="default 0.1")
    model.add_argument("--no-early-head", action="store_true", help="leave out the UDAS early head")
    model.add_argument(
        "--early-head-layers",
        type=int,
        choices=(1, 3),
        default=3,
        help="3: three 3x3 convolutions as in Sheikh & Schultz's code (default); 1: one 1x1",
    )
    prep = parser.add_argument_group("preprocessing")
    prep.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(2.0, 2.0, 2.0),
        metavar=("X", "Y", "Z"),
        help="model voxel size in mm, RAS axes (default 2 2 2)",
    )
    prep.add_argument(
        "--slice-axis", type=int, choices=(0, 1, 2), default=2, help="0 sag, 1 cor, 2 axial"
    )
    prep.add_argument(
        "--normalization",
        choices=("percentile_zscore", "zscore", "minmax", "none"),
        default="percentile_zscore",
    )
    add_expected_volume_option(
        parser,
        "The plausible volume per class in ml that the bundle states (name=low:high, several "
        "separated by commas, e.g. brain=1000:1800); results outside it are flagged. Default: "
        "from the training masks, half the smallest to one and a half times the largest.",
    )
    parser.add_argument("--quiet", action="store_true", help="print no progress")
    add_threads_option(parser)
    parser.set_defaults(run=run)
    return parser


def _print_progress(progress: TrainingProgress) -> None:
    print(
        f"{progress.phase:>10} epoch {progress.epoch:4d}/{progress.epochs}  "
        f"loss {progress.loss:.4f}  dice {progress.dice:.3f}  {progress.elapsed_seconds:6.1f}s",
        flush=True,
    )


def aiva_source_features(bundle: ModelBundle, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """AIVA's pooled source bottleneck features, stored in the bundle (no image content)."""
    from ..adaptation.methods.aiva import compute_source_statistics

    return compute_source_statistics(UNetBundleAdapter(bundle), images)


def run(args: argparse.Namespace) -> int:
    if len(args.images) != len(args.masks):
        raise CLIError(f"{len(args.images)} images but {len(args.masks)} masks; give one each")
    if not str(args.out).endswith(".safetensors"):
        raise CLIError(f"{args.out}: the bundle must end in .safetensors")
    if len(args.classes) < 2:
        raise CLIError("give at least two class names (background first)")
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    settings = apply_overrides(TrainingSettings(), overrides)
    try:
        architecture, preprocessing = network_settings(args)
    except FieldError as error:
        option = OPTION_FOR_FIELD.get(error.field.split("[")[0], error.field)
        raise CLIError(f"{option}: {error.problem}") from None
    stated = parse_expected_volumes(args.expected_volume, args.classes, where="--expected-volume")
    with OutputSet(protected=[*args.images, *args.masks]) as outputs:
        outputs.add(args.out, "--out")  # checked before minutes of training
        images = [load_volume(path) for path in args.images]
        masks = [load_volume(path) for path in args.masks]
        bundle = train_bundle(
            images,
            masks,
            settings,
            architecture,
            preprocessing,
            args.classes,
            callback=None if args.quiet else _print_progress,
            device=args.device,
            provenance={"command": command_line(args, settings)},
            source_tensors=aiva_source_features,
            expected_volume=stated,
        )
        outputs.write(args.out, bundle.save)
        outputs.commit()
    print(f"wrote {args.out}")
    return 0


#: The option behind each network and preprocessing field, for error messages.
OPTION_FOR_FIELD = {
    "num_classes": "--classes (their number)",
    "base_channels": "--base-channels",
    "depth": "--depth",
    "dropout": "--dropout",
    "target_spacing": "--spacing",
}


def network_settings(args: argparse.Namespace) -> tuple[UNetConfig, PreprocessingConfig]:
    """The U-Net and preprocessing the options ask for (checked: FieldError names a field)."""
    architecture = UNetConfig(
        num_classes=len(args.classes),
        base_channels=args.base_channels,
        depth=args.depth,
        norm=args.norm,
        dropout=args.dropout,
        early_head=not args.no_early_head,
        early_head_layers=args.early_head_layers,
    )
    preprocessing = PreprocessingConfig(
        normalization=args.normalization,
        target_spacing=tuple(args.spacing),
        slice_axis=args.slice_axis,
        pad_multiple=2**args.depth,
    )
    return architecture, preprocessing


def command_line(args: argparse.Namespace, settings: TrainingSettings) -> str:
    """The full command that repeats this training run (every setting spelled out)."""
    words = ["napari-uda", "train", "--images", *map(str, args.images)]
    words += ["--masks", *map(str, args.masks), "--out", str(args.out)]
    words += ["--classes", *args.classes]
    for spec in describe(TrainingSettings):
        value = getattr(settings, spec.name)
        if value != spec.default and spec.name != "seed":
            words += ["--set", f"{spec.name}={value}"]
    words += ["--seed", str(settings.seed)]
    words += ["--base-channels", str(args.base_channels), "--depth", str(args.depth)]
    words += ["--norm", args.norm, "--dropout", str(args.dropout)]
    words += ["--no-early-head"] if args.no_early_head else []
    words += ["--early-head-layers", str(args.early_head_layers)]
    words += ["--spacing", *map(str, args.spacing), "--slice-axis", str(args.slice_axis)]
    words += ["--normalization", args.normalization, "--device", args.device]
    return shlex.join(words)
