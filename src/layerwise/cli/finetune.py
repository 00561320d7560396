"""``layerwise finetune CONFIG.yaml --out DIR``: fine-tune an encoder per task under frozen heads (non-linear
and/or linearized) and write checkpoints that ``layerwise merge`` merges."""

from __future__ import annotations

import argparse

from .._device import add_device_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune an image encoder per task (non-linear or in the tangent space) from YAML",
        description="Fine-tune a CLIP image encoder (or a built-in toy model) on each task of CONFIG under "
        "the task's frozen zero-shot head, non-linearly and/or linearized, and write safetensors checkpoints "
        "plus ready merge configs into OUT (atomically). See layerwise.tangent.workflow for the format.",
        allow_abbrev=False,
    )
    p.add_argument("config", help="YAML fine-tuning config")
    p.add_argument(
        "--out",
        required=True,
        help="output folder; must be new or empty unless --overwrite (written atomically)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if an earlier layerwise command created it and nothing was added to it since",
    )
    add_device_argument(p, default=None, help="where to fine-tune; default: the config's model.device, "
                        "else cpu")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print it; train nothing")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from .._device import resolve_device
    from .._io import check_output_dir
    from ..tangent.workflow import load_finetune_job, run_finetune_job

    job = load_finetune_job(args.config)
    if args.device is not None:  # the flag wins over the config's model.device
        job = dataclasses.replace(job, device=str(resolve_device(args.device, name="--device")))
    inputs = [args.config, *(p for t in job.tasks for p in (t.train, t.val) if p is not None)]
    if job.path is not None:
        inputs.append(job.path)
    out = check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    print(f"model: {job.kind} {job.path or ''}".rstrip())
    print(f"tasks: {', '.join(t.name for t in job.tasks)}; modes: {', '.join(job.modes)}")
    print(f"fine-tuning: {job.finetune.to_dict()}")
    print(f"device: {job.device}")
    if args.dry_run:
        return 0
    run_finetune_job(job, out, progress=not args.no_progress)
    print(f"checkpoints written to {out} (merge with: layerwise merge {out}/merge_<mode>.yaml --out M)")
    return 0
