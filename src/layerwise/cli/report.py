"""``layerwise report DIR``: rebuild DIR/report.html from an existing results folder (nothing is re-run)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild DIR/report.html (the reproduction scorecard) from an existing results folder",
        description="Read every experiment folder DIR/<name>/ written by 'layerwise reproduce' and write "
        "DIR/report.html: the scorecard of the papers' claims by system, then one section per experiment. "
        "Nothing is re-run.",
    )
    p.add_argument("dir", metavar="DIR", help="results folder (the --out of 'layerwise reproduce')")
    p.add_argument("--title", default="layerwise: reproduction report", help="page title")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..report import build_report

    print(f"report: {build_report(args.dir, title=args.title)}")
    return 0
