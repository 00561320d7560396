"""VCD: visual contrastive decoding (Leng et al., CVPR 2024), on the batched loop M3ID uses.

Paper: "Mitigating Object Hallucinations in Large Vision-Language Models through Visual Contrastive
Decoding", https://arxiv.org/abs/2311.16922 (Sec. 3). With ``l(y | v, x)`` the model's scores with the
image ``v`` and ``l(y | v', x)`` with a distorted image ``v'`` (forward diffusion noise),

    l_vcd = (1 + alpha) l(y | v, x) - alpha l(y | v', x)   where   p(y | v, x) >= beta max_y p(y | v, x)

(the adaptive plausibility constraint: tokens outside it get ``-inf``). Log-probabilities and raw logits
give the same distribution here (they differ by a constant per row). The distortion
(:func:`diffusion_noise`): ``v' = sqrt(abar_T) v + sqrt(1 - abar_T) eps`` on the processor's normalised
pixel values, with the 1000-step sigmoid beta schedule of the authors' released code (betas from 1e-5 to
5e-3); their scripts use ``T = 500``, ``alpha = 1``, ``beta = 0.1``, the defaults here.

Unlike M3ID the contrast branch keeps the image tokens (noised pixels), so both halves of the ``2 b``-row
batch carry ``pixel_values``; :func:`layerwise.decoding.contrastive_loop` runs it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from .._validation import check_float, check_int, check_seed, make_generator
from ..errors import ParameterError, ParameterTypeError
from ._hf import require

__all__ = ["vcd_scores", "diffusion_noise", "vcd_custom_generate", "vcd_generate", "NOISE_STEPS"]

NOISE_STEPS = 1000


def _alpha_bar(step: int) -> float:
    """Cumulative product of ``1 - beta_s`` for s <= step, beta_s = 1e-5 + (5e-3 - 1e-5) sigmoid(linspace)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, NOISE_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, 0)[step])


def diffusion_noise(
    pixel_values: torch.Tensor, step: int = 500, *, seed: int | torch.Generator | None = 0
) -> torch.Tensor:
    """Forward-diffuse normalised pixel values to ``step`` (0..999): ``sqrt(abar) x + sqrt(1 - abar) eps``.

    pixel_values : (n_images, channels, H, W) float, as the processor returns them. Same seed, same noise.

    >>> x = torch.zeros(1, 3, 2, 2)
    >>> float(diffusion_noise(x, 999, seed=0).std()) > 0.5   # almost pure noise at the last step
    True
    """
    step = check_int("noise_step", step, low=0, high=NOISE_STEPS - 1)
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise ParameterTypeError("pixel_values must be a floating-point tensor")
    abar = _alpha_bar(step)
    eps = torch.randn(pixel_values.shape, generator=make_generator(seed), dtype=torch.float32)
    return math.sqrt(abar) * pixel_values + math.sqrt(1 - abar) * eps.to(pixel_values)


def _check(alpha: float, beta: float | None) -> tuple[float, float | None]:
    alpha = check_float("alpha", alpha, low=0.0)
    if beta is not None:
        beta = check_float("beta", beta, low=0.0, high=1.0, low_open=True)
    return alpha, beta


def vcd_scores(
    cond_logprobs: torch.Tensor,
    noised_logprobs: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float | None = 0.1,
) -> torch.Tensor:
    """The VCD rule on (batch, vocab) log-probabilities with the image and with the noised image.

    Returns (batch, vocab) scores ``(1 + alpha) l_c - alpha l_n``, ``-inf`` where ``p_c < beta max p_c``
    (no cutoff with ``beta=None``) and where ``l_c`` is already ``-inf``.

    >>> lc = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    >>> ln = torch.log(torch.tensor([[0.7, 0.1, 0.2]]))
    >>> vcd_scores(lc, ln, alpha=1.0).argmax().item()      # token 1 gains most from the clean image
    1
    """
    alpha, beta = _check(alpha, beta)
    if cond_logprobs.shape != noised_logprobs.shape:
        raise ParameterError(f"cond_logprobs and noised_logprobs must have the same shape, got "
                             f"{tuple(cond_logprobs.shape)} and {tuple(noised_logprobs.shape)}")
    finite = torch.isfinite(cond_logprobs)
    out = torch.where(finite, (1 + alpha) * cond_logprobs - alpha * noised_logprobs.clamp(min=-1e30),
                      cond_logprobs)
    if beta is not None:
        floor = cond_logprobs.max(dim=-1, keepdim=True).values + math.log(beta)
        out = out.masked_fill(cond_logprobs < floor, -math.inf)
    return out


