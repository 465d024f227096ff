"""The ``napari-uda`` command line. One module per subcommand; each defines ``add_parser`` and
``run``. Errors print one readable line to stderr and exit non-zero; nothing is written then.

Exit codes: 0 done, 2 bad input (including wrong options), 1 an unexpected error (still one
line; ``--debug`` or the environment variable ``NAPARI_UDA_DEBUG=1`` adds the full traceback),
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

#: Subcommand modules in the order ``--help`` lists them.
SUBCOMMANDS = ("train", "predict", "evaluate", "adapt", "batch", "methods", "demo")


class CLIError(Exception):
    """An error the CLI reports as one line (exit code 2)."""


def add_settings_option(parser: argparse.ArgumentParser, dest: str, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option, collected in ``args.<dest>``."""
    parser.add_argument(
        "--set", dest=dest, action="append", default=[], metavar="KEY=VALUE", help=help
    )


#: Errors that come from the user's input or files: exit code 2, no "unexpected" wording.
INPUT_ERRORS = (CLIError, ValueError, KeyError, FileNotFoundError, OSError)
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "NAPARI_UDA_DEBUG"


class OneLineParser(argparse.ArgumentParser):
    """Option errors as one line (``prog: error: ...``) instead of the usage block; exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def error_line(error: BaseException) -> str:
    """An exception's message as one line, quotes intact (a KeyError's message is its key,
    which ``str`` would wrap in another pair of quotes)."""
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N|auto`` for subcommands that compute (applied by :func:`main`)."""
    parser.add_argument(
        "--threads",
        default="auto",
        metavar="N|auto",
        help=(
            "PyTorch CPU threads (default auto: OMP_NUM_THREADS if set, else the cores free "
            "now; on a busy machine fewer threads are faster)"
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="napari-uda",
        description="Adapt an MRI segmentation model to a new scanner without labels.",
    )
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help=f"show the full traceback of an error (also: {DEBUG_VARIABLE}=1); may go anywhere",
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
    """Run one command. Every error becomes one line on stderr and a non-zero exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    argv = [word for word in argv if word != DEBUG_FLAG]

    from ..core.threads import apply_threads, quiet_openmp_waiting

    quiet_openmp_waiting()  # before the subcommands import torch (and with it OpenMP)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help (0) or an option error (2, one line already printed)
        return exit.code if isinstance(exit.code, int) else 2
    try:
        if hasattr(args, "threads"):
            args.thread_choice = apply_threads(args.threads)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"napari-uda {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # the catch-all: one line, the traceback only when asked for
        if debug:
            traceback.print_exc()
        line = error_line(error)
        if isinstance(error, INPUT_ERRORS):
            print(f"napari-uda {args.command}: error: {line}", file=sys.stderr)
            return 2
        hint = "" if debug else f" (run with {DEBUG_FLAG} or {DEBUG_VARIABLE}=1 for details)"
        print(
            f"napari-uda {args.command}: unexpected error: {type(error).__name__}: {line}{hint}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
