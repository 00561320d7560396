"""``layerwise eight-task CONFIG.yaml --out DIR``: the 8-task protocol of task arithmetic on CLIP (addition,
negation, tangent space, LiNeS) for image folders and FusionBench-style fine-tunes
(:mod:`layerwise.tangent.eight_task`)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eight-task",
        help="task addition / negation / tangent space / LiNeS on CLIP fine-tunes: absolute and normalized "
        "accuracy per task",
        description="Evaluate CLIP fine-tunes (one CLIPVisionModel folder per task, FusionBench layout) "
        "under zero-shot heads on your image folders with the 8-task protocol; coefficients are chosen on "
        "the val folders (else on the test folders). Accuracy and normalized accuracy (accuracy / individual "
        "fine-tuned accuracy) go to OUT: results.json, results.csv, results.txt, accuracy.png (atomically). "
        "Config: see layerwise.tangent.eight_task.",
    )
    p.add_argument("config", help="YAML config (pretrained, finetuned_root, tasks, methods, grids, ...)")
    p.add_argument("--out", required=True, help="output folder; new or empty unless --overwrite")
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if an earlier layerwise run wrote it"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate the config and print the tasks; run nothing"
    )
    from .._device import add_device_argument

    add_device_argument(p, default=None, help="where the encoder runs (overrides the config's device)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from .._device import resolve_device
    from .._io import check_output_dir
    from ..tangent.eight_task import format_table, load_eight_task_config, run_eight_task

    cfg = load_eight_task_config(args.config)
    if args.device is not None:
        cfg = dataclasses.replace(cfg, device=str(resolve_device(args.device, name="--device")))
    tasks = [*cfg.tasks, *([cfg.control] if cfg.control else [])]
    inputs = [args.config, *(p for t in tasks for p in (t.data, t.val, t.finetuned, t.linearized) if p)]
    out = check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    print(f"pretrained: {cfg.pretrained}; methods: {', '.join(cfg.methods)}")
    for t in cfg.tasks:
        print(
            f"task {t.name}: images {t.data}" + (f", val {t.val}" if t.val else "") + f"; model {t.finetuned}"
        )
    if args.dry_run:
        return 0
    results = run_eight_task(cfg, out)
    print(format_table(results))
    print(f"results written to {out}")
    return 0
