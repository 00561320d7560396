"""``layerwise m3id``: M3ID decoding with a local Hugging Face model folder (Llava family or causal LM)."""

from __future__ import annotations

import argparse

from ..errors import ParameterError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("m3id", help="M3ID decoding against visual hallucination (Hugging Face models)")
    msub = p.add_subparsers(dest="m3id_command", metavar="ACTION", title="actions")
    g = msub.add_parser(
        "generate",
        help="generate with M3ID from a model folder",
        description="Load a Llava-family model folder (with --image) or a causal LM (without), generate with "
        "M3ID and print one line per prompt. Remote code is not run unless --trust-remote-code is given.",
    )
    g.add_argument("--model", required=True, help="model folder (save_pretrained) or hub id")
    g.add_argument(
        "--image",
        action="append",
        default=None,
        help="image file, one per --prompt (repeat); omit for a text-conditioned LM",
    )
    g.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt with the image placeholder (e.g. 'USER: <image>\\nDescribe. ASSISTANT:'); repeat",
    )
    g.add_argument(
        "--unconditional-prompt",
        action="append",
        default=None,
        help="condition-free prompt, one per --prompt (required without --image)",
    )
    g.add_argument(
        "--lambda", dest="lambda_", type=float, default=0.02, help="forgetting rate (default 0.02)"
    )
    g.add_argument("--alpha", type=float, default=0.3, help="gate threshold on max p (default 0.3)")
    g.add_argument("--t0", type=float, default=0.0, help="step offset (about the question length for VQA)")
    g.add_argument("--max-weight", type=float, default=None, help="clamp of the weight exp(lambda t) - 1")
    g.add_argument(
        "--plausibility",
        type=float,
        default=None,
        help="optional VCD-style cutoff beta: keep tokens with p >= beta max p on corrected steps (off)",
    )
    g.add_argument(
        "--unconditional",
        choices=("drop", "mask"),
        default="drop",
        help="image-free prompt: drop image tokens (default) or mask them keeping positions",
    )
    g.add_argument(
        "--path",
        choices=("processor", "batched"),
        default="batched",
        help="logits-processor path or batched decoding loop (default: batched, faster)",
    )
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="seed for --sample")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model is loaded in (default float32)")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument("--trust-remote-code", action="store_true", help="run the folder's own modelling code")
    g.set_defaults(func=_generate)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _generate(args: argparse.Namespace) -> int:
    from .._extras import require_extras
    from .._validation import check_seed

    require_extras(("hf",), "layerwise m3id generate")  # before torch and transformers are imported
    if args.sample:
        check_seed(args.seed)
    from ..decoding import m3id_generate
    from ..decoding.loading import load_for_m3id

    images = None
    if args.image:
        from PIL import Image

        if len(args.image) != len(args.prompt):
            raise ParameterError(
                f"--image must be given once per --prompt ({len(args.prompt)}), got {len(args.image)}"
            )
        images = [Image.open(path).convert("RGB") for path in args.image]
    model, processor = load_for_m3id(
        args.model,
        vision=images is not None,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        device=args.device,
    )
    texts = m3id_generate(
        model,
        processor,
        images,
        args.prompt,
        unconditional_prompts=args.unconditional_prompt,
        lambda_=args.lambda_,
        alpha=args.alpha,
        t0=args.t0,
        max_weight=args.max_weight,
        plausibility=args.plausibility,
        unconditional=args.unconditional,
        path=args.path,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        seed=args.seed if args.sample else None,
    )
    for text in texts:
        print(text)
    return 0
