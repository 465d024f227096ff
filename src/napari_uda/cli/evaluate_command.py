"""``napari-uda evaluate``: compare a segmentation with a reference, per class."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from ..core.metrics import METRIC_NAMES, compute_metrics
from ..core.volume import load_volume
from . import CLIError
from .checks import MAX_LABEL, label_array, same_grid


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="Dice, IoU, precision, recall, specificity, HD95 and surface Dice per class",
        description="Compare a label map with a reference label map on the same grid. "
        "Distances are in mm (from the reference's voxel spacing).",
    )
    parser.add_argument("--pred", required=True, type=Path, help="label map to evaluate")
    parser.add_argument("--ref", required=True, type=Path, help="reference label map")
    parser.add_argument(
        "--tolerance-mm", type=float, default=1.0, help="surface Dice tolerance (default 1.0)"
    )
    parser.add_argument(
        "--num-classes", type=int, help="classes incl. background (default: largest label + 1)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)
    return parser


def _json_number(value: float) -> float | None:
    """``nan`` (e.g. HD95 when one mask is empty) becomes JSON ``null``."""
    return None if value is None or not np.isfinite(value) else float(value)


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.tolerance_mm) or args.tolerance_mm < 0:
        raise CLIError(f"--tolerance-mm must be 0 mm or more, not {args.tolerance_mm}")
    if args.num_classes is not None and not 2 <= args.num_classes <= MAX_LABEL + 1:
        raise CLIError(
            f"--num-classes must be from 2 (background and one class) to {MAX_LABEL + 1}, "
            f"not {args.num_classes}"
        )
    prediction, reference = load_volume(args.pred), load_volume(args.ref)
    if not same_grid(prediction, reference):
        raise CLIError(
            f"{args.pred.name} ({prediction.shape}) and {args.ref.name} ({reference.shape}) "
            "are not on the same grid (shape and affine must match)"
        )
    largest, why = MAX_LABEL, ""
    if args.num_classes is not None:
        largest, why = args.num_classes - 1, f" with --num-classes {args.num_classes}"
    metrics = compute_metrics(
        label_array(prediction, largest, why),
        label_array(reference, largest, why),
        reference.spacing,
        num_classes=args.num_classes,
        tolerance_mm=args.tolerance_mm,
    )
    if args.json:
        report = {
            "prediction": str(args.pred),
            "reference": str(args.ref),
            "spacing_mm": list(reference.spacing),
            "tolerance_mm": args.tolerance_mm,
            "classes": {
                str(label): {key: _json_number(value) for key, value in values.items()}
                for label, values in metrics.items()
            },
        }
        print(json.dumps(report, indent=2, allow_nan=False))  # standard JSON only
        return 0
    print(f"{'class':>5}  " + "  ".join(f"{name:>12}" for name in METRIC_NAMES))
    for label, values in metrics.items():
        cells = "  ".join(f"{values[name]:12.4f}" for name in METRIC_NAMES)
        print(f"{label:>5}  {cells}")
    print(f"(HD95 in mm; surface Dice at {args.tolerance_mm:g} mm)")
    return 0
