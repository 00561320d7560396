"""Streaming merge driver: tensor by tensor, chunk by chunk, straight into sharded safetensors.

For each tensor of the base model and each chunk of at most ``chunk_elements`` of its flattened elements,
the driver reads the chunk from the base and every model, forms the task vectors ``(T, n)``, calls the
method, scales the result (``scale`` times the LiNeS coefficient of the tensor's block), adds the base and
writes the chunk at its final offset. Memory is therefore ``O(T * chunk_elements)`` whatever the model size.

Extra passes, only when needed:
- ``topk: global`` thresholds (TIES as in the paper): two streaming passes over all task vectors
  (:mod:`.topk`), never a flattened copy; ``topk: tensor`` on a tensor larger than one chunk: two passes
  over that tensor.
- LiNeS with ``alpha: auto`` (multi-task): one pass that computes ``||sum_t tau_t||_1`` and
  ``||tau_merged||_1``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_directory, write_json
from ..._validation import check_float, check_int
from ..checkpoints import (
    SAFETENSORS_INDEX,
    WEIGHT_SUFFIXES,
    Checkpoint,
    ShardedSafetensorsWriter,
    check_compatible,
    open_checkpoint,
    parse_size,
)
from ..lines import discover_blocks, format_lines_table, lines_scales, lines_table
from ..task_vector import compute_dtype
from .registry import MERGE_METHODS, MergeMethod
from .topk import TwoPassThreshold, kth_largest_abs, topk_count

__all__ = [
    "LinesSpec",
    "MergePlan",
    "MergeResult",
    "plan_merge",
    "execute_plan",
    "merge_models",
    "uniform_draws",
    "DTYPE_CHOICES",
]

DTYPE_CHOICES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_IN_MEMORY_CHUNKS = 4  # per-tensor top-k thresholds in memory for tensors up to this many chunks
_RNG_BLOCK = 1 << 20  # DARE draws are generated in blocks of this many elements (independent of chunking)


@dataclass(frozen=True)
class LinesSpec:
    """LiNeS settings: ``alpha`` (None = multi-task automatic value), ``beta`` (None = ``1 - alpha``)."""

    alpha: float | None = None
    beta: float | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.alpha is None and self.beta is None:
            raise ValueError("lines: give alpha (single task, beta = 1 - alpha) or beta (alpha automatic)")
        if self.alpha is not None:
            check_float("lines.alpha", self.alpha)
        if self.beta is not None:
            check_float("lines.beta", self.beta)


@dataclass
class MergePlan:
    """Everything decided before any tensor is read (printed by ``layerwise merge --dry-run``)."""

    method: MergeMethod
    base: Checkpoint
    models: list[Checkpoint]
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    scale: float
    lines: LinesSpec | None
    dtype: torch.dtype | None
    seed: int
    max_shard_bytes: int
    chunk_elements: int
    base_given: bool
    float_keys: list[str] = field(default_factory=list)
    lines_alpha: float | None = None
    lines_beta: float | None = None
    lines_layout: Any = None

    def out_dtype(self, key: str) -> torch.dtype:
        dt = self.base.dtype(key)
        return self.dtype if (self.dtype is not None and dt.is_floating_point) else dt

    def describe(self) -> str:
        """Human-readable plan."""
        keys = self.base.keys()
        total = sum(
            self.base.numel(k) * torch.empty((), dtype=self.out_dtype(k)).element_size() for k in keys
        )
        lines = [f"method: {self.method.name} — {self.method.description}"]
        if self.method.reference:
            lines.append(f"reference: {self.method.reference}")
        lines.append(
            f"base model: {self.base.source}" + ("" if self.base_given else " (first model, no base given)")
        )
        for i, (m, mp) in enumerate(zip(self.models, self.model_params, strict=False)):
            lines.append(f"model {i}: {m.source}  {mp}")
        lines.append(f"parameters: {self.params}  scale: {self.scale}  seed: {self.seed}")
        lines.append(
            f"tensors: {len(keys)} ({len(self.float_keys)} merged, {len(keys) - len(self.float_keys)} "
            f"copied from the base), output {total / 1e6:.1f} MB, dtype "
            f"{'as base' if self.dtype is None else str(self.dtype).replace('torch.', '')}, "
            f"shards of at most {self.max_shard_bytes / 1e6:.0f} MB"
        )
        if self.lines is not None:
            alpha = "auto (computed in a pre-pass)" if self.lines_alpha is None else f"{self.lines_alpha:.6g}"
            lines.append(
                f"LiNeS: alpha {alpha}, beta {self.lines_beta:.6g}, "
                f"{len(self.lines_layout.towers)} tower(s): {dict(self.lines_layout.towers)}"
            )
            shown_alpha = 0.0 if self.lines_alpha is None else self.lines_alpha
            table = lines_table(self.lines_layout, shown_alpha, self.lines_beta)
            text = format_lines_table(table)
            if self.lines_alpha is None:
                text += "\n(scales shown for alpha = 0; the automatic alpha is added to every row)"
            lines.append(text)
        return "\n".join(lines)


@dataclass
class MergeResult:
    """What :func:`execute_plan` returns: the output folder or the tensors, and the LiNeS table."""

    out: Path | None
    tensors: dict[str, torch.Tensor] | None
    lines_alpha: float | None
    lines_beta: float | None
    lines_table: list[dict] | None
    info: dict[str, Any]


def plan_merge(
    method: str,
    models: Sequence[Any],
    base: Any = None,
    *,
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    scale: float = 1.0,
    lines: LinesSpec | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    max_shard_bytes: int | str = "5GB",
    chunk_elements: int = 1 << 20,
    check_dtypes: bool = True,
) -> MergePlan:
    """Open the checkpoints, check they match, validate parameters; read no tensor data.

    Parameters
    ----------
    method : name in ``MERGE_METHODS``.
    models : the fine-tuned checkpoints (paths, state dicts or Checkpoints), ``T >= 1``.
    base : the pre-trained checkpoint; optional only for methods with ``needs_base=False``.
    params : global method parameters; ``model_params``: one mapping per model (per-model parameters).
    scale : multiplies the merged task vector (the task-arithmetic coefficient).
    lines : LiNeS settings or None.
    dtype : output dtype of floating tensors (``"float32"``, ``"bfloat16"``…); None keeps the base's.
    seed : seeds the random methods (DARE).
    max_shard_bytes : shard size of the output (int or ``"2GB"``).
    chunk_elements : largest number of elements per tensor held at once per model.
    """
    spec = MERGE_METHODS.get(method)
    if len(models) == 0:
        raise ValueError("models must list at least one checkpoint")
    model_params = list(model_params) if model_params is not None else [{} for _ in models]
    if len(model_params) != len(models):
        raise ValueError(
            f"model_params must have one entry per model ({len(models)}), got {len(model_params)}"
        )
    opened = [open_checkpoint(m, name=f"models[{i}]") for i, m in enumerate(models)]
    if base is None and spec.needs_base:
        raise ValueError(f"merge method {method!r} needs a base model (base_model)")
    base_ck = open_checkpoint(base, name="base_model") if base is not None else opened[0]
    check_compatible([base_ck, *opened], check_dtypes=check_dtypes)
    glob, per_model = spec.resolve(params, model_params)
    if isinstance(dtype, str):
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_CHOICES)} or omitted, got {dtype!r}")
        dtype = DTYPE_CHOICES[dtype]
    elif dtype is not None and dtype not in DTYPE_CHOICES.values():
        raise ValueError(f"dtype must be one of {sorted(DTYPE_CHOICES)} or omitted, got {dtype!r}")
    plan = MergePlan(
        method=spec,
        base=base_ck,
        models=opened,
        params=glob,
        model_params=per_model,
        scale=check_float("scale", scale),
        lines=lines,
        dtype=dtype,
        seed=check_int("seed", seed, low=0),
        max_shard_bytes=parse_size(max_shard_bytes, "max_shard_bytes"),
        chunk_elements=check_int("chunk_elements", chunk_elements, low=1),
        base_given=base is not None,
    )
    plan.float_keys = [k for k in base_ck.keys() if base_ck.dtype(k).is_floating_point]
    if lines is not None:
        plan.lines_layout = discover_blocks(plan.float_keys, lines.pattern)
        plan.lines_alpha = lines.alpha
        plan.lines_beta = lines.beta if lines.beta is not None else 1.0 - lines.alpha
    return plan


# -- streaming primitives ----------------------------------------------------------------------------------
def _chunks(plan: MergePlan, key: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, base (n_c,), deltas (T, n_c))`` over the flattened tensor ``key``, in compute dtype.

    The yielded tensors are buffers reused by the next chunk: consume them before advancing.
    """
    n = plan.base.numel(key)
    cd = compute_dtype(plan.base.dtype(key))
    size = min(max(n, 1), plan.chunk_elements)
    base_buf = torch.empty(size, dtype=cd)
    delta_buf = torch.empty(len(plan.models), size, dtype=cd)  # (T, n_c)
    for start in range(0, max(n, 1), plan.chunk_elements):
        stop = min(n, start + plan.chunk_elements)
        base, deltas = base_buf[: stop - start], delta_buf[:, : stop - start]
        plan.base.read_into(key, base, start)
        for t, m in enumerate(plan.models):
            m.read_into(key, deltas[t], start)
        deltas -= base
        yield start, base, deltas


