"""POPE and CHAIR runners: a fixed list of image ids, one decoding method, a seed, per-question results.

A run is fully described by its inputs, so two runs with the same ids, method, options and seed give the
same rows (CPU). Decoding methods come from the registry :data:`DECODERS` (``greedy``, ``m3id``, ``vcd``);
register another ``fn(model, processor, images, prompts, *, seed, max_new_tokens, **options) -> list[str]``
to compare it on the same protocol.

* :func:`run_pope`: questions ``{"image_id", "object", "label"}`` (label True when the object is in the
  image) -> one row per question (``image_id``, ``object``, ``label``, ``answer``, ``parsed``, ``correct``)
  and the summary of :func:`layerwise.decoding.pope_metrics`.
* :func:`run_chair`: image ids with their annotated objects -> one row per caption (``image_id``,
  ``caption``, ``mentioned``, ``hallucinated``) and the summary of :func:`layerwise.decoding.chair`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._registry import Registry
from .._validation import check_int, check_seed
from ..errors import InputDataError, ParameterError
from .metrics import SynonymTable, chair, extract_objects, parse_yes_no, pope_metrics

__all__ = ["DECODERS", "decode", "run_pope", "run_chair", "POPE_TEMPLATE"]

POPE_TEMPLATE = "<image> is there a {} ?"
DECODERS: Registry[Callable[..., list[str]]] = Registry("decoding method")


@DECODERS.register("greedy")
def _greedy(model: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str], *, seed: int,
            max_new_tokens: int, **options: Any) -> list[str]:
    if options:
        raise ParameterError(f"greedy decoding takes no options, got {sorted(options)}")
    tok = getattr(processor, "tokenizer", processor)
    inputs = processor(images=list(images), text=list(prompts), padding=True, padding_side="left",
                       return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@DECODERS.register("m3id")
def _m3id(model: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str], *, seed: int,
          max_new_tokens: int, **options: Any) -> list[str]:
    from .generate import m3id_generate

    options.setdefault("path", "batched")
    return m3id_generate(model, processor, images, prompts, max_new_tokens=max_new_tokens, do_sample=False,
                         **options)


@DECODERS.register("vcd")
def _vcd(model: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str], *, seed: int,
         max_new_tokens: int, **options: Any) -> list[str]:
    from .vcd import vcd_generate

    options.setdefault("noise_seed", seed)  # the distorted images are drawn from the run's seed
    return vcd_generate(model, processor, images, prompts, max_new_tokens=max_new_tokens, do_sample=False,
                        **options)


def decode(method: str, model: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str], *,
           seed: int = 0, max_new_tokens: int = 16, batch_size: int = 16, **options: Any) -> list[str]:
    """Decode ``prompts`` (one image each) with the registered ``method`` in batches of ``batch_size``.

    ``options`` go to the method (e.g. ``lambda_``, ``alpha`` for ``m3id``; ``alpha``, ``beta``,
    ``noise_step`` for ``vcd``). Returns one string per prompt.
    """
    fn = DECODERS.get(method)
    seed = check_seed(seed)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    if len(images) != len(prompts):
        raise ParameterError(f"images must have one entry per prompt ({len(prompts)}), got {len(images)}")
    import torch

    out: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            out += fn(model, processor, list(images[start:start + batch_size]),
                      list(prompts[start:start + batch_size]), seed=seed + start,
                      max_new_tokens=max_new_tokens, **dict(options))
    return out


def _image(images: Mapping[str, Any], image_id: str) -> Any:
    if image_id not in images:
        raise InputDataError(f"image id {image_id!r} has no image (known ids: {len(images)})")
    return images[image_id]


def run_pope(model: Any, processor: Any, images: Mapping[str, Any], questions: Sequence[Mapping[str, Any]],
             *, method: str = "greedy", seed: int = 0, template: str = POPE_TEMPLATE,
             max_new_tokens: int = 4, batch_size: int = 16, **options: Any) -> tuple[list[dict], dict]:
    """POPE on ``questions`` (in the given order) with ``method``; returns ``(rows, summary)``.

    Parameters
    ----------
    images : image id -> image (PIL or what the processor accepts).
    questions : ``{"image_id", "object", "label"}`` with ``label`` a bool (or "yes"/"no").
    template : the question, with ``{}`` for the object and the model's image placeholder.
    options : passed to the decoding method.
    """
    if template.count("{}") != 1:
        raise ParameterError(f"template must contain '{{}}' once, got {template!r}")
    items = []
    for i, q in enumerate(questions):
        try:
            image_id, obj, label = str(q["image_id"]), str(q["object"]), q["label"]
        except (KeyError, TypeError):
            raise InputDataError(f"question {i} must have image_id, object and label, got {q!r}") from None
        if isinstance(label, str) and label.lower() in ("yes", "no"):
            label = label.lower() == "yes"
        if not isinstance(label, bool):
            raise InputDataError(f"question {i}: label must be true/false or yes/no, got {label!r}")
        items.append((image_id, obj, label))
    imgs = [_image(images, image_id) for image_id, _, _ in items]
    prompts = [template.format(obj) for _, obj, _ in items]
    answers = decode(method, model, processor, imgs, prompts, seed=seed, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, **options)
    rows = []
    for (image_id, obj, label), answer in zip(items, answers, strict=True):
        parsed = parse_yes_no(answer)
        rows.append({"image_id": image_id, "object": obj, "label": label, "answer": answer,
                     "parsed": "" if parsed is None else ("yes" if parsed else "no"),
                     "correct": parsed is not None and parsed == label})
    metrics = pope_metrics(answers, [label for _, _, label in items])
    summary = {"method": method, "seed": seed, "options": options, **metrics}
    return rows, summary


def run_chair(model: Any, processor: Any, images: Mapping[str, Any], annotations: Mapping[str, Sequence[str]],
              image_ids: Sequence[str], synonyms: SynonymTable | Mapping[str, Sequence[str]], *,
              method: str = "greedy", seed: int = 0, prompt: str = "<image> describe :",
              max_new_tokens: int = 32, batch_size: int = 16, **options: Any) -> tuple[list[dict], dict]:
    """Caption each image of ``image_ids`` (in order) with ``method``; returns ``(rows, summary)``.

    ``annotations`` maps an image id to its canonical objects; ``synonyms`` is the object vocabulary
    (canonical name -> synonyms) that :func:`layerwise.decoding.chair` uses.
    """
    ids = [str(i) for i in image_ids]
    missing = [i for i in ids if i not in annotations]
    if missing:
        raise InputDataError(f"image ids without annotations: {missing[:5]}")
    table = synonyms if isinstance(synonyms, SynonymTable) else SynonymTable(synonyms)
    captions = decode(method, model, processor, [_image(images, i) for i in ids], [prompt] * len(ids),
                      seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size, **options)
    rows = []
    for image_id, caption in zip(ids, captions, strict=True):
        found = extract_objects(caption, table)
        truth = set(annotations[image_id])
        rows.append({"image_id": image_id, "caption": caption, "mentioned": " ".join(sorted(found)),
                     "hallucinated": " ".join(sorted(set(found) - truth))})
    summary = {"method": method, "seed": seed, "options": options,
               **chair(captions, [annotations[i] for i in ids], table)}
    return rows, summary
