"""Time per generated token: greedy vs M3ID (processor path, attached to the model output as
``m3id_generate(path="processor")`` runs it; and appended to ``logits_processor`` as before) vs M3ID
(batched path) vs VCD (the same batched loop, contrast rows with the noised image), same process.

Run: ``.venv/bin/python benchmarks/bench_m3id.py [--quick] [--device cuda --large]``

Models are toy Llavas built from config (random weights, so generation runs to max_new_tokens): the tiny one
of the experiment (hidden 64) where per-step Python overhead dominates, and a wider one (hidden 256, 4
layers) where the forward pass weighs more. The target is an overhead of at most 1.3x greedy for the faster
M3ID path; published implementations cost about 2x.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from PIL import Image
from transformers import LogitsProcessorList

from layerwise._device import add_device_argument, resolve_device
from layerwise.decoding import (
    M3IDLogitsProcessor,
    diffusion_noise,
    m3id_custom_generate,
    unconditional_inputs,
    vcd_custom_generate,
)
from layerwise.decoding.toy_vlm import (
    SceneSpec,
    build_processor,
    build_toy_llava,
    render_scene,
    sample_scenes,
)
from layerwise.errors import ParameterError


def _time_interleaved(fns, repeats: int) -> list[float]:
    """Best-of-``repeats`` wall time of each function, timed in alternation so load drifts hit all alike."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _processor_path(model, inputs, unc, kw):
    p = M3IDLogitsProcessor(model, unc, lambda_=0.02, alpha=0.3)  # one processor per generate call
    with p.attach():  # as m3id_generate(path="processor") runs it: M3ID before generate's processors
        return model.generate(**inputs, **kw)


def _appended_processor_path(model, inputs, unc, kw):
    p = M3IDLogitsProcessor(model, unc, lambda_=0.02, alpha=0.3)
    return model.generate(**inputs, logits_processor=LogitsProcessorList([p]), **kw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable on shared CPUs)"
    )
    add_device_argument(parser, help="where the models run")
    parser.add_argument("--large", action="store_true", help="add a hidden-1024, 8-layer model (for GPUs)")
    args = parser.parse_args()
    try:
        args.device = resolve_device(args.device, name="--device")
    except ParameterError as err:
        parser.exit(2, f"error: {err}\n")
    torch.set_num_threads(args.threads)
    repeats, new_tokens = (3, 16) if args.quick else (5, 32)
    spec = SceneSpec()
    proc = build_processor(spec)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, new tokens per call: {new_tokens}")
    print(
        f"{'model':<22}{'batch':>6}{'greedy ms/tok':>15}{'processor x':>13}{'appended x':>12}"
        f"{'batched x':>11}{'vcd x':>8}{'same':>8}"
    )
    sizes = [("toy (hidden 64)", 64, 2), ("wider (hidden 256)", 256, 4)]
    if args.large:
        sizes.append(("large (hidden 1024)", 1024, 8))
    for label, hidden, layers in sizes:
        model = build_toy_llava(spec, hidden=hidden, layers=layers, vision_hidden=64).to(args.device)
        model.generation_config.eos_token_id = None
        for batch in (1, 8, 32) if args.large else (1, 8):
            scenes = sample_scenes(spec, batch, seed=0)
            images = [Image.fromarray(render_scene(spec, s, seed=i)) for i, s in enumerate(scenes)]
            inputs = proc(
                images=images,
                text=["<image> describe :"] * batch,
                padding=True,
                padding_side="left",
                return_tensors="pt",
            )
            inputs = {k: v.to(args.device) for k, v in inputs.items()}
            unc = unconditional_inputs(inputs, image_token_id=model.config.image_token_id)
            kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}

            greedy = partial(model.generate, **inputs, **kw)
            batched_path = partial(
                model.generate,
                **inputs,
                custom_generate=m3id_custom_generate,
                m3id_unconditional_ids=unc["input_ids"],
                m3id_unconditional_attention_mask=unc["attention_mask"],
                **kw,
            )
            noised = diffusion_noise(inputs["pixel_values"], 500, seed=0)
            vcd_path = partial(
                model.generate,
                **inputs,
                custom_generate=vcd_custom_generate,
                vcd_pixel_values=inputs["pixel_values"],
                vcd_noised_pixel_values=noised,
                **kw,
            )
            processor_path = partial(_processor_path, model, inputs, unc, kw)
            appended = partial(_appended_processor_path, model, inputs, unc, kw)

            with torch.no_grad():
                fns = [greedy, processor_path, appended, batched_path, vcd_path]
                t_g, t_p, t_a, t_b, t_v = _time_interleaved(fns, repeats)
                same = torch.equal(processor_path(), batched_path())  # the two paths' greedy tokens
            per_tok = 1000 * t_g / new_tokens
            print(
                f"{label:<22}{batch:>6}{per_tok:>15.2f}{t_p / t_g:>13.2f}{t_a / t_g:>12.2f}{t_b / t_g:>11.2f}"
                f"{t_v / t_g:>8.2f}{str(same):>8}"
            )


if __name__ == "__main__":
    main()
