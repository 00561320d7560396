"""``layerwise merge CONFIG.yaml --out DIR``: merge checkpoints (task arithmetic, TIES, DARE, … + LiNeS)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned checkpoints (task arithmetic, TIES, DARE, consensus, LiNeS…) from YAML",
        description="Merge checkpoints tensor by tensor into sharded safetensors in OUT (atomically). "
        "See docs for the config format; --list-methods shows the methods and their parameters.",
    )
    p.add_argument("config", nargs="?", help="YAML merge config")
    p.add_argument("--out", help="output folder (replaced atomically when the merge succeeds)")
    p.add_argument(
        "--dry-run", action="store_true", help="validate the config, print the plan, write nothing"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--list-methods", action="store_true", help="list merge methods and their parameters")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..editing.config import load_merge_config
    from ..editing.lines import format_lines_table
    from ..editing.merge import MERGE_METHODS, execute_plan

    if args.list_methods:
        for name in MERGE_METHODS.names():
            m = MERGE_METHODS.get(name)
            print(f"{name}: {m.description}\n  reference: {m.reference}")
            for param in m.params:
                print(f"  - {param.describe()}")
        return 0
    if args.config is None:
        raise ValueError("give a CONFIG.yaml (or --list-methods)")
    if args.out is None and not args.dry_run:
        raise ValueError("--out DIR is required (or use --dry-run)")
    config = load_merge_config(args.config)
    plan = config.plan()
    print(plan.describe())
    if args.dry_run:
        return 0
    result = execute_plan(plan, args.out, progress=not args.no_progress, record={"config": config.to_dict()})
    if result.lines_table is not None:
        print(f"LiNeS: alpha = {result.lines_alpha:.6g}, beta = {result.lines_beta:.6g}")
        print(format_lines_table(result.lines_table))
    print(f"merged model written to {result.out}")
    return 0
