"""``--corrections`` and ``--corrected-slices`` of ``napari-uda adapt``: read and check them.

``--corrections FILE`` is a label volume on the first image's grid: -1 where the user did not
correct, a class of the model elsewhere. When FILE is an ordinary mask (no -1),
``--corrected-slices AXIS:I,J,...`` says which slices of it are corrected (AXIS: axial,
coronal, sagittal, or an array axis 0, 1, 2); every other voxel then counts as not corrected.
Every problem is one line naming the file (exit 2, nothing written).
"""

from __future__ import annotations

import argparse

import numpy as np

from ..core.volume import Volume, load_volume
from . import CLIError

PLANE_CODES = {"axial": "SI", "coronal": "AP", "sagittal": "LR"}


def add_corrections_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corrections",
        help=(
            "corrected labels of the first image (NIfTI on its grid; -1 = not corrected). The "
            "model learns from them, and the output keeps them exactly"
        ),
    )
    parser.add_argument(
        "--corrected-slices",
        metavar="AXIS:I,J,...",
        help=(
            "with an ordinary mask as --corrections: which of its slices are corrected, e.g. "
            "axial:40,52,60 (axis: axial, coronal, sagittal or 0, 1, 2)"
        ),
    )


def slice_axis(text: str, image: Volume, flag: str = "--corrected-slices") -> int:
    """An array axis from ``axial`` / ``coronal`` / ``sagittal`` (by the image's orientation)
    or ``0`` / ``1`` / ``2``."""
    name = text.strip().lower()
    if name in ("0", "1", "2"):
        return int(name)
    if name not in PLANE_CODES:
        raise CLIError(f"{flag}: unknown axis {text!r}; use axial, coronal, sagittal, 0, 1 or 2")
    codes = [str(code).upper() for code in image.axcodes]
    return next(i for i, code in enumerate(codes) if code in PLANE_CODES[name])


def parse_corrected_slices(text: str, image: Volume) -> tuple[int, list[int]]:
    """``axial:40,52,60`` -> (array axis, sorted indices), checked against the image."""
    axis_text, _, indices_text = text.partition(":")
    axis = slice_axis(axis_text, image)
    try:
        indices = sorted({int(i) for i in indices_text.split(",") if i.strip()})
    except ValueError:
        raise CLIError(
            f"--corrected-slices {text}: expected AXIS:I,J,... with whole numbers"
        ) from None
    if not indices:
        raise CLIError(f"--corrected-slices {text}: no slice given")
    size = image.shape[axis]
    outside = [i for i in indices if not 0 <= i < size]
    if outside:
        raise CLIError(f"--corrected-slices: slice {outside[0]} is outside 0..{size - 1}")
    return axis, indices


def load_corrections(args, image: Volume, class_names: list[str]) -> Volume | None:
    """The corrections volume from ``--corrections`` (and ``--corrected-slices``), or None."""
    from ..core.corrections import NOT_CORRECTED, corrections_from_slices

    if args.corrections is None:
        if args.corrected_slices:
            raise CLIError("--corrected-slices needs --corrections (the corrected mask)")
        return None
    path = args.corrections
    volume = load_volume(path)
    if volume.shape != image.shape:
        raise CLIError(
            f"{path}: shape {volume.shape} does not match the first image's {image.shape}"
        )
    if not np.allclose(volume.affine, image.affine, atol=1e-3):
        raise CLIError(f"{path}: its affine differs from the first image's (not on the same grid)")
    data = np.asarray(volume.data)
    if not np.array_equal(data, np.rint(data)):
        raise CLIError(f"{path}: holds non-integer values; corrections are labels")
    data = np.rint(data).astype(np.int64)
    if args.corrected_slices:
        axis, indices = parse_corrected_slices(args.corrected_slices, image)
        if (data == NOT_CORRECTED).any():
            raise CLIError(
                f"{path}: already marks voxels -1 (not corrected); drop --corrected-slices"
            )
        data = corrections_from_slices(data, axis, indices).astype(np.int64)
    elif not (data == NOT_CORRECTED).any():
        raise CLIError(
            f"{path}: no voxel is -1 (not corrected), so it looks like an ordinary mask; say "
            "which slices are corrected with --corrected-slices, e.g. axial:40,52"
        )
    values = np.unique(data[data != NOT_CORRECTED])
    wrong = values[(values < 0) | (values >= len(class_names))]
    if wrong.size:
        known = ", ".join(f"{i} {name}" for i, name in enumerate(class_names))
        raise CLIError(f"{path}: label {wrong[0]} is not a class of the model ({known})")
    if values.size == 0:
        raise CLIError(f"{path}: no voxel is corrected")
    return image.with_data(data.astype(np.int16))
