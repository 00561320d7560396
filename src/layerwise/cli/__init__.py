"""The ``layerwise`` command. Thin: it parses arguments and calls experiments and library entry points.

Each subcommand lives in its own module of this package and exposes ``add_parser(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returning an exit code). Heavy libraries
are imported inside the handlers so that ``layerwise --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order --help lists them.
COMMAND_MODULES = ("reproduce", "rhm", "merge", "diffusion", "m3id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        # Bad input: one readable line, no traceback (set LAYERWISE_DEBUG=1 to see it).
        import os

        if os.environ.get("LAYERWISE_DEBUG"):
            raise
        print(f"layerwise {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
