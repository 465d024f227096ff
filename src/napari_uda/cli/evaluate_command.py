"""``napari-uda evaluate``: compare a segmentation with a reference, per class."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..core.metrics import METRIC_NAMES, compute_metrics
from ..core.volume import Volume, load_volume
from . import CLIError


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


def label_array(volume: Volume) -> np.ndarray:
    """The volume's data as non-negative integer labels, or a one-line error."""
    data = np.asarray(volume.data)
    name = volume.path.name if volume.path is not None else "labels"
    if data.dtype.kind == "f" and not np.all(np.mod(data, 1) == 0):
        raise CLIError(f"{name}: is not a label map (non-integer values)")
    if data.min() < 0:
        raise CLIError(f"{name}: is not a label map (negative values)")
    return data.astype(np.int64)


def same_grid(first: Volume, second: Volume) -> bool:
    return first.shape == second.shape and np.allclose(first.affine, second.affine, atol=1e-3)


def _json_number(value: float) -> float | None:
    """``nan`` (e.g. HD95 when one mask is empty) becomes JSON ``null``."""
    return None if value is None or not np.isfinite(value) else float(value)


def run(args: argparse.Namespace) -> int:
    if args.tolerance_mm < 0:
        raise CLIError("--tolerance-mm must not be negative")
    prediction, reference = load_volume(args.pred), load_volume(args.ref)
    if not same_grid(prediction, reference):
        raise CLIError(
            f"{args.pred.name} ({prediction.shape}) and {args.ref.name} ({reference.shape}) "
            "are not on the same grid (shape and affine must match)"
        )
    metrics = compute_metrics(
        label_array(prediction),
        label_array(reference),
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
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'class':>5}  " + "  ".join(f"{name:>12}" for name in METRIC_NAMES))
    for label, values in metrics.items():
        cells = "  ".join(f"{values[name]:12.4f}" for name in METRIC_NAMES)
        print(f"{label:>5}  {cells}")
    print(f"(HD95 in mm; surface Dice at {args.tolerance_mm:g} mm)")
    return 0