def uniform_draws(seed: int, key: str, model: int, start: int, stop: int, numel: int) -> torch.Tensor:
    """Uniform [0, 1) draws for elements ``[start, stop)`` of tensor ``key`` of model ``model`` (float32).

    Drawn in blocks of 2**20 elements, each from a generator seeded by a hash of (seed, key, model, block),
    so the value at a position does not depend on the chunking.
    """
    out = []
    for b in range(start // _RNG_BLOCK, (max(stop, 1) - 1) // _RNG_BLOCK + 1):
        digest = hashlib.sha256(f"{seed}\0{key}\0{model}\0{b}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        lo = b * _RNG_BLOCK
        block = torch.rand(min(_RNG_BLOCK, numel - lo), generator=gen)
        out.append(block[max(start - lo, 0) : stop - lo])
    return torch.cat(out) if out else torch.empty(0)


def _tensor_thresholds(plan: MergePlan, key: str) -> torch.Tensor:
    """Per-tensor top-k thresholds (T,) of tensor ``key``.

    Up to ``_IN_MEMORY_CHUNKS`` chunks, one model at a time in memory (a selection on its whole task vector,
    about 3 tensors of memory); beyond, two streaming histogram passes over the tensor.
    """
    n = plan.base.numel(key)
    ks = [topk_count(mp["density"], n) for mp in plan.model_params]
    if n <= _IN_MEMORY_CHUNKS * plan.chunk_elements:
        cd = compute_dtype(plan.base.dtype(key))
        base = torch.empty(n, dtype=cd)
        plan.base.read_into(key, base)
        row = torch.empty(n, dtype=cd)
        out = torch.empty(len(plan.models), dtype=torch.float32)
        for t, m in enumerate(plan.models):
            m.read_into(key, row)
            row -= base
            out[t] = kth_largest_abs(row[None, :], [ks[t]])[0]
        return out
    sel = TwoPassThreshold(ks)
    for _ in range(2):
        for _, _, deltas in _chunks(plan, key):
            sel.update(deltas)
        if sel.pass_ == 1:
            sel.next_pass()
    return sel.result()


def _global_thresholds(plan: MergePlan, progress: bool) -> torch.Tensor:
    """Top-k thresholds (T,) over each whole flattened task vector: two streaming passes over the models."""
    from tqdm.auto import tqdm

    total = sum(plan.base.numel(k) for k in plan.float_keys)
    sel = TwoPassThreshold([topk_count(mp["density"], total) for mp in plan.model_params])
    for p in (1, 2):
        for key in tqdm(
            plan.float_keys, desc=f"global top-k, pass {p}/2", unit="tensor", disable=not progress
        ):
            for _, _, deltas in _chunks(plan, key):
                sel.update(deltas)
        if p == 1:
            sel.next_pass()
    return sel.result()


def _method_kwargs(plan: MergePlan, dtype: torch.dtype) -> dict[str, Any]:
    kwargs = dict(plan.params)
    for p in plan.method.params:
        if p.per_model:
            kwargs[p.name] = torch.tensor([mp[p.name] for mp in plan.model_params], dtype=dtype)  # (T,)
    return kwargs


def _merged_chunks(
    plan: MergePlan, key: str, global_thr: torch.Tensor | None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, base (n_c,), deltas (T, n_c), merged (n_c,))`` for tensor ``key`` (before scaling)."""
    n = plan.base.numel(key)
    kwargs = _method_kwargs(plan, compute_dtype(plan.base.dtype(key)))
    thr = None
    if "thresholds" in plan.method.inputs:
        if plan.params.get("topk") == "global":
            thr = global_thr
        elif n > plan.chunk_elements:
            thr = _tensor_thresholds(plan, key)
    for start, base, deltas in _chunks(plan, key):
        if "thresholds" in plan.method.inputs:
            if thr is None:  # the whole tensor is this chunk
                chunk_thr = kth_largest_abs(
                    deltas, [topk_count(mp["density"], n) for mp in plan.model_params]
                )
            else:
                chunk_thr = thr
            kwargs["thresholds"] = chunk_thr
        if "uniform" in plan.method.inputs:
            stop = start + deltas.shape[1]
            kwargs["uniform"] = torch.stack(
                [uniform_draws(plan.seed, key, t, start, stop, n) for t in range(len(plan.models))]
            )  # (T, n_c)
        yield start, base, deltas, plan.method.fn(deltas, **kwargs)


def _auto_alpha(plan: MergePlan, global_thr: torch.Tensor | None, progress: bool, stash) -> float:
    """LiNeS multi-task alpha: ``(||sum_t tau_t||_1 / ||tau_merged||_1) / T`` in one streaming pass.

    Each merged chunk is handed to ``stash(key, chunk, start)`` so that the final pass needs only the base
    and the stash instead of merging again.
    """
    from tqdm.auto import tqdm

    sum_l1 = merged_l1 = 0.0
    for key in tqdm(plan.float_keys, desc="LiNeS alpha pass", unit="tensor", disable=not progress):
        for start, _, deltas, merged in _merged_chunks(plan, key, global_thr):
            sum_l1 += float(deltas.sum(dim=0).abs().double().sum())
            merged_l1 += float(merged.abs().double().sum())
            stash(key, merged, start)
    if merged_l1 == 0:
        raise ValueError(
            "LiNeS: the merged task vector is zero, alpha = ||sum tau||_1 / ||tau_merged||_1 undefined"
        )
    return sum_l1 / merged_l1 / len(plan.models)


def _stashed_chunks(
    plan: MergePlan, stash: Checkpoint, key: str
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, base (n_c,), merged (n_c,))`` from the base and the stashed merged task vector."""
    n = plan.base.numel(key)
    cd = compute_dtype(plan.base.dtype(key))
    for start in range(0, max(n, 1), plan.chunk_elements):
        stop = min(n, start + plan.chunk_elements)
        base = torch.empty(stop - start, dtype=cd)
        plan.base.read_into(key, base, start)
        merged = torch.empty(stop - start, dtype=cd)
        stash.read_into(key, merged, start)
        yield start, base, merged


def execute_plan(
    plan: MergePlan,
    out: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    copy_files: bool = True,
    record: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Run a plan: write sharded safetensors into ``out`` atomically, or return the tensors (``out=None``).

    With ``out``, non-weight files of a base model folder (config, tokenizer…) are copied along when
    ``copy_files``, and ``layerwise_merge.json`` records the plan, the parameters and the LiNeS table.
    With LiNeS and an automatic alpha, the merged task vector of the alpha pass is stashed (in memory, or
    in float32 safetensors inside the temporary output folder, deleted before it is renamed into place).
    """
    if out is None:
        tensors = {k: torch.empty(plan.base.shape(k), dtype=plan.out_dtype(k)) for k in plan.base.keys()}

        def to_memory(key, chunk, start):
            tensors[key].view(-1)[start : start + chunk.numel()] = chunk

        result = _execute(plan, to_memory, None, progress)
        result.tensors = tensors
        return result
    out = Path(out)
    specs = [(k, plan.base.shape(k), plan.out_dtype(k)) for k in plan.base.keys()]
    with atomic_directory(out) as tmp:
        writer = ShardedSafetensorsWriter(
            tmp, specs, plan.max_shard_bytes, metadata={"format": "pt", "merged_by": "layerwise"}
        )
        result = _execute(plan, writer.write, tmp / ".lines_stash", progress)
        writer.close()
        if copy_files:
            _copy_side_files(Path(plan.base.source), tmp)
        result.info.update(record or {})
        write_json(tmp / "layerwise_merge.json", result.info)
    result.out = out
    return result


def _execute(plan: MergePlan, sink, stash_dir: Path | None, progress: bool) -> MergeResult:
    """Thresholds, LiNeS alpha (with a stash), then every tensor into ``sink(key, chunk, start)``."""
    from tqdm.auto import tqdm

    global_thr = None
    if "thresholds" in plan.method.inputs and plan.params.get("topk") == "global":
        global_thr = _global_thresholds(plan, progress)
    scales: dict[str, float] = {}
    table = None
    stash: Checkpoint | None = None
    if plan.lines is not None:
        if plan.lines_alpha is None:
            specs = [(k, plan.base.shape(k), compute_dtype(plan.base.dtype(k))) for k in plan.float_keys]
            if stash_dir is None:
                held = {k: torch.empty(s, dtype=d) for k, s, d in specs}
                plan.lines_alpha = _auto_alpha(
                    plan, global_thr, progress, lambda k, c, s: held[k].view(-1)[s : s + c.numel()].copy_(c)
                )
                stash = open_checkpoint(held)
            else:
                stash_dir.mkdir()
                stash_writer = ShardedSafetensorsWriter(stash_dir, specs, 10**15)
                plan.lines_alpha = _auto_alpha(plan, global_thr, progress, stash_writer.write)
                stash_writer.close()
                stash = open_checkpoint(stash_dir)
        scales = lines_scales(plan.lines_layout, plan.lines_alpha, plan.lines_beta)
        table = lines_table(plan.lines_layout, plan.lines_alpha, plan.lines_beta)
    try:
        for key in tqdm(
            plan.base.keys(), desc=f"merging ({plan.method.name})", unit="tensor", disable=not progress
        ):
            dt = plan.out_dtype(key)
            if not plan.base.dtype(key).is_floating_point:
                sink(key, plan.base.read(key).to(dt), 0)
                continue
            factor = plan.scale * scales.get(key, 1.0)
            if stash is None:
                chunks = ((s, b, m) for s, b, _, m in _merged_chunks(plan, key, global_thr))
            else:
                chunks = _stashed_chunks(plan, stash, key)
            for start, base, merged in chunks:
                merged.mul_(factor).add_(base)
                sink(key, merged.to(dt), start)
    finally:
        if stash is not None:
            stash.close()
        if stash_dir is not None and stash_dir.exists():
            shutil.rmtree(stash_dir)
    info = {
        "method": plan.method.name,
        "params": plan.params,
        "model_params": plan.model_params,
        "models": [m.source for m in plan.models],
        "base_model": plan.base.source,
        "scale": plan.scale,
        "seed": plan.seed,
        "lines_alpha": plan.lines_alpha,
        "lines_beta": plan.lines_beta,
        "lines_table": table,
    }
    return MergeResult(None, None, plan.lines_alpha, plan.lines_beta, table, info)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copy config/tokenizer files (anything but weights and indexes, under 100 MB) of a model folder."""
    if not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        if (
            f.is_file()
            and f.suffix not in WEIGHT_SUFFIXES
            and not f.name.endswith(".index.json")
            and f.name != SAFETENSORS_INDEX
            and f.stat().st_size < 100 * 10**6
            and not (dst / f.name).exists()
        ):
            shutil.copy2(f, dst / f.name)


def merge_models(
    method: str,
    models: Sequence[Any],
    base: Any = None,
    *,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> MergeResult:
    """Plan and run a merge in one call (keyword arguments as in :func:`plan_merge`).

    Example
    -------
    >>> base = {"layers.0.w": torch.zeros(4), "layers.1.w": torch.zeros(4)}
    >>> ft = [{k: torch.full((4,), float(i + 1)) for k in base} for i in range(2)]
    >>> merge_models("task_arithmetic", ft, base).tensors["layers.1.w"]
    tensor([3., 3., 3., 3.])
    """
    plan = plan_merge(method, models, base, **kwargs)
    return execute_plan(plan, out, progress=progress)
