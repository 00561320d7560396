"""``layerwise m3id``: M3ID decoding with a local Hugging Face model folder (Llava family or causal LM)."""

from __future__ import annotations

import argparse

from ..errors import ParameterError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .._device import add_device_argument

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
    add_device_argument(g, help="where the model runs")
    g.add_argument("--trust-remote-code", action="store_true", help="run the folder's own modelling code")
    g.set_defaults(func=_generate)
    for name, help_text in (("pope", "POPE yes/no questions on a fixed list of images, per-question results"),
                            ("chair", "CHAIR captions on a fixed list of image ids, per-caption results")):
        b = msub.add_parser(name, help=help_text, description=help_text + ". Images are IMAGES/<id>.png|jpg|"
                            "jpeg. Writes OUT (CSV, one row per question/caption) and OUT with .json (rows "
                            "and summary metrics).")
        b.add_argument("--model", required=True, help="Llava-family model folder (save_pretrained) or hub id")
        b.add_argument("--images", required=True, help="folder of images named <image id>.<png|jpg|jpeg>")
        if name == "pope":
            b.add_argument("--questions", required=True,
                           help='JSON list of {"image_id", "object", "label": true|false|"yes"|"no"}')
            b.add_argument("--template", default="<image> is there a {} ?",
                           help="question with {} for the object (default '<image> is there a {} ?')")
        else:
            b.add_argument("--annotations", required=True, help='JSON {"<image id>": ["object", ...], ...}')
            b.add_argument("--ids", default=None,
                           help="text file, one image id per line (default: every annotated id, sorted)")
            b.add_argument("--synonyms", default=None,
                           help='JSON {"object": ["synonym", ...]} (default: each annotated object alone)')
            b.add_argument("--prompt", default="<image> describe :",
                           help="caption prompt with the image token")
        b.add_argument("--method", default="greedy",
                       help="decoding method: greedy, m3id or vcd (default greedy)")
        b.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                       help="option of the method, e.g. lambda_=0.1 alpha=0.6 (m3id), alpha=1 beta=0.1 "
                            "noise_step=500 (vcd); repeat")
        b.add_argument("--seed", type=int, default=0, help="seed (VCD noise, sampling); default 0")
        b.add_argument("--max-new-tokens", type=int, default=4 if name == "pope" else 32,
                       help="tokens generated per answer")
        b.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
        b.add_argument("--out", required=True, help="output CSV file (a .json with the summary beside it)")
        b.add_argument("--overwrite", action="store_true", help="replace existing output files")
        b.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="dtype the model is loaded in (default float32)")
        add_device_argument(b, help="where the model runs")
        b.add_argument("--trust-remote-code", action="store_true", help="run the folder's own modelling code")
        b.set_defaults(func=_benchmark, benchmark=name)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _option_value(text: str) -> object:
    """``KEY=VALUE`` values: none -> None, true/false -> bool, numbers -> int/float, else the string."""
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _read_json(path: str, what: str) -> object:
    import json
    from pathlib import Path

    from ..errors import InputDataError

    p = Path(path)
    if not p.is_file():
        raise InputDataError(f"{what} file {path} does not exist or is not a file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise InputDataError(f"{what} file {path} is not valid JSON: {err}") from None


def _benchmark(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .._device import resolve_device
    from .._extras import require_extras
    from .._validation import check_seed
    from ..errors import InputDataError

    device = resolve_device(args.device, name="--device")  # a bad device: one line before any work
    require_extras(("hf",), f"layerwise m3id {args.benchmark}")
    check_seed(args.seed)
    from .._io import check_output_file, write_csv, write_json
    from ..decoding._hf import model_source, read_rgb_image
    from ..decoding.benchmarks import DECODERS, run_chair, run_pope
    from ..decoding.loading import load_for_m3id

    DECODERS.get(args.method)  # an unknown method: one line before anything is loaded
    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ParameterError(f"--set takes KEY=VALUE with a Python name as KEY, got {item!r}")
        options[key] = _option_value(value)
    out = check_output_file(args.out, overwrite=args.overwrite)
    out_json = check_output_file(out.with_suffix(".json"), overwrite=args.overwrite)
    if out_json == out:
        raise ParameterError("--out must not end in .json (the summary is written there)")
    model_source(args.model, "--model")
    folder = Path(args.images)
    if not folder.is_dir():
        raise InputDataError(f"--images folder not found: {args.images}")

    def image_of(image_id: str) -> object:
        for ext in (".png", ".jpg", ".jpeg"):
            if (folder / f"{image_id}{ext}").is_file():
                return read_rgb_image(folder / f"{image_id}{ext}")
        raise InputDataError(f"no image {image_id}.png/.jpg/.jpeg in {args.images}")

    if args.benchmark == "pope":
        questions = _read_json(args.questions, "--questions")
        if not isinstance(questions, list) or not all(isinstance(q, dict) for q in questions):
            raise InputDataError("--questions must hold a JSON list of objects")
        ids = list(dict.fromkeys(str(q.get("image_id")) for q in questions))
    else:
        annotations = _read_json(args.annotations, "--annotations")
        if not isinstance(annotations, dict) or not all(isinstance(v, list) for v in annotations.values()):
            raise InputDataError('--annotations must hold a JSON object {"<image id>": ["object", ...]}')
        if args.ids is not None:
            if not Path(args.ids).is_file():
                raise InputDataError(f"--ids file {args.ids} does not exist or is not a file")
            ids = [line.strip() for line in Path(args.ids).read_text().splitlines() if line.strip()]
        else:
            ids = sorted(annotations)
        synonyms = _read_json(args.synonyms, "--synonyms") if args.synonyms else None
        if synonyms is None:
            synonyms = {str(o): [] for objs in annotations.values() for o in objs}
        if not isinstance(synonyms, dict):
            raise InputDataError('--synonyms must hold a JSON object {"object": ["synonym", ...]}')
    images = {i: image_of(i) for i in ids}
    model, processor = load_for_m3id(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype,
                                     device=device)
    kw = dict(method=args.method, seed=args.seed, max_new_tokens=args.max_new_tokens,
              batch_size=args.batch_size, **options)
    if args.benchmark == "pope":
        rows, summary = run_pope(model, processor, images, questions, template=args.template, **kw)
    else:
        rows, summary = run_chair(model, processor, images, annotations, ids, synonyms, prompt=args.prompt,
                                  **kw)
    write_csv(out, rows)
    write_json(out_json, {"summary": summary, "rows": rows})
    keys = ("accuracy", "f1", "yes_ratio") if args.benchmark == "pope" else ("chair_s", "chair_i", "cover")
    print(f"{args.benchmark} {args.method} (seed {args.seed}, {len(rows)} rows): "
          + ", ".join(f"{k} {summary[k]:.3f}" for k in keys) + f" -> {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .._device import resolve_device
    from .._extras import require_extras
    from .._validation import check_seed

    device = resolve_device(args.device, name="--device")  # a bad device: one line before any work
    require_extras(("hf",), "layerwise m3id generate")  # before torch and transformers are imported
    if args.sample:
        check_seed(args.seed)
    from ..decoding import m3id_generate
    from ..decoding._hf import model_source, read_rgb_image
    from ..decoding.loading import load_for_m3id

    model_source(args.model, "--model")  # before loading anything: a missing folder is one line
    images = None
    if args.image:
        if len(args.image) != len(args.prompt):
            raise ParameterError(
                f"--image must be given once per --prompt ({len(args.prompt)}), got {len(args.image)}"
            )
        images = [read_rgb_image(path) for path in args.image]
    model, processor = load_for_m3id(
        args.model,
        vision=images is not None,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        device=device,
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
