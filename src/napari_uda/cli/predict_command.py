"""``napari-uda predict``: segment a scan with a model; masks overlay the input exactly."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np

from ..core.inference import Prediction, predict_volume
from ..core.models import ModelAdapter, load_model
from ..core.outputs import OutputSet
from ..core.volume import Volume, is_nifti_path, save_volume
from . import CLIError, add_threads_option
from .checks import load_scan
from .expected_volume import add_expected_volume_option, check_prediction, expected_volumes


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="segment a NIfTI scan with a model bundle",
        description="Segment a NIfTI scan. Every output keeps the input's grid (affine and "
        "header), so it overlays the scan in any viewer. Nothing is written if anything fails.",
    )
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model: bundle (.safetensors), TorchScript (.pt + .json), nnU-Net v2 folder, deepbet",
    )
    parser.add_argument("--image", required=True, type=Path, help="input scan (.nii / .nii.gz)")
    parser.add_argument("--out", required=True, type=Path, help="label map to write (uint8)")
    parser.add_argument(
        "--entropy-out", type=Path, help="also write the normalised entropy map (float32, 0..1)"
    )
    parser.add_argument(
        "--probabilities-out",
        type=Path,
        help="also write class probabilities (float32, 4D: one volume per class)",
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default auto"
    )
    add_expected_volume_option(parser)
    add_threads_option(parser)
    parser.set_defaults(run=run)
    return parser


def check_outputs(inputs: list[Path], outputs: list[Path]) -> OutputSet:
    """Refuse output names that are not NIfTI, repeat, would overwrite an input or lie in a
    folder that cannot be written; the returned set stages the writes (call ``discard`` or
    use it as a context manager)."""
    output_set = OutputSet(protected=inputs)
    try:
        for path in outputs:
            if not is_nifti_path(path):
                raise CLIError(f"{path}: output must end in .nii or .nii.gz")
            output_set.add(path)
    except BaseException:
        output_set.discard()
        raise
    return output_set


def check_compatible(model: ModelAdapter, image: Volume, model_path: Path) -> None:
    """A 3D scan has one channel; refuse models that expect another number."""
    in_channels = getattr(getattr(model, "bundle", None), "architecture", None)
    in_channels = getattr(in_channels, "in_channels", 1)
    if in_channels != 1:
        raise CLIError(
            f"{model_path}: the model expects {in_channels} input channels but "
            f"{image.path.name if image.path else 'the image'} has 1"
        )


def prediction_volumes(prediction: Prediction) -> dict[str, Volume]:
    """Label map, entropy map and probabilities as volumes on the input's grid."""
    probabilities = np.moveaxis(prediction.probabilities, 0, -1).astype(np.float32)
    return {
        "labels": prediction.label_volume(),
        "entropy": prediction.entropy_volume(),
        "probabilities": prediction.source.with_data(probabilities),
    }


def run(args: argparse.Namespace) -> int:
    requested = {"labels": args.out, "entropy": args.entropy_out}
    requested["probabilities"] = args.probabilities_out
    requested = {key: path for key, path in requested.items() if path is not None}
    with check_outputs([args.model, args.image], list(requested.values())) as outputs:
        image = load_scan(args.image)
        model = load_model(args.model)
        check_compatible(model, image, args.model)
        expected = expected_volumes(args, model)
        prediction = predict_volume(model, image, device=args.device)
        volumes = prediction_volumes(prediction)
        dtypes = {"labels": np.uint8, "entropy": np.float32, "probabilities": np.float32}
        planned = {path: (volumes[key], dtypes[key]) for key, path in requested.items()}
        write_outputs(planned, outputs)
    check_prediction("predict", prediction, model.class_names, expected, str(args.out))
    return 0


def write_outputs(
    volumes: dict[Path, tuple[Volume, type]], outputs: OutputSet | None = None
) -> None:
    """Write every volume under a staged name, then move them all into place; if any write
    fails, no output appears and existing files stay untouched. ``outputs``: the set the paths
    were checked into before the work (default: check them now)."""
    with outputs or check_outputs([], list(volumes)) as output_set:
        for path, (volume, dtype) in volumes.items():
            output_set.write(path, partial(save_volume, volume, dtype=dtype))
        output_set.commit()
    for path in volumes:
        print(f"wrote {path}")
