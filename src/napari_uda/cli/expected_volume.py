"""The ``--expected-volume`` option of ``predict`` and ``adapt``, and the loud line a mask
outside its expected range gets (the command still exits 0: the mask is written, and flagged).
"""

from __future__ import annotations

import argparse
import sys

from ..core.plausibility import (
    ExpectedVolumes,
    PlausibilitySettings,
    class_volumes,
    flag_lines,
    merge_expected,
    parse_expected_volumes,
    volume_flags,
)
from ..settings import describe


def add_expected_volume_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--expected-volume CLASS=LOW:HIGH`` (repeatable), documented by
    :class:`~napari_uda.core.plausibility.PlausibilitySettings` unless ``help`` is given."""
    [spec] = [s for s in describe(PlausibilitySettings) if s.name == "expected_volume"]
    parser.add_argument(
        "--expected-volume",
        action="append",
        default=[],
        metavar="CLASS=LOW:HIGH",
        help=(help or spec.help) + " Repeatable.",
    )


def expected_volumes(args: argparse.Namespace, model) -> ExpectedVolumes:
    """The model's ranges with the user's ``--expected-volume`` replacing them (checked
    against the model's classes before any work starts)."""
    user = parse_expected_volumes(
        args.expected_volume, model.class_names, where="--expected-volume"
    )
    return merge_expected(model.expected_volumes(), user)


def warn_lines(command: str, lines: list[str]) -> None:
    """Print each line to stderr as ``napari-uda COMMAND: WARNING: ...``."""
    for line in lines:
        print(f"napari-uda {command}: WARNING: {line}", file=sys.stderr, flush=True)


def check_prediction(command: str, prediction, class_names, expected, what: str) -> list[str]:
    """Warn (stderr) about every class of ``prediction`` outside ``expected``; the lines."""
    volumes = class_volumes(prediction.labels, prediction.source.spacing, list(class_names))
    lines = flag_lines(volume_flags(volumes, expected), what)
    warn_lines(command, lines)
    return lines
