"""``layerwise merge CONFIG.yaml --out DIR``: merge checkpoints (task arithmetic, TIES, DARE, … + LiNeS)."""

from __future__ import annotations

import argparse
import gc


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned checkpoints (task arithmetic, TIES, DARE, consensus, LiNeS…) from YAML",
        description="Merge checkpoints tensor by tensor into sharded safetensors in OUT (atomically). "
        "See docs for the config format; --list-methods shows the methods and their parameters.",
        allow_abbrev=False,
    )
    p.add_argument(
        "config", nargs="?", help="YAML merge config (layerwise's, or a mergekit config used unchanged)"
    )
    p.add_argument(
        "--out", help="output folder; must be new or empty unless --overwrite (written atomically)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if an earlier layerwise command created it and nothing was added to it since "
        "(a folder holding other files, or an input model, is never replaced)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate the config, print the plan, write nothing"
    )
    p.add_argument(
        "--device",
        default=None,
        help="where tensors are merged: cpu (default), cuda, cuda:1, auto (CUDA when available); "
        "read and written on the CPU",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch compute threads (default 1: a merge is bound by reading and writing, and more threads "
        "slow elementwise work down on a busy machine; raise it for a GPU-less server with idle cores)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--list-methods", action="store_true", help="list merge methods and their parameters")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .._validation import check_int
    from ..editing.merge import DATA_MERGE_METHODS, MERGE_METHODS
    from ..editing.merge.plan import merge_device
    from ..errors import ParameterError

    if args.list_methods:
        for name in MERGE_METHODS.names():
            m = MERGE_METHODS.get(name)
            print(f"{name}: {m.description}\n  reference: {m.reference}")
            for param in m.params:
                print(f"  - {param.describe()}")
        print("\ndata-dependent methods (per-model statistics from your batches; "
              "run `layerwise merge-data`):")
        for name in DATA_MERGE_METHODS.names():
            m = DATA_MERGE_METHODS.get(name)
            print(f"{name}: {m.description}\n  reference: {m.reference}")
            for param in m.params:
                print(f"  - {param.describe()}")
        return 0
    if args.config is None:
        raise ParameterError("give a CONFIG.yaml (or --list-methods)")
    if args.out is None and not args.dry_run:
        raise ParameterError("--out DIR is required (or use --dry-run)")
    device = merge_device(args.device, name="--device")  # one line for a bad device, before any work
    threads = check_int("--threads", args.threads, low=1, high=4096)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    # the objects alive now (torch's import) are out of the garbage collector's reach while merging: each
    # full collection would scan them (~50 ms) and the merge allocates nothing that needs them scanned
    gc.freeze()
    try:
        return _merge(args, device)
    finally:
        gc.unfreeze()  # the handler may run inside a bigger process (tests, notebooks)
        torch.set_num_threads(before)


def _merge(args: argparse.Namespace, device) -> int:
    from .._io import check_output_dir
    from ..editing.config import load_merge_config
    from ..editing.lines import format_lines_table
    from ..editing.merge import execute_plan
    from ..editing.merge.plan import MergePlan

    config = load_merge_config(args.config)
    out = None
    if args.out is not None:  # before any checkpoint is opened; --dry-run checks it too
        inputs = [args.config, *(m.path for m in config.models)]
        if config.base_model is not None:
            inputs.append(config.base_model)
        out = check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    plan = config.plan()
    for part in [plan] if isinstance(plan, MergePlan) else [p for _, p in plan.parts]:
        part.device = device
    print(plan.describe())
    if args.dry_run:
        return 0
    result = execute_plan(
        plan,
        out,
        progress=not args.no_progress,
        record={"config": config.to_dict(), "config_text": config.source_text},
        overwrite=args.overwrite,
    )
    if result.lines_table is not None:
        print(f"LiNeS: alpha = {result.lines_alpha:.6g}, beta = {result.lines_beta:.6g}")
        print(format_lines_table(result.lines_table))
    print(f"merged model written to {result.out}")
    return 0
