"""How much a VLM relies on the image, position by position along its own greedy caption.

M3ID's premise (Favero et al., CVPR 2024, Sec. 3 and Fig. 2): as a caption grows, the next-token
distribution with the image ``p_c`` drifts toward the distribution without it ``p_u`` (the language prior
takes over), and hallucinations appear where that happens. :func:`visual_reliance` measures it on a
trajectory: greedy-decode with the image (the image placeholder token banned), then score the same
tokens teacher-forced with and without the image and report, per generated position ``t``,

* ``kl[t] = KL(p_c || p_u) = sum_k p_c(k) (log p_c(k) - log p_u(k))`` in nats, and
* ``image_attention[t]``: the attention mass that the query at that position puts on the image tokens,
  averaged over heads and layers (only when the model returns attentions, e.g. eager attention).

Both are computed with two teacher-forced forward passes over the whole batch (left padding handled by
the attention mask and position ids), not by re-decoding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._validation import check_choice, check_int
from ._hf import positions_from_mask, require
from .generate import UNCONDITIONAL_MODES, _image_token_id, unconditional_inputs

__all__ = ["RelianceResult", "visual_reliance", "plot_reliance"]


@dataclass(frozen=True)
class RelianceResult:
    """Per-position reliance on the image of a batch of greedy captions.

    Attributes
    ----------
    kl : (batch, steps) float64, ``KL(p_c || p_u)`` in nats at generated position ``t`` (0-based).
    image_attention : (batch, steps) float64 attention mass on image tokens, or None when the model
        does not return attentions.
    tokens : (batch, steps) the greedy tokens.
    valid : (batch, steps) bool, False after a row's end-of-sequence token (padding).
    """

    kl: torch.Tensor
    image_attention: torch.Tensor | None
    tokens: torch.Tensor
    valid: torch.Tensor

    def mean_over_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean KL (and attention mass) per position over the rows still generating: (steps,) each."""
        count = self.valid.sum(0).clamp(min=1)
        kl = (self.kl * self.valid).sum(0) / count
        att = None if self.image_attention is None else (self.image_attention * self.valid).sum(0) / count
        return kl, att


def visual_reliance(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    unconditional: str = "drop",
    attentions: bool = True,
) -> RelianceResult:
    """Greedy-decode ``prompts`` with ``images`` and measure the reliance on the image at each position.

    Parameters
    ----------
    model : a transformers Llava-family model.
    processor : its processor (images + text).
    images, prompts : one image per prompt; prompts hold the image placeholder.
    max_new_tokens : length of the greedy captions (>= 1).
    unconditional : image-free prompt, ``"drop"`` (remove image tokens) or ``"mask"`` (keep positions,
        mask them out), as in :func:`layerwise.decoding.unconditional_inputs`.
    attentions : also return the attention mass on image tokens (the model runs with eager attention for
        that forward pass, then goes back to its own implementation).

    Returns
    -------
    :class:`RelianceResult` with (batch, max_new_tokens) tensors.
    """
    require("transformers", "hf")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    check_choice("unconditional", unconditional, UNCONDITIONAL_MODES)
    if len(images) != len(prompts):
        raise ValueError(f"images must have one entry per prompt ({len(prompts)}), got {len(images)}")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = processor(
        images=list(images), text=list(prompts), padding=True, padding_side="left", return_tensors="pt"
    )
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    image_id = _image_token_id(model, tokenizer)
    with torch.no_grad():  # the image placeholder is banned: a caption that holds one cannot be re-scored
        seq = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            bad_words_ids=[[image_id]],
        )
    gen = seq[:, prompt_len:]  # (batch, steps)
    steps = gen.shape[1]
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    valid = torch.ones_like(gen, dtype=torch.bool)
    for e in eos_ids:  # positions after the first EOS are padding
        hit = (gen == e).long().cumsum(1)
        valid &= (hit - (gen == e).long()) == 0
    ones = torch.ones_like(gen)

    # (1) with the image: teacher-forced over prompt + caption; logits at prompt_len - 1 + t predict token t
    c_mask = torch.cat([inputs["attention_mask"].long(), ones], 1)
    c_ids = torch.cat([inputs["input_ids"], gen], 1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad(), _eager_attention(model, attentions):
        out_c = model(
            input_ids=c_ids,
            attention_mask=c_mask,
            position_ids=positions_from_mask(c_mask),
            output_attentions=attentions,
            return_dict=True,
            **extra,
        )
    lc = torch.log_softmax(out_c.logits[:, prompt_len - 1 : prompt_len - 1 + steps].double(), -1)

    # (2) without it: the image-free prompt of the chosen mode, then the same caption tokens
    unc = unconditional_inputs(inputs, image_token_id=image_id, pad_token_id=pad_id, mode=unconditional)
    u_len = unc["input_ids"].shape[1]
    u_ids = torch.cat([unc["input_ids"], gen], 1)
    u_mask = torch.cat([unc["attention_mask"].long(), ones], 1)
    if "position_ids" in unc:
        last = unc["position_ids"][:, -1:]
        u_pos = torch.cat([unc["position_ids"], last + torch.arange(1, steps + 1, device=last.device)], 1)
    else:
        u_pos = positions_from_mask(u_mask)
    with torch.no_grad():
        out_u = model(input_ids=u_ids, attention_mask=u_mask, position_ids=u_pos, return_dict=True)
    lu = torch.log_softmax(out_u.logits[:, u_len - 1 : u_len - 1 + steps].double(), -1)
    kl = (lc.exp() * (lc - lu)).sum(-1).clamp(min=0.0)  # (batch, steps); clamp: rounding below 0

    image_attention = None
    atts = getattr(out_c, "attentions", None) if attentions else None
    if atts is not None and all(a is not None for a in atts):
        is_image = c_ids == image_id  # (batch, length)
        # each layer: (batch, heads, query, key); keep the queries that predict caption tokens
        stacked = torch.stack([a[:, :, prompt_len - 1 : prompt_len - 1 + steps] for a in atts])
        mass = (stacked.double() * is_image[None, :, None, None, :]).sum(-1)  # (layers, batch, heads, steps)
        image_attention = mass.mean(dim=(0, 2))
    return RelianceResult(kl=kl, image_attention=image_attention, tokens=gen, valid=valid)


@contextlib.contextmanager
def _eager_attention(model: Any, wanted: bool) -> Iterator[None]:
    """Switch a transformers model to eager attention for the block (only eager returns attention
    weights), then back to what it was."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = wanted and before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def plot_reliance(curves: dict[str, RelianceResult | Sequence[RelianceResult]], ax: Any = None) -> Any:
    """Plot mean KL(p_c || p_u) against the generated position for each labelled result (mean over rows and
    results, shaded +- one std over results when several are given). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, results in curves.items():
        results = [results] if isinstance(results, RelianceResult) else list(results)
        means = torch.stack([r.mean_over_batch()[0] for r in results])  # (n, steps)
        t = torch.arange(means.shape[1])
        mu = means.mean(0)
        ax.plot(t, mu, label=f"{label} (n={len(results)})")
        if len(results) > 1:
            sd = means.std(0)
            ax.fill_between(t, mu - sd, mu + sd, alpha=0.2)
    ax.set_xlabel("generated position t")
    ax.set_ylabel("KL(p_c || p_u)  [nats]")
    ax.set_title("reliance on the image along the caption")
    ax.legend()
    return ax.figure
