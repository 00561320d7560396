"""LoRA extraction: a fine-tune's update, layer by layer, as a low-rank PEFT adapter.

For every 2-D weight ``W`` of the transformer blocks (and, with ``embeddings=True``, the embedding and
output matrices outside them) the task vector ``D = W_ft - W_base`` (out, in) is replaced by its best rank-r
approximation in Frobenius norm (Eckart-Young): the truncated SVD ``D_r = U_r S_r V_r^T``. The factors are
stored in PEFT's layout with the singular values shared between them (``A = sqrt(S_r) V_r^T`` (r, in),
``B = U_r sqrt(S_r)`` (out, r)) and ``lora_alpha = r``, so that peft's ``scaling * B @ A`` is ``D_r``;
embeddings use ``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (dim, r), the factors of ``D^T``.
A layer whose smaller side is below ``rank`` keeps its full rank (``rank_pattern``/``alpha_pattern``).

The relative error of each layer, ``||D - D_r||_F / ||D||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)`` (0 for
an unchanged layer; the truncation error of the factors computed in float32, before they are
stored in ``dtype``), is reported, as are the tensors that changed but that an adapter cannot carry (norms,
biases, and the embeddings unless asked for) with their relative change ``||D||_F / ||W_base||_F``.

Memory: one layer at a time (base, fine-tune, task vector and its SVD), wherever the SVD runs (``device``);
the factors are written from the CPU straight to their place in the output file, which appears atomically
(:func:`layerwise._io.atomic_directory`) with ``extraction.json`` / ``extraction.csv`` (the report).

Example
-------
>>> base = {"layers.0.w.weight": torch.zeros(4, 3)}
>>> ft = {"layers.0.w.weight": torch.outer(torch.arange(4.0), torch.ones(3))}
>>> res = extract_lora(base, ft, rank=1)
>>> sorted(res.tensors), round(res.layers[0]["rel_error"], 6)
(['base_model.model.layers.0.w.lora_A.weight', 'base_model.model.layers.0.w.lora_B.weight'], 0.0)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_directory, check_output_dir, write_csv, write_json
from .._validation import check_int
from ..errors import CheckpointError, ParameterError, ParameterTypeError
from .checkpoints import ShardedSafetensorsWriter, check_compatible, open_checkpoint
from .lines import discover_blocks
from .task_vector import compute_dtype

__all__ = ["LoraExtraction", "extract_lora", "lora_targets"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# last segment of a module name that is an ``nn.Embedding`` (HF Llama/Mistral/Qwen, GPT-2, BERT, T5, OPT)
EMBEDDING_NAMES = frozenset(
    {
        "embed_tokens",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "tok_embeddings",
        "embed_positions",
        "shared",
    }
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoraExtraction:
    """What :func:`extract_lora` returns.

    Attributes
    ----------
    out : the adapter folder (None when the adapter was kept in memory).
    layers : one record per extracted layer: ``key``, ``module``, ``kind`` (``linear``/``embedding``),
        ``shape``, ``rank``, ``rel_error`` (relative Frobenius error), ``delta_norm`` (``||D||_F``).
    not_captured : tensors that changed but are not in the adapter: ``key``, ``shape``, ``rel_change``.
    config : the ``adapter_config.json`` mapping.
    tensors : the adapter tensors (``out=None`` only).
    """

    out: Path | None
    layers: list[dict[str, Any]]
    not_captured: list[dict[str, Any]]
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def lora_targets(
    keys_shapes: Mapping[str, tuple[int, ...]], *, embeddings: bool = False, pattern: str | None = None
) -> dict[str, str]:
    """``{key: kind}`` of the weights to extract: 2-D ``*.weight`` tensors inside residual blocks
    (:func:`~.lines.discover_blocks`; ``pattern`` as there) are ``"linear"``; with ``embeddings`` the 2-D
    weights outside the blocks too, ``"embedding"`` when the module's last name segment is one of
    :data:`EMBEDDING_NAMES`, else ``"linear"`` (an output head)."""
    two_d = [k for k, s in keys_shapes.items() if len(s) == 2 and k.endswith(".weight")]
    layout = discover_blocks(list(keys_shapes), pattern)
    out = {}
    for k in two_d:
        if k in layout.depth:
            out[k] = "linear"
        elif embeddings:
            last = k[: -len(".weight")].rsplit(".", 1)[-1]
            out[k] = "embedding" if last in EMBEDDING_NAMES else "linear"
    return out


def _factors(delta: torch.Tensor, rank: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(A, B, rel_error, ||D||_F)``: rank-``rank`` factors of ``delta`` (``delta^T`` for embeddings)."""
    d = delta.T if kind == "embedding" else delta
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    a = root[:, None] * vh[:r]  # (r, in)
    b = u[:, :r] * root[None, :]  # (out, r)
    s64 = s.double()
    total = float((s64**2).sum())
    rest = float((s64[r:] ** 2).sum())
    rel = math.sqrt(rest / total) if total > 0 else 0.0
    return a, b, rel, math.sqrt(total)


