"""Run M3ID end to end: the image-free prompt, two decoding paths, and text in / text out.

Two implementations of the same rule (:mod:`layerwise.decoding.m3id`):

* ``path="processor"``: :class:`M3IDLogitsProcessor` inside ``generate``'s own loop, attached to the model's
  output so that it acts before ``generate``'s processors; the image-free branch is a second forward pass
  per step with its own KV cache.
* ``path="batched"``: :func:`m3id_custom_generate`, a decoding loop passed to
  ``generate(custom_generate=...)`` that stacks the conditional and the unconditional rows into one batch of
  ``2 * batch`` rows, so each step costs one forward pass.

Both apply M3ID first, then ``generate``'s logits processors (bad words, repetition penalty, temperature,
top-k, ...), and give the same tokens for greedy decoding with any of them (tested). The image-free
prompt of a Llava-family model drops the image tokens (default) or keeps their positions with the attention
mask set to 0 there (``"mask"``); for any conditional LM (e.g. document-grounded generation) pass the
condition-free prompts yourself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._validation import check_choice, check_seed
from ..errors import ParameterError, ParameterTypeError
from ._hf import forward_step, positions_from_mask, require
from .m3id import M3IDLogitsProcessor, check_m3id_params, check_plausibility, m3id_scores

__all__ = ["unconditional_inputs", "m3id_custom_generate", "m3id_generate", "left_pad", "contrastive_loop"]

PATHS = ("processor", "batched")
UNCONDITIONAL_MODES = ("drop", "mask")


def left_pad(rows: Sequence[torch.Tensor], length: int, value: int) -> torch.Tensor:
    """Stack 1-D tensors into (len(rows), length), padding each on the left with ``value``."""
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype, device=rows[0].device)
    for i, row in enumerate(rows):
        if row.numel():
            out[i, length - row.numel() :] = row
    return out


def unconditional_inputs(
    inputs: Mapping[str, torch.Tensor], *, image_token_id: int, pad_token_id: int = 0, mode: str = "drop"
) -> dict[str, torch.Tensor]:
    """Build the image-free prompt of a Llava-family batch.

    Parameters
    ----------
    inputs : the processor's output with ``input_ids`` (batch, length) and ``attention_mask`` (batch,
        length), left-padded.
    image_token_id : id of the image placeholder token (``model.config.image_token_id``).
    pad_token_id : id written into padding (never attended).
    mode : ``"drop"`` removes the image tokens and re-pads on the left (positions shift down, as if the
        prompt had no image); ``"mask"`` keeps every position, sets the attention mask to 0 on the image
        tokens and returns explicit ``position_ids`` equal to the conditional ones.

    Returns
    -------
    dict with ``input_ids`` and ``attention_mask`` (batch, length_u), plus ``position_ids`` for ``"mask"``.
    """
    check_choice("mode", mode, UNCONDITIONAL_MODES)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    is_image = ids == image_token_id
    if mode == "mask":
        return {
            "input_ids": ids.masked_fill(is_image, pad_token_id),
            "attention_mask": mask.masked_fill(is_image, 0),
            "position_ids": positions_from_mask(mask),
        }
    keep = mask.bool() & ~is_image  # (batch, length)
    rows = [ids[i][keep[i]] for i in range(ids.shape[0])]
    length = max(1, max(r.numel() for r in rows))
    out_ids = left_pad(rows, length, pad_token_id)
    out_mask = left_pad([torch.ones_like(r) for r in rows], length, 0)
    return {"input_ids": out_ids, "attention_mask": out_mask}


def m3id_custom_generate(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    m3id_unconditional_ids: torch.Tensor | None = None,
    m3id_unconditional_attention_mask: torch.Tensor | None = None,
    m3id_unconditional_position_ids: torch.Tensor | None = None,
    m3id_lambda: float = 0.02,
    m3id_alpha: float = 0.3,
    m3id_t0: float = 0.0,
    m3id_max_weight: float | None = None,
    m3id_plausibility: float | None = None,
    **model_kwargs: Any,
) -> torch.LongTensor:
    """Batched M3ID decoding loop for ``model.generate(..., custom_generate=m3id_custom_generate)``.

    Conditional rows (``input_ids``, with ``pixel_values`` etc. in ``model_kwargs``) and unconditional rows
    (``m3id_unconditional_*``) are left-padded to one length and run as a single batch of ``2 * batch`` rows
    with one KV cache; M3ID is applied first, then ``generate``'s own processors (temperature, top-k, ...),
    then greedy or multinomial selection. Stopping follows ``generate``'s criteria (max length, EOS).

    Returns
    -------
    (batch, prompt_length + new_tokens) token ids, like ``generate``.
    """
    lambda_, alpha, t0, max_weight = check_m3id_params(m3id_lambda, m3id_alpha, m3id_t0, m3id_max_weight)
    plausibility = check_plausibility(m3id_plausibility)
    if m3id_unconditional_ids is None:
        raise ParameterError("m3id_unconditional_ids is required (the condition-free prompt)")

    def rule(cond: torch.Tensor, other: torch.Tensor, t: int) -> torch.Tensor:
        return m3id_scores(cond, other, t, lambda_=lambda_, alpha=alpha, t0=t0, max_weight=max_weight,
                           plausibility=plausibility)

    return contrastive_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, rule,
                            m3id_unconditional_ids, m3id_unconditional_attention_mask,
                            m3id_unconditional_position_ids, streamer=streamer, model_kwargs=model_kwargs)


def contrastive_loop(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    rule: Any,
    other_ids: torch.Tensor,
    other_mask: torch.Tensor | None = None,
    other_positions: torch.Tensor | None = None,
    *,
    streamer: Any = None,
    model_kwargs: dict[str, Any] | None = None,
    other_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.LongTensor:
    """The batched decoding loop shared by every contrastive rule (M3ID, VCD, ...).

    The ``b`` prompt rows (``input_ids``; ``model_kwargs`` such as ``pixel_values``) and the ``b`` contrast
    rows (``other_ids`` / ``other_mask`` / ``other_positions``: an image-free prompt for M3ID, the same
    prompt for VCD) are left-padded to one length and run as one batch of ``2 b`` rows with one KV cache.
    ``other_kwargs`` (e.g. the noised ``pixel_values`` of VCD) are appended to ``model_kwargs`` along the
    first dimension for the contrast rows; without them only the prompt rows carry the extra inputs.
    At each step ``rule(cond_logprobs, other_logprobs, t)`` -> (b, vocab) scores, then ``generate``'s
    processors, then greedy or multinomial selection; ``t`` counts generated tokens.

    Returns
    -------
    (b, prompt_length + new_tokens) token ids, like ``generate``.
    """
    model_kwargs = dict(model_kwargs or {})
    if getattr(generation_config, "num_beams", 1) > 1:
        raise ParameterError(
            "contrastive decoding supports greedy decoding and sampling only, got "
            f"num_beams={generation_config.num_beams}"
        )
    b, device = input_ids.shape[0], input_ids.device
    pad = generation_config._pad_token_tensor
    pad_id = int(pad) if pad is not None else 0
    c_mask = model_kwargs.pop("attention_mask", None)
    c_mask = torch.ones_like(input_ids) if c_mask is None else c_mask.long()
    c_pos = positions_from_mask(c_mask)
    u_ids = other_ids.to(device)
    u_mask = other_mask
    u_mask = torch.ones_like(u_ids) if u_mask is None else u_mask.to(device).long()
    u_pos = other_positions
    u_pos = positions_from_mask(u_mask) if u_pos is None else u_pos.to(device).long()
    k = 1
    if u_ids.shape[0] != b:
        if b % u_ids.shape[0]:
            raise ParameterError(f"the contrast prompts have {u_ids.shape[0]} rows, the prompt batch has {b}")
        k = b // u_ids.shape[0]  # num_return_sequences: generate repeats each prompt k times
        u_ids, u_mask, u_pos = (x.repeat_interleave(k, dim=0) for x in (u_ids, u_mask, u_pos))
    # One batch of 2b rows: prompt rows first, then contrast rows; both left-padded to one length.
    length = max(input_ids.shape[1], u_ids.shape[1])
    ids = torch.cat([left_pad(list(input_ids), length, pad_id), left_pad(list(u_ids), length, pad_id)])
    mask = torch.cat([left_pad(list(c_mask), length, 0), left_pad(list(u_mask), length, 0)])
    pos = torch.cat([left_pad(list(c_pos), length, 0), left_pad(list(u_pos), length, 0)])  # (2b, length)
    for name in ("position_ids", "cache", "past_key_values", "use_cache", "cache_position"):
        model_kwargs.pop(name, None)
    extra = model_kwargs  # M3ID: only prompt rows hold image tokens, so pixel_values fit as is
    for name, value in (other_kwargs or {}).items():
        value = value.to(device)
        if k > 1 and value.shape[0] * k == extra[name].shape[0]:
            value = value.repeat_interleave(k, dim=0)
        extra[name] = torch.cat([extra[name], value.to(extra[name].dtype)])

    eos_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(b, dtype=torch.long, device=device)
    cache, t = None, 0
    while True:
        logits, cache = forward_step(model, ids, mask, pos, cache, **extra)  # logits: (2b, vocab)
        extra = {}
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = rule(logprobs[:b], logprobs[b:], t)
        scores = logits_processor(input_ids, scores)
        if generation_config.do_sample:
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        if eos_criteria:  # finished rows keep emitting padding, as in generate
            next_tokens = next_tokens * unfinished + pad_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if unfinished.max() == 0:
            break
        ids = torch.cat([next_tokens, next_tokens])[:, None]  # (2b, 1): the same token feeds both branches
        mask = torch.cat([mask, mask.new_ones(2 * b, 1)], dim=1)
        pos = pos[:, -1:] + 1
        t += 1
    if streamer is not None:
        streamer.end()
    return input_ids


def _image_token_id(model: Any, tokenizer: Any) -> int:
    for source, name in (
        (model.config, "image_token_id"),
        (model.config, "image_token_index"),
        (tokenizer, "image_token_id"),
    ):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    raise ParameterError(
        "cannot find the image token id on model.config or the tokenizer; pass unconditional_prompts"
    )


def m3id_generate(
    model: Any,
    processor_or_tokenizer: Any,
    images: Sequence[Any] | None,
    prompts: Sequence[str],
    *,
    unconditional_prompts: Sequence[str] | None = None,
    lambda_: float = 0.02,
    alpha: float = 0.3,
    t0: float = 0.0,
    max_weight: float | None = None,
    plausibility: float | None = None,
    unconditional: str = "drop",
    path: str = "processor",
    seed: int | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate with M3ID and return the decoded new text of each prompt.

    Parameters
    ----------
    model : a transformers Llava-family model or any causal LM.
    processor_or_tokenizer : the model's processor (with images) or tokenizer (text-only conditioning).
    images : one image per prompt (PIL or arrays the processor accepts), or None for text conditions.
    prompts : conditional prompts (with the image placeholder for a VLM, or with the document/condition).
    unconditional_prompts : condition-free prompts, one per prompt; required when ``images`` is None
        (document-grounded generation: the prompt without the document). With images they replace the
        automatic image-free prompt.
    lambda_, alpha, t0, max_weight : the M3ID rule (see :func:`layerwise.decoding.m3id_scores`).
    plausibility : optional VCD-style cutoff (off by default, as in the paper).
    unconditional : ``"drop"`` (remove image tokens) or ``"mask"`` (keep positions, mask them out).
    path : ``"processor"`` (logits processor in generate's loop) or ``"batched"`` (one 2x batch per step).
    seed : seed for sampling (the global torch RNG is forked, so the caller's RNG state is unchanged).
    generate_kwargs : passed to ``model.generate`` (``max_new_tokens``, ``do_sample``, ...). Beam search
        (``num_beams > 1``) is refused.

    Returns
    -------
    list of ``len(prompts) * num_return_sequences`` strings (special tokens skipped).
    """
    require("transformers", "hf")

    check_m3id_params(lambda_, alpha, t0, max_weight)
    check_plausibility(plausibility)
    check_choice("path", path, PATHS)
    check_choice("unconditional", unconditional, UNCONDITIONAL_MODES)
    num_beams = generate_kwargs.get("num_beams", getattr(model.generation_config, "num_beams", 1)) or 1
    if num_beams > 1:
        raise ParameterError(
            f"M3ID supports greedy decoding and sampling only (num_beams=1), got num_beams={num_beams}"
        )
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ParameterTypeError("prompts must be a sequence of strings")
    if images is not None and len(images) != len(prompts):
        raise ParameterError(f"images must have one entry per prompt ({len(prompts)}), got {len(images)}")
    if unconditional_prompts is not None and len(unconditional_prompts) != len(prompts):
        raise ParameterError(
            f"unconditional_prompts must have one entry per prompt ({len(prompts)}), "
            f"got {len(unconditional_prompts)}"
        )
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if images is not None:
        inputs = processor_or_tokenizer(
            images=list(images), text=list(prompts), padding=True, padding_side="left", return_tensors="pt"
        )
    else:
        if unconditional_prompts is None:
            raise ParameterError(
                "unconditional_prompts is required when images is None (the condition-free prompts)"
            )
        inputs = tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if unconditional_prompts is not None:
        unc = tokenizer(list(unconditional_prompts), padding=True, padding_side="left", return_tensors="pt")
        unc = {k: unc[k].to(model.device) for k in ("input_ids", "attention_mask")}
    else:
        unc = unconditional_inputs(
            inputs, image_token_id=_image_token_id(model, tokenizer), pad_token_id=pad_id, mode=unconditional
        )
    generate_kwargs.setdefault("pad_token_id", pad_id)
    hook: Any = contextlib.nullcontext()
    if path == "processor":
        # M3ID acts on the model's log-probabilities, before generate's own processors (as in the batched
        # loop): attach it to the model's output rather than appending it to generate's processor chain.
        hook = M3IDLogitsProcessor(
            model, unc, lambda_=lambda_, alpha=alpha, t0=t0, max_weight=max_weight, plausibility=plausibility
        ).attach()
        extra: dict[str, Any] = {}
    else:
        extra = {
            "custom_generate": m3id_custom_generate,
            "m3id_unconditional_ids": unc["input_ids"],
            "m3id_unconditional_attention_mask": unc["attention_mask"],
            "m3id_unconditional_position_ids": unc.get("position_ids"),
            "m3id_lambda": lambda_,
            "m3id_alpha": alpha,
            "m3id_t0": t0,
            "m3id_max_weight": max_weight,
            "m3id_plausibility": plausibility,
        }
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng, hook:
        if seed is not None:
            torch.manual_seed(check_seed(seed))
        out = model.generate(**inputs, **extra, **generate_kwargs)
    new = out[:, inputs["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
