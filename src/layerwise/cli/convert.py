"""``layerwise convert-checkpoint IN.pt --out OUT.safetensors``: a pickled torch checkpoint (a state dict or a
whole ``torch.save(model)``, as the task-vector papers publish them) to safetensors, without running code
from the file (:mod:`layerwise.editing.convert`)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-checkpoint",
        help="pickled torch checkpoint (state dict or whole module) -> safetensors, without running its code",
        description="Read a torch.save file (zip or legacy format; a state dict or a whole pickled nn.Module "
        "such as the task_vectors / tangent_task_arithmetic ImageEncoder checkpoints) with a restricted "
        "unpickler that never imports the classes it names and refuses functions outside its allow-list, "
        "and write its tensors (state_dict order and names) to one safetensors file, atomically.",
    )
    p.add_argument("checkpoint", help="the .pt/.pth/.bin file")
    p.add_argument("--out", required=True, help="output .safetensors file (new unless --overwrite)")
    p.add_argument(
        "--prefix",
        default=None,
        help="keep only tensors whose names start with PREFIX and strip it (e.g. 'model.' for the "
        "task-vector ImageEncoder, giving open_clip's 'visual.*' names)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--allow-opaque-calls",
        action="store_true",
        help="record calls of unknown callables in the pickle (e.g. enum members of pickled transforms) as "
        "inert placeholders instead of refusing the file; they are never run either way",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..editing.convert import convert_checkpoint

    info = convert_checkpoint(
        args.checkpoint,
        args.out,
        prefix=args.prefix,
        overwrite=args.overwrite,
        allow_opaque_calls=args.allow_opaque_calls,
    )
    print(
        f"wrote {info['tensors']} tensors ({info['parameters']:,} elements, {', '.join(info['dtypes'])}) "
        f"to {info['out']}"
    )
    return 0
