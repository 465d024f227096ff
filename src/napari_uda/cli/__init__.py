"""The ``napari-uda`` command line. One module per subcommand; each defines ``add_parser`` and
``run``. Errors print one readable line to stderr and exit non-zero; nothing is written then."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand modules in the order ``--help`` lists them.
SUBCOMMANDS = ("train", "predict", "evaluate", "adapt", "batch", "methods", "demo")


class CLIError(Exception):
    """An error the CLI reports as one line (exit code 2)."""


def add_settings_option(parser: argparse.ArgumentParser, dest: str, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option, collected in ``args.<dest>``."""
    parser.add_argument(
        "--set", dest=dest, action="append", default=[], metavar="KEY=VALUE", help=help
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-uda",
        description="Adapt an MRI segmentation model to a new scanner without labels.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}_command")
        except ModuleNotFoundError as error:
            if error.name == f"{__name__}.{name}_command":
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("napari-uda: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, KeyError, FileNotFoundError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"napari-uda {args.command}: error: {message.strip(chr(39))}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
