"""``layerwise diffusion``: forward-backward measurements (C(r), chi) on a user's diffusion checkpoints."""

from __future__ import annotations

import argparse

from .._device import add_device_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diffusion", help="forward-backward on real diffusion models: text | images")
    dsub = p.add_subparsers(dest="diffusion_command", metavar="KIND", title="kinds")

    t = dsub.add_parser(
        "text",
        help="masked diffusion LM: mask a fraction t, mask-predict back, token-change correlations",
        description="Cut a text file into passages, run forward-backward with a masked LM checkpoint "
        "(AutoModelForMaskedLM folder or hub id) at each mask fraction, and write results.json/.csv, "
        "chi.png and C_of_r.png into --out.",
    )
    t.add_argument("--model", required=True, help="masked-LM checkpoint folder (or hub id)")
    t.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: --model)")
    t.add_argument("--mask-id", type=int, default=None, help="mask token id (default: the tokenizer's)")
    t.add_argument("--text", required=True, help="UTF-8 text file to cut into passages")
    t.add_argument("--levels", type=float, nargs="+", required=True, help="mask fractions in [0, 1]")
    t.add_argument("--n-passages", type=int, default=32, help="passages (default 32)")
    t.add_argument("--length", type=int, default=128, help="tokens per passage (default 128)")
    t.add_argument("--n-trajectories", type=int, default=16,
                   help="maskings per passage and level (default 16)")
    t.add_argument("--n-steps", type=int, default=16, help="denoising steps back to t=0 (default 16)")
    t.add_argument("--strategy", choices=("ancestral", "confidence"), default="ancestral",
                   help="MDLM ancestral sampler (default) or mask-predict by confidence")
    t.add_argument("--r-max", type=float, default=10.0, help="chi and xi over r <= R_MAX (default 10)")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per model call (default 16)")
    add_device_argument(t, help="where the model runs")
    t.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's own Python code (off by default; some MDLM models need it)")
    t.add_argument("--seed", type=int, default=0, help="seed of the noise and the sampler (default 0)")
    t.add_argument("--out", required=True, help="output folder (new or empty)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace --out if an earlier layerwise run wrote it (other folders are refused)")
    t.set_defaults(func=_text)

    i = dsub.add_parser(
        "images",
        help="diffusers UNet + DDPM/DDIM: noise to step t, denoise back, patch-embedding changes",
        description="Run forward-backward with a diffusers pipeline folder (unet/ + scheduler/) from each "
        "timestep, measure changes of a Hugging Face vision encoder's patch embeddings, and write "
        "results.json/.csv, chi.png and C_of_r.png into --out.",
    )
    i.add_argument("--pipeline", required=True,
                   help="diffusers pipeline folder (or hub id) with unet/, scheduler/")
    i.add_argument("--encoder", required=True, help="HF vision model (ViT, DINOv2, CLIP) folder or hub id")
    i.add_argument("--encoder-size", type=int, default=None,
                   help="encoder input resolution (default: its config's image_size); grid = size // patch")
    i.add_argument("--timesteps", type=int, nargs="+", required=True, help="forward steps to start from")
    i.add_argument("--images", default=None, help="folder of starting images (default: generate them)")
    i.add_argument("--n-images", type=int, default=16, help="starting images (default 16)")
    i.add_argument("--n-trajectories", type=int, default=8,
                   help="reverse chains per image and step (default 8)")
    i.add_argument("--n-inference-steps", type=int, default=50, help="inference schedule length (default 50)")
    i.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim",
                   help="reverse sampler (default ddim)")
    i.add_argument("--batch-size", type=int, default=16, help="images per UNet call (default 16)")
    add_device_argument(i, help="where the model runs")
    i.add_argument("--trust-remote-code", action="store_true", help="allow the encoder's own Python code")
    i.add_argument("--normalization", choices=("processor", "imagenet"), default="processor",
                   help="image mean/std before the encoder: from its image processor (default; refused if "
                   "it has none) or the ImageNet statistics")
    i.add_argument("--seed", type=int, default=0, help="seed of the noise and the sampler (default 0)")
    i.add_argument("--out", required=True, help="output folder (new or empty)")
    i.add_argument("--overwrite", action="store_true",
                   help="replace --out if an earlier layerwise run wrote it (other folders are refused)")
    i.set_defaults(func=_images)

    p.set_defaults(func=lambda args: p.print_help() or 2)


def _text(args: argparse.Namespace) -> int:
    from .._device import resolve_device
    from ..diffusion.runner import run_text

    device = resolve_device(args.device, name="--device")  # a bad device: one line, before any work

    res = run_text(args.model, args.text, args.out, args.levels, n_passages=args.n_passages,
                   length=args.length, n_trajectories=args.n_trajectories, n_steps=args.n_steps,
                   strategy=args.strategy,
                   batch_size=args.batch_size, r_max=args.r_max, seed=args.seed, device=device,
                   trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer, mask_id=args.mask_id,
                   overwrite=args.overwrite)
    for lv in res["levels"]:
        print(f"t={lv['level']:.3f}  change={lv['change_probability']:.4f}  chi={lv['chi']:.3f}  "
              f"chi(r<={args.r_max:g})={lv['chi_r_max']:.3f}  xi={lv['xi']:.2f}")
    print(f"wrote {args.out}/results.json")
    return 0


def _images(args: argparse.Namespace) -> int:
    from .._device import resolve_device
    from ..diffusion.runner import run_images

    device = resolve_device(args.device, name="--device")  # a bad device: one line, before any work

    res = run_images(args.pipeline, args.encoder, args.out, args.timesteps, images=args.images,
                     n_images=args.n_images, n_trajectories=args.n_trajectories,
                     n_inference_steps=args.n_inference_steps, scheduler=args.scheduler,
                     batch_size=args.batch_size, seed=args.seed, device=device,
                     trust_remote_code=args.trust_remote_code, encoder_size=args.encoder_size,
                     normalization=args.normalization, overwrite=args.overwrite)
    for lv in res["levels"]:
        print(f"t={lv['timestep']}  change={lv['change_probability']:.4f}  chi={lv['chi']:.3f}  "
              f"xi={lv['xi']:.2f}")
    print(f"wrote {args.out}/results.json")
    return 0