def _names(module: str, kind: str) -> tuple[str, str]:
    if kind == "embedding":
        return f"base_model.model.{module}.lora_embedding_A", f"base_model.model.{module}.lora_embedding_B"
    return f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"


def _task_type(base_source: str) -> str | None:
    """``CAUSAL_LM`` when the base folder's ``config.json`` names a ``*ForCausalLM`` architecture."""
    cfg = Path(base_source) / "config.json"
    try:
        arch = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in arch) else None


def extract_lora(
    base: Any,
    finetuned: Any,
    rank: int,
    out: str | os.PathLike | None = None,
    *,
    embeddings: bool = False,
    pattern: str | None = None,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> LoraExtraction:
    """Extract a rank-``rank`` LoRA adapter of ``finetuned - base`` (see the module docstring).

    Parameters
    ----------
    base, finetuned : checkpoints with the same keys and shapes (paths, state dicts or Checkpoints).
    rank : the LoRA rank ``r >= 1`` (a layer with a smaller side keeps that side's full rank).
    out : the adapter folder (new, or an earlier layerwise output with ``overwrite``); None: in memory.
    embeddings : also extract the 2-D weights outside the residual blocks (embeddings, output head).
    pattern : block-index regular expression for unusual layouts (as :func:`~.lines.discover_blocks`).
    dtype : dtype of the stored factors (``float32``, ``float16``, ``bfloat16``); None: the base's.
    device : where the SVDs run (``"cpu"``, ``"cuda"``…, ``"auto"`` = CUDA when available); None: CPU.
        Results are written from the CPU.
    overwrite, progress : replace an earlier output; show a progress bar.
    """
    from .merge.plan import merge_device

    rank = check_int("rank", rank, low=1, high=2**31 - 1)
    if not isinstance(embeddings, bool):
        raise ParameterTypeError(f"embeddings must be True or False, got {embeddings!r}")
    if dtype is not None and dtype not in _DTYPES:
        raise ParameterError(f"dtype must be one of {sorted(_DTYPES)} or None (the base's), got {dtype!r}")
    dev = merge_device(device)
    inputs = [x for x in (base, finetuned) if isinstance(x, (str, os.PathLike))]
    if out is not None:
        out = check_output_dir(out, overwrite=overwrite, inputs=inputs)
    base_ck = open_checkpoint(base, name="base")
    ft_ck = open_checkpoint(finetuned, name="finetuned")
    try:
        check_compatible([base_ck, ft_ck])
        floats = {k: base_ck.shape(k) for k in base_ck.keys() if base_ck.dtype(k).is_floating_point}
        try:
            targets = lora_targets(floats, embeddings=embeddings, pattern=pattern)
        except ParameterError as err:
            raise ParameterError(f"extract-lora needs residual blocks: {err}") from None
        if not targets:
            raise CheckpointError(f"{base_ck.source}: no 2-D weights inside the residual blocks to extract")
        ranks = {k: min(rank, *floats[k]) for k in targets}
        out_dtype = {k: _DTYPES[dtype] if dtype else base_ck.dtype(k) for k in targets}
        specs = []
        for k, kind in targets.items():
            a_name, b_name = _names(k[: -len(".weight")], kind)
            rows, cols = floats[k] if kind == "linear" else floats[k][::-1]
            specs += [(a_name, (ranks[k], cols), out_dtype[k]), (b_name, (rows, ranks[k]), out_dtype[k])]
        config = _adapter_config(base_ck.source, targets, ranks)
        if out is None:
            tensors: dict[str, torch.Tensor] = {}
            layers, missed = _run(
                base_ck,
                ft_ck,
                targets,
                ranks,
                out_dtype,
                dev,
                progress,
                lambda name, t: tensors.__setitem__(name, t),
            )
            return LoraExtraction(None, layers, missed, config, tensors)
        with atomic_directory(out) as tmp:
            writer = ShardedSafetensorsWriter(tmp, specs, 2**62, metadata={"format": "pt"})
            layers, missed = _run(base_ck, ft_ck, targets, ranks, out_dtype, dev, progress, writer.write)
            writer.close()
            (tmp / "model.safetensors").rename(tmp / ADAPTER_WEIGHTS)
            write_json(tmp / "adapter_config.json", config)
            write_json(
                tmp / "extraction.json",
                {
                    "rank": rank,
                    "layers": layers,
                    "not_captured": missed,
                    "base": base_ck.source,
                    "finetuned": ft_ck.source,
                },
            )
            write_csv(
                tmp / "extraction.csv", [{**r, "shape": "x".join(map(str, r["shape"]))} for r in layers]
            )
        return LoraExtraction(Path(out), layers, missed, config)
    finally:
        base_ck.close()
        ft_ck.close()


def _adapter_config(base_source: str, targets: Mapping[str, str], ranks: Mapping[str, int]) -> dict:
    r = max(ranks.values())
    other = {k[: -len(".weight")]: v for k, v in ranks.items() if v != r}
    return {
        "peft_type": "LORA",
        "task_type": _task_type(base_source),
        "base_model_name_or_path": base_source,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        "target_modules": sorted(k[: -len(".weight")] for k in targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _run(base_ck, ft_ck, targets, ranks, out_dtype, dev, progress, sink):
    """Stream the layers: SVD of each target on ``dev``, the factors into ``sink(name, tensor)`` (CPU)."""
    from tqdm.auto import tqdm

    layers, missed = [], []
    for k in tqdm(base_ck.keys(), desc="extracting LoRA", unit="tensor", disable=not progress):
        if not base_ck.dtype(k).is_floating_point:
            continue
        cd = compute_dtype(base_ck.dtype(k))
        w0 = base_ck.get(k).to(device=dev, dtype=cd)
        delta = ft_ck.get(k).to(device=dev, dtype=cd) - w0
        shape = tuple(base_ck.shape(k))
        if k not in targets:
            dn = float(delta.double().norm())
            if dn > 0:
                bn = float(w0.double().norm())
                missed.append({"key": k, "shape": list(shape), "rel_change": dn / bn if bn > 0 else math.inf})
            continue
        kind = targets[k]
        if not bool(torch.isfinite(delta).all()):
            raise CheckpointError(f"tensor {k!r}: the task vector holds inf/NaN; nothing was written")
        a, b, rel, dn = _factors(delta, ranks[k], kind)
        a_name, b_name = _names(k[: -len(".weight")], kind)
        sink(a_name, a.to(device="cpu", dtype=out_dtype[k]).contiguous())
        sink(b_name, b.to(device="cpu", dtype=out_dtype[k]).contiguous())
        layers.append(
            {
                "key": k,
                "module": k[: -len(".weight")],
                "kind": kind,
                "shape": list(shape),
                "rank": ranks[k],
                "rel_error": rel,
                "delta_norm": dn,
            }
        )
        del w0, delta, a, b
    return layers, missed
