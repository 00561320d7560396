"""``layerwise extract-lora BASE FT --rank R --out DIR``: a fine-tune's update as a PEFT LoRA adapter."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract-lora",
        help="extract a LoRA adapter (truncated SVD per layer) from a fine-tuned model and its base",
        description="Truncated SVD of (W_ft - W_base) for every 2-D weight of the transformer blocks, saved "
        "as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) with the relative "
        "Frobenius error of each layer (extraction.json / extraction.csv). Written atomically.",
        allow_abbrev=False,
    )
    p.add_argument("base", help="the base model (safetensors file, HF folder, sharded folder or torch file)")
    p.add_argument("finetuned", help="the fine-tuned model (same keys and shapes as BASE)")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank r (>= 1)")
    p.add_argument("--out", required=True, help="adapter folder; must be new or empty unless --overwrite")
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="also extract the 2-D weights outside the blocks (embeddings as lora_embedding, output head)",
    )
    p.add_argument("--pattern", default=None, help="regex whose first group is the block index")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="factor dtype (default: base's)",
    )
    p.add_argument("--device", default=None,
                   help="where the SVDs run: cpu (default), cuda, cuda:1, mps, auto (CUDA when available)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if an earlier layerwise run wrote it"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..editing.extract_lora import extract_lora
    from ..editing.merge.plan import merge_device

    merge_device(args.device, name="--device")  # a device this machine lacks: one line, before any work
    res = extract_lora(
        args.base,
        args.finetuned,
        args.rank,
        args.out,
        embeddings=args.embeddings,
        pattern=args.pattern,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    errors = [r["rel_error"] for r in res.layers]
    worst = max(res.layers, key=lambda r: r["rel_error"])
    print(
        f"{len(res.layers)} layers at rank <= {args.rank}: relative Frobenius error mean "
        f"{sum(errors) / len(errors):.4g}, max {worst['rel_error']:.4g} ({worst['key']})"
    )
    if res.not_captured:
        names = ", ".join(r["key"] for r in res.not_captured[:5])
        more = f" and {len(res.not_captured) - 5} more" if len(res.not_captured) > 5 else ""
        print(f"changed but not in the adapter (see extraction.json): {names}{more}")
    print(f"adapter written to {res.out} (per-layer errors in extraction.json / extraction.csv)")
    return 0
