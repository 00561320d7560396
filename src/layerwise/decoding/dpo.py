"""M3ID + DPO: label-free preference pairs and a thin wrapper around TRL's ``DPOTrainer`` (extra ``dpo``).

Pairs (Favero et al., CVPR 2024, Sec. 4): for an image and a prompt,

* chosen ``y_w``: the response decoded with M3ID (image-grounded);
* rejected ``y_l``: the first sentence of the image-conditioned greedy response, continued by the image-free
  model ``p(y | x)`` (so it stays on topic but drifts to the language prior).

No labels are used. Training is standard DPO with the pre-trained VLM as the frozen reference.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .._validation import check_float, check_int
from ..errors import ParameterError
from ._hf import require
from .generate import m3id_generate

__all__ = ["first_sentence", "first_words", "build_preference_pairs", "train_dpo"]

_SENTENCE_END = re.compile(r"[.!?](\s|$)")


def first_sentence(text: str) -> str:
    """The text up to and including the first ``.``, ``!`` or ``?`` followed by a space or the end."""
    m = _SENTENCE_END.search(text)
    return text[: m.start() + 1].strip() if m else text.strip()


def first_words(n: int) -> Callable[[str], str]:
    """A prefix function keeping the first ``n`` whitespace-separated words (for one-sentence captions)."""
    n = check_int("n", n, low=0)
    return lambda text: " ".join(text.split()[:n])


def _greedy(
    model: Any, tokenizer_or_processor: Any, prompts: list[str], images: list[Any] | None, **kw: Any
) -> list[str]:
    tok = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    if images is None:
        inputs = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    else:
        inputs = tokenizer_or_processor(
            images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt"
        )
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(**inputs, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    return tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def build_preference_pairs(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    prefix: Callable[[str], str] = first_sentence,
    lambda_: float = 0.02,
    alpha: float = 0.3,
    t0: float = 0.0,
    max_weight: float | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    drop_ties: bool = True,
) -> list[dict[str, Any]]:
    """Label-free DPO rows ``{"images": [image], "prompt", "chosen", "rejected"}`` for TRL's DPOTrainer.

    Parameters
    ----------
    model, processor : a Llava-family model and its processor (the tokenizer must know the image token).
    images, prompts : one image per prompt; prompts contain the image placeholder.
    prefix : maps the image-conditioned greedy response to the prefix of the rejected response
        (default: its first sentence; :func:`first_words` for one-sentence captions).
    lambda_, alpha, t0, max_weight : M3ID settings for the chosen responses.
    max_new_tokens, batch_size : generation length and batch size.
    drop_ties : skip pairs whose chosen and rejected texts are equal (they carry no preference).

    Returns
    -------
    list of dicts. Prompts get the BOS token prepended as text and completions the EOS token appended,
    because TRL's vision collator tokenizes with ``add_special_tokens=False``.
    """
    if len(images) != len(prompts):
        raise ParameterError(f"images must have one entry per prompt ({len(prompts)}), got {len(images)}")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    tok = processor.tokenizer
    image_token = getattr(tok, "image_token", None) or getattr(processor, "image_token", None)
    if image_token is None:
        raise ParameterError(
            "the processor's tokenizer has no image_token; cannot build the image-free prompt"
        )
    rows: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        imgs, ps = list(images[start : start + batch_size]), list(prompts[start : start + batch_size])
        chosen = m3id_generate(
            model,
            processor,
            imgs,
            ps,
            lambda_=lambda_,
            alpha=alpha,
            t0=t0,
            max_weight=max_weight,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            path="batched",
        )
        conditioned = _greedy(model, processor, ps, imgs, max_new_tokens=max_new_tokens)
        heads = [prefix(c) for c in conditioned]
        # The image-free model continues the prompt without the image, after the on-topic prefix.
        free_prompts = [
            " ".join((p.replace(image_token, " ").strip() + " " + h).split())
            for p, h in zip(ps, heads, strict=True)
        ]
        tails = _greedy(model, tok, free_prompts, None, max_new_tokens=max_new_tokens)
        for img, p, c, h, tail in zip(imgs, ps, chosen, heads, tails, strict=True):
            rejected = " ".join((h + " " + tail).split())
            c = " ".join(c.split())
            if drop_ties and c == rejected:
                continue
            bos = tok.bos_token if tok.bos_token and not p.startswith(tok.bos_token) else ""
            eos = tok.eos_token or ""
            rows.append(
                {
                    "images": [img],
                    "prompt": f"{bos}{p}",
                    "chosen": f" {c}{eos}",
                    "rejected": f" {rejected}{eos}",
                }
            )
    return rows


def train_dpo(
    model: Any,
    processor: Any,
    rows: Sequence[dict[str, Any]],
    *,
    beta: float = 0.1,
    learning_rate: float = 1e-6,
    epochs: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    ref_model: Any = None,
    output_dir: str | None = None,
    **config_overrides: Any,
) -> list[dict[str, float]]:
    """Train ``model`` in place with TRL's DPOTrainer on ``rows``; return the trainer's log history.

    Parameters
    ----------
    model, processor : the VLM to train and its processor.
    rows : preference rows from :func:`build_preference_pairs`.
    beta : DPO temperature (TRL default 0.1).
    learning_rate, epochs, batch_size, seed : optimisation (TRL's default learning rate 1e-6 suits
        pre-trained VLMs; a toy model trained from scratch needs about 1e-4).
    ref_model : frozen reference; default a deep copy of ``model`` taken before training (TRL would
        otherwise try to reload it from a hub id).
    output_dir : the trainer's folder (nothing is saved there by default); a temporary folder if None.
    config_overrides : further ``DPOConfig`` fields.

    Notes
    -----
    Runs on the CPU unless ``use_cpu=False`` is passed: TRL's default bf16 fails on CPUs, and gradient
    checkpointing is switched off (a tiny model does not need it).
    """
    require("trl", "dpo")
    require("datasets", "dpo")
    import datasets
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    beta = check_float("beta", beta, low=0.0, low_open=True)
    learning_rate = check_float("learning_rate", learning_rate, low=0.0, low_open=True)
    if not rows:
        raise ParameterError("rows must not be empty (no preference pairs were built)")
    # transformers 5.x renamed gradient_checkpointing -> activation_checkpointing (old name deprecated)
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    )
    ref = ref_model if ref_model is not None else copy.deepcopy(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        settings = {
            "output_dir": output_dir or tmp,
            "use_cpu": model.device.type == "cpu",  # train where the model is (a GPU when moved there)
            "bf16": False,
            "fp16": False,
            checkpointing: False,
            "per_device_train_batch_size": batch_size,
            "num_train_epochs": epochs,
            "learning_rate": learning_rate,
            "beta": beta,
            "seed": seed,
            "data_seed": seed,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 1,
            "max_length": None,
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
        }
        settings.update(config_overrides)
        args = DPOConfig(**settings)
        with warnings.catch_warnings():
            # TRL 1.16 still calls transformers' deprecated is_gradient_checkpointing: not ours to fix
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
            trainer = DPOTrainer(
                model=model,
                ref_model=ref,
                args=args,
                train_dataset=datasets.Dataset.from_list(list(rows)),
                processing_class=processor,
            )
            trainer.remove_callback(PrinterCallback)  # keep stdout clean; the history is returned instead
            trainer.train()
        history = [dict(h) for h in trainer.state.log_history]
    model.eval()
    return history
