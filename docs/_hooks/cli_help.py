"""MkDocs hooks of the layerwise site (see mkdocs.yml).

1. Replace ``<!-- layerwise-cli-help -->`` with the ``--help`` text of every subcommand: the command-line
   reference is generated from the parsers themselves (``layerwise.cli.build_parser``), so it cannot drift
   from the code. Building the parsers imports neither torch nor numpy, so this stays fast.
2. Let the numpy docstring parser read an ``Example`` section like ``Examples`` (many layerwise docstrings
   use the singular): their ``>>>`` lines then render as code, as they run as doctests.
"""

from __future__ import annotations

import argparse
import io
import os
from contextlib import redirect_stdout

MARKER = "<!-- layerwise-cli-help -->"


def _accept_singular_example_heading() -> None:
    from griffe import DocstringSectionKind
    from griffe._internal.docstrings import numpy as numpy_parser  # private: the section-name table

    numpy_parser._section_kind.setdefault("example", DocstringSectionKind.examples)


def on_startup(**kwargs) -> None:
    _accept_singular_example_heading()


def _help(parser: argparse.ArgumentParser) -> str:
    buffer = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix the width so every build is the same
    try:
        with redirect_stdout(buffer):
            parser.print_help()
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return buffer.getvalue().rstrip()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render() -> str:
    """The Markdown for every command and sub-subcommand, in the order ``layerwise --help`` lists them."""
    from layerwise.cli import build_parser

    root = build_parser()
    parts = ["## `layerwise`", "", "```text", _help(root), "```", ""]
    for name, parser in _subparsers(root).items():
        parts += [f"## `layerwise {name}`", "", "```text", _help(parser), "```", ""]
        for child, sub in _subparsers(parser).items():
            parts += [f"### `layerwise {name} {child}`", "", "```text", _help(sub), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render())
    return markdown