def vcd_custom_generate(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    vcd_pixel_values: torch.Tensor | None = None,
    vcd_noised_pixel_values: torch.Tensor | None = None,
    vcd_alpha: float = 1.0,
    vcd_beta: float | None = 0.1,
    **model_kwargs: Any,
) -> torch.LongTensor:
    """Batched VCD loop for ``model.generate(..., custom_generate=vcd_custom_generate)``: the prompt rows
    with ``vcd_pixel_values`` and the same rows with ``vcd_noised_pixel_values`` form one ``2 b`` batch.

    ``generate`` may have encoded the clean images already (``mm_encoder_outputs`` in transformers 5.x);
    that encoding covers the prompt rows only, so it is dropped and both image sets are encoded in the
    loop's first forward pass.

    Returns (batch, prompt_length + new_tokens) token ids, like ``generate``.
    """
    from .generate import contrastive_loop

    alpha, beta = _check(vcd_alpha, vcd_beta)
    if vcd_pixel_values is None or vcd_noised_pixel_values is None:
        raise ParameterError("VCD needs vcd_pixel_values and vcd_noised_pixel_values (the distorted images)")
    if vcd_pixel_values.shape != vcd_noised_pixel_values.shape:
        raise ParameterError("vcd_noised_pixel_values must have the shape of vcd_pixel_values")
    dropped = ("mm_encoder_outputs", "image_features")
    model_kwargs = {k: v for k, v in model_kwargs.items() if k not in dropped}
    model_kwargs["pixel_values"] = vcd_pixel_values.to(input_ids.device)
    mask = model_kwargs.get("attention_mask")

    def rule(cond: torch.Tensor, noised: torch.Tensor, t: int) -> torch.Tensor:
        return vcd_scores(cond, noised, alpha=alpha, beta=beta)

    return contrastive_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, rule,
                            input_ids, mask, None, streamer=streamer, model_kwargs=model_kwargs,
                            other_kwargs={"pixel_values": vcd_noised_pixel_values})


def vcd_generate(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    alpha: float = 1.0,
    beta: float | None = 0.1,
    noise_step: int = 500,
    noise_seed: int = 0,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate with VCD from a Llava-family ``model`` and its ``processor``; return the new text per prompt.

    Parameters
    ----------
    images, prompts : one image per prompt (with the image placeholder in the prompt).
    alpha, beta : contrast strength and plausibility cutoff (``beta=None``: no cutoff).
    noise_step : diffusion step of the distorted image (0..999); ``noise_seed`` seeds its noise.
    seed : seed for sampling (the caller's global RNG state is left unchanged).
    generate_kwargs : passed to ``model.generate`` (``max_new_tokens``, ``do_sample``, ...); no beam search.
    """
    require("transformers", "hf")
    _check(alpha, beta)
    check_int("noise_step", noise_step, low=0, high=NOISE_STEPS - 1)
    check_seed(noise_seed)
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ParameterTypeError("prompts must be a sequence of strings")
    if images is None or len(images) != len(prompts):
        raise ParameterError(f"images must have one entry per prompt ({len(prompts)})")
    if (generate_kwargs.get("num_beams") or 1) > 1:
        raise ParameterError(f"VCD supports greedy decoding and sampling only, got "
                             f"num_beams={generate_kwargs['num_beams']}")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = processor(images=list(images), text=list(prompts), padding=True, padding_side="left",
                       return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    noised = diffusion_noise(inputs["pixel_values"], noise_step, seed=noise_seed)
    generate_kwargs.setdefault("pad_token_id", pad_id)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(check_seed(seed))
        out = model.generate(**inputs, custom_generate=vcd_custom_generate,
                             vcd_pixel_values=inputs["pixel_values"], vcd_noised_pixel_values=noised,
                             vcd_alpha=alpha, vcd_beta=beta, **generate_kwargs)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
