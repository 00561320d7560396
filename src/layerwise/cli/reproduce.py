"""``layerwise reproduce``: run registered experiments and build the HTML report."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..experiments import EXPERIMENTS, SCALES

    names = "\n".join(f"  {n:<18} {EXPERIMENTS.get(n).description}" for n in EXPERIMENTS.names())
    p = sub.add_parser(
        "reproduce",
        help="run the papers' experiments, write results, figures and report.html",
        description="Run experiments from the registry into OUT/<name>/ and build OUT/report.html.",
        epilog=f"experiments:\n{names}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="*", default=["all"], metavar="NAME", help="experiment names, or 'all'")
    p.add_argument("--scale", choices=SCALES, default="quick", help="quick (CPU minutes) or full")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..experiments import EXPERIMENTS, run_experiment
    from ..report import build_report

    if args.list:
        for name in EXPERIMENTS.names():
            print(f"{name:<18} {EXPERIMENTS.get(name).description}")
        return 0
    names = EXPERIMENTS.names() if args.names in (["all"], []) else list(args.names)
    for name in names:
        EXPERIMENTS.get(name)  # fail before running anything if a name is unknown
    for name in tqdm(names, desc="experiments", unit="exp"):
        tqdm.write(f"[layerwise] running {name} ({args.scale}) -> {args.out}/{name}/")
        summary = run_experiment(name, args.out, scale=args.scale)
        tqdm.write(f"[layerwise] {name}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    report = build_report(args.out)
    print(f"report: {report}")
    return 0
