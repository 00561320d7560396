"""The ``layerwise`` command. Thin: it parses arguments and calls experiments and library entry points.

Each subcommand lives in its own module of this package and exposes ``add_parser(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returning an exit code). Heavy libraries
are imported inside the handlers so that ``layerwise --help`` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Sequence

from ._app import Parser, run_handler

# Subcommand modules, in the order --help lists them.
COMMAND_MODULES = (
    "reproduce", "report", "rhm", "merge", "extract_lora", "finetune", "diffusion", "m3id", "kernels",
    "diffeo", "convert", "merge_data", "eight_task",
)


def build_parser() -> argparse.ArgumentParser:
    # Parser: allow_abbrev=False and one-line usage errors, inherited by every subparser (see _app).
    parser = Parser(
        prog="layerwise",
        description="layerwise: data structure and deep networks; weight-space and decoding-time editing.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2 if args.command is None else 0
    # LayerwiseError, ValueError/TypeError and OS errors: one line, exit 2; a bug keeps its traceback
    # (LAYERWISE_DEBUG=1 shows every traceback). See _app.run_handler.
    return run_handler(args.func, args, args.command)


def entry() -> None:
    """The ``layerwise`` program (console script and ``python -m layerwise``): :func:`main`, then exit.

    Before exiting, every live object is moved out of the garbage collector's reach (:func:`gc.freeze`):
    the interpreter's final collections then skip the ~10^5 objects of torch's import (one full collection
    of them takes ~50 ms). Nothing is left to collect that matters: the command has finished and closed its
    files."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
