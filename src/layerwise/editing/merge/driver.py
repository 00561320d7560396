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
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..._io import OUTPUT_MARKER, atomic_directory, check_output_dir, is_temporary_name, write_json
from ..._validation import check_float, check_int, check_seed
from ...errors import CheckpointError, ParameterError, ParameterTypeError
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
from ..lora import LoraCheckpoint, is_lora_adapter
from ..task_vector import compute_dtype
from ..vocab import align_vocabulary
from .gradients import key_values, split_schedules
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
            raise ParameterError(
                "lines: give alpha (single task, beta = 1 - alpha) or beta (alpha automatic)"
            )
        if self.alpha is not None:
            check_float("lines.alpha", self.alpha)
        if self.beta is not None:
            check_float("lines.beta", self.beta)
        if self.pattern is not None and not isinstance(self.pattern, str):
            raise ParameterTypeError(
                f"lines.pattern must be a regular expression string, got {self.pattern!r}"
            )


def _check_representable(plan: MergePlan) -> None:
    """Every number the method and the scaling multiply tensors by must fit the compute dtype (float32
    for all but float64 checkpoints), or the merge would write inf everywhere."""
    dtypes = {compute_dtype(plan.base.dtype(k)) for k in plan.float_keys}
    if not dtypes:
        return
    limit = min(torch.finfo(d).max for d in dtypes)
    cd = str(min(dtypes, key=lambda d: torch.finfo(d).max)).replace("torch.", "")
    values = [("scale", plan.scale)]
    values += [(f"parameters.{k}", v) for k, v in plan.params.items()]
    values += [
        (f"models[{i}].parameters.{k}", v) for i, mp in enumerate(plan.model_params) for k, v in mp.items()
    ]
    if plan.lines is not None:
        values += [("lines.alpha", plan.lines.alpha), ("lines.beta", plan.lines.beta)]
    values += [(s.name, v) for s in plan.schedules.values() for v in s.numbers()]
    for name, v in values:
        if isinstance(v, float) and abs(v) > limit:
            raise ParameterError(
                f"{name} = {v:g} is beyond the largest {cd} number ({limit:.3g}), the dtype the merge "
                "computes in; the merged model would be inf/NaN"
            )


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
    raw_model_params: list[Mapping[str, Any]] = field(default_factory=list)
    schedules: dict[tuple[int | None, str], Any] = field(default_factory=dict)
    schedule_layout: Any = None
    tokenizer_source: str | None = None
    aligned_vocabulary: list[str] = field(default_factory=list)
    lora_models: list[str] = field(default_factory=list)

    def key_params(self, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(params, model_params)`` for tensor ``key``: per-layer gradients and filters evaluated."""
        if not self.schedules:
            return self.params, self.model_params
        return key_values(
            self.method,
            self.params,
            self.model_params,
            self.raw_model_params,
            self.schedules,
            key,
            self.schedule_layout,
        )

    def schedule_data(self) -> dict[str, Any]:
        """The per-tensor parameters as given (``parameters.weight: [0, 0.5, 1]``…), for records."""
        return {s.name: s.to_data() for s in self.schedules.values()}

    def out_dtype(self, key: str) -> torch.dtype:
        """The dtype ``key`` is written in: ``dtype`` for floating tensors if given, else the base's."""
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
        for name, data in self.schedule_data().items():
            lines.append(f"per-tensor {name}: {data} (first value shown above)")
        if self.aligned_vocabulary:
            lines.append(f"vocabulary rows aligned to the base's: {self.aligned_vocabulary}")
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
    tokenizer_source: str | None = None,
) -> MergePlan:
    """Open the checkpoints, check they match, validate parameters; read no tensor data.

    A model may be a PEFT LoRA adapter folder (read lazily on top of the base, :mod:`..lora`). Numeric
    parameters may be lists (per-layer gradients) or ``{filter, value}`` lists (:mod:`.gradients`).

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
    tokenizer_source : ``"base"``: models whose embedding rows differ from the base's (added tokens) are
        truncated/padded to the base's rows with a warning (:mod:`..vocab`); None: such models are refused.
    """
    if not isinstance(method, str):
        raise ParameterTypeError(f"method must be a name in {sorted(MERGE_METHODS.names())}, got {method!r}")
    try:
        spec = MERGE_METHODS.get(method)
    except ValueError as err:
        raise ParameterError(str(err)) from None
    if isinstance(models, (str, os.PathLike, Mapping)) or not isinstance(models, Sequence):
        raise ParameterTypeError(f"models must be a list of checkpoints, got {type(models).__name__}")
    if len(models) == 0:
        raise ParameterError("models must list at least one checkpoint")
    model_params = list(model_params) if model_params is not None else [{} for _ in models]
    if len(model_params) != len(models):
        raise ParameterError(
            f"model_params must have one entry per model ({len(models)}), got {len(model_params)}"
        )
    lora = [i for i, m in enumerate(models) if is_lora_adapter(m)]
    opened: list[Any] = [
        None if i in lora else open_checkpoint(m, name=f"models[{i}]") for i, m in enumerate(models)
    ]
    if base is None and spec.needs_base:
        raise ParameterError(f"merge method {method!r} needs a base model (base_model)")
    if base is None and lora:
        raise ParameterError(f"models[{lora[0]}] is a LoRA adapter: it needs base_model (the model adapted)")
    base_ck = open_checkpoint(base, name="base_model") if base is not None else opened[0]
    for i in lora:
        opened[i] = LoraCheckpoint(base_ck, models[i])
    aligned: list[str] = []
    if tokenizer_source == "base":
        opened, aligned = align_vocabulary(opened, base_ck)
    elif tokenizer_source is not None:
        raise ParameterError(f"tokenizer_source must be 'base' or None, got {tokenizer_source!r}")
    check_compatible([base_ck, *opened], check_dtypes=check_dtypes)
    raw_model_params = [dict(mp) if isinstance(mp, Mapping) else mp for mp in model_params]
    params, model_params, schedules = split_schedules(spec, params, model_params)
    glob, per_model = spec.resolve(params, model_params)
    if isinstance(dtype, str):
        if dtype not in DTYPE_CHOICES:
            raise ParameterError(f"dtype must be one of {sorted(DTYPE_CHOICES)} or omitted, got {dtype!r}")
        dtype = DTYPE_CHOICES[dtype]
    elif dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in DTYPE_CHOICES.values()):
        raise ParameterError(f"dtype must be one of {sorted(DTYPE_CHOICES)} or omitted, got {dtype!r}")
    if lines is not None and not isinstance(lines, LinesSpec):
        raise ParameterTypeError(f"lines must be a LinesSpec or None, got {type(lines).__name__}")
    if not isinstance(check_dtypes, bool):
        raise ParameterTypeError(f"check_dtypes must be True or False, got {check_dtypes!r}")
    plan = MergePlan(
        method=spec,
        base=base_ck,
        models=opened,
        params=glob,
        model_params=per_model,
        scale=check_float("scale", scale),
        lines=lines,
        dtype=dtype,
        seed=check_seed(seed),
        max_shard_bytes=parse_size(max_shard_bytes, "max_shard_bytes"),
        chunk_elements=check_int("chunk_elements", chunk_elements, low=1, high=2**62),
        base_given=base is not None,
        raw_model_params=raw_model_params,
        schedules=schedules,
        tokenizer_source=tokenizer_source,
        aligned_vocabulary=aligned,
        lora_models=[opened[i].source for i in lora],
    )
    plan.float_keys = [k for k in base_ck.keys() if base_ck.dtype(k).is_floating_point]
    if any(s.needs_blocks for s in schedules.values()):
        try:
            plan.schedule_layout = discover_blocks(plan.float_keys, lines.pattern if lines else None)
        except ParameterError as err:
            raise ParameterError(f"per-layer parameter lists need residual blocks: {err}") from None
    if glob.get("topk") == "global" and any(name == "density" for _, name in schedules):
        raise ParameterError("density lists (per-layer gradients) need topk: tensor, not topk: global")
    if lines is not None:
        plan.lines_layout = discover_blocks(plan.float_keys, lines.pattern)
        plan.lines_alpha = lines.alpha
        plan.lines_beta = lines.beta if lines.beta is not None else 1.0 - lines.alpha
    _check_representable(plan)
    return plan


# -- streaming primitives ----------------------------------------------------------------------------------
def _chunks(plan: MergePlan, key: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, base (n_c,), deltas (T, n_c))`` over the flattened tensor ``key``, in compute dtype.

    The yielded tensors are buffers reused by the next chunk: consume them before advancing.
    """
    n = plan.base.numel(key)
    cd = compute_dtype(plan.base.dtype(key))
    step = _step(plan, key)
    size = min(max(n, 1), step)
    base_buf = torch.empty(size, dtype=cd)
    delta_buf = torch.empty(len(plan.models), size, dtype=cd)  # (T, n_c)
    for start in range(0, max(n, 1), step):
        stop = min(n, start + step)
        base, deltas = base_buf[: stop - start], delta_buf[:, : stop - start]
        plan.base.read_into(key, base, start)
        for t, m in enumerate(plan.models):
            m.read_into(key, deltas[t], start)
        deltas -= base
        yield start, base, deltas


def _row_length(plan: MergePlan, key: str) -> int:
    """Length of a row (the last dimension; a tensor of fewer than 2 dimensions is one row)."""
    shape = plan.base.shape(key)
    return max(1, shape[-1] if len(shape) >= 2 else plan.base.numel(key))


def _step(plan: MergePlan, key: str) -> int:
    """Chunk size of tensor ``key``: ``chunk_elements``, rounded down to whole rows for row methods."""
    if not plan.method.rows:
        return plan.chunk_elements
    row = _row_length(plan, key)
    return max(row, plan.chunk_elements // row * row)


def _ranks(plan: MergePlan, per_model: Sequence[Mapping[str, Any]], n: int) -> list[list[int]]:
    """The magnitude ranks ``k`` whose thresholds each model's task vector needs (T lists of K)."""
    if plan.method.ranks is None:
        return [[topk_count(mp["density"], n)] for mp in per_model]
    return [[int(k) for k in plan.method.ranks(mp, n)] for mp in per_model]


def _shape_thresholds(plan: MergePlan, flat: torch.Tensor, t: int) -> torch.Tensor:
    """Thresholds (T * K,) as the method expects them: (T,) by default, (T, K) with ``ranks``."""
    return flat if plan.method.ranks is None else flat.reshape(t, -1)


def _chunk_thresholds(plan: MergePlan, deltas: torch.Tensor, ks: list[list[int]]) -> torch.Tensor:
    """Thresholds of ``deltas`` (T, n) when it is the whole tensor (a selection per rank)."""
    rows = deltas.repeat_interleave(len(ks[0]), dim=0) if len(ks[0]) > 1 else deltas
    return _shape_thresholds(plan, kth_largest_abs(rows, [k for kk in ks for k in kk]), deltas.shape[0])


def _gram(base: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Gram matrix (T + 1, T + 1) float64 of the rows ``[base, deltas...]`` of one chunk."""
    rows = torch.cat([base[None, :], deltas]).double()
    return rows @ rows.T


def _tensor_gram(plan: MergePlan, key: str) -> torch.Tensor:
    """Gram matrix of ``[base, deltas...]`` over the whole tensor ``key``: one streaming pass."""
    total = torch.zeros(len(plan.models) + 1, len(plan.models) + 1, dtype=torch.float64)
    for _, base, deltas in _chunks(plan, key):
        total += _gram(base, deltas)
    return total


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


def _tensor_thresholds(plan: MergePlan, key: str, per_model: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Per-tensor top-k thresholds (T,) (or (T, K) for methods with ``ranks``) of tensor ``key``.

    Up to ``_IN_MEMORY_CHUNKS`` chunks, one model at a time in memory (a selection on its whole task vector,
    about 3 tensors of memory); beyond, two streaming histogram passes over the tensor.
    """
    n = plan.base.numel(key)
    ks = _ranks(plan, per_model, n)
    k_per = len(ks[0])
    if n <= _IN_MEMORY_CHUNKS * plan.chunk_elements:
        cd = compute_dtype(plan.base.dtype(key))
        base = torch.empty(n, dtype=cd)
        plan.base.read_into(key, base)
        row = torch.empty(n, dtype=cd)
        out = torch.empty(len(plan.models) * k_per, dtype=torch.float32)
        for t, m in enumerate(plan.models):
            m.read_into(key, row)
            row -= base
            out[t * k_per : (t + 1) * k_per] = kth_largest_abs(row[None, :].expand(k_per, -1), ks[t])
        return _shape_thresholds(plan, out, len(plan.models))
    sel = TwoPassThreshold([k for kk in ks for k in kk])
    for _ in range(2):
        for _, _, deltas in _chunks(plan, key):
            sel.update(deltas.repeat_interleave(k_per, dim=0) if k_per > 1 else deltas)
        if sel.pass_ == 1:
            sel.next_pass()
    return _shape_thresholds(plan, sel.result(), len(plan.models))


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


def _method_kwargs(
    plan: MergePlan, glob: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]], dtype: torch.dtype
) -> dict[str, Any]:
    kwargs = dict(glob)
    for p in plan.method.params:
        if p.per_model:
            kwargs[p.name] = torch.tensor([mp[p.name] for mp in per_model], dtype=dtype)  # (T,)
    return kwargs


def _merged_chunks(
    plan: MergePlan, key: str, global_thr: torch.Tensor | None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, base (n_c,), deltas (T, n_c), merged (n_c,))`` for tensor ``key`` (before scaling)."""
    n = plan.base.numel(key)
    glob, per_model = plan.key_params(key)
    kwargs = _method_kwargs(plan, glob, per_model, compute_dtype(plan.base.dtype(key)))
    inputs = plan.method.inputs
    whole = n <= _step(plan, key)  # the whole tensor is one chunk
    thr = gram = None
    if "thresholds" in inputs:
        if glob.get("topk") == "global":
            thr = global_thr
        elif not whole:
            thr = _tensor_thresholds(plan, key, per_model)
    if "gram" in inputs and not whole:
        gram = _tensor_gram(plan, key)
    if plan.method.rows:
        kwargs["row_length"] = _row_length(plan, key)
    for start, base, deltas in _chunks(plan, key):
        if "thresholds" in inputs:
            kwargs["thresholds"] = (
                thr if thr is not None else _chunk_thresholds(plan, deltas, _ranks(plan, per_model, n))
            )
        if "gram" in inputs:
            kwargs["gram"] = gram if gram is not None else _gram(base, deltas)
        if "base" in inputs:
            kwargs["base"] = base
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
        raise ParameterError(
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
    overwrite: bool = False,
    model_card: bool = True,
) -> MergeResult:
    """Run a plan: write sharded safetensors into ``out`` atomically, or return the tensors (``out=None``).

    With ``out``, non-weight files of a base model folder (config, tokenizer…) are copied along when
    ``copy_files`` (a copied ``config.json`` gets its ``torch_dtype``/``dtype`` set to the dtype written),
    and ``layerwise_merge.json`` records the plan, the parameters and the LiNeS table. With ``model_card``
    the folder gets a ``README.md`` model card and, when ``record`` holds the ``config`` mapping (and the
    original file's text as ``config_text``), ``layerwise_merge.yaml`` re-running the merge
    (:mod:`..model_card`).
    With LiNeS and an automatic alpha, the merged task vector of the alpha pass is stashed (in memory, or
    in float32 safetensors inside the temporary output folder, deleted before it is renamed into place).

    ``out`` is checked first with :func:`layerwise._io.check_output_dir`: an existing non-empty folder is
    replaced only with ``overwrite`` and only if an earlier layerwise run created it; an input's folder
    (or one containing an input) is always refused. Every merged chunk is checked for inf/NaN before it is
    written: the first non-finite tensor raises :class:`~layerwise.errors.ParameterError`
    (:class:`~layerwise.errors.CheckpointError` if the base's tensor already holds inf/NaN) and nothing
    appears at ``out``.
    """
    if out is None:
        tensors = {k: torch.empty(plan.base.shape(k), dtype=plan.out_dtype(k)) for k in plan.base.keys()}

        def to_memory(key, chunk, start):
            tensors[key].view(-1)[start : start + chunk.numel()] = chunk

        result = _execute(plan, to_memory, None, progress)
        result.tensors = tensors
        return result
    inputs = [c.source for c in (plan.base, *plan.models) if not c.source.startswith("<")]
    out = check_output_dir(out, overwrite=overwrite, inputs=inputs)
    specs = [(k, plan.base.shape(k), plan.out_dtype(k)) for k in plan.base.keys()]
    with atomic_directory(out) as tmp:
        writer = ShardedSafetensorsWriter(
            tmp, specs, plan.max_shard_bytes, metadata={"format": "pt", "merged_by": "layerwise"}
        )
        result = _execute(plan, writer.write, tmp / ".lines_stash", progress)
        writer.close()
        if copy_files:
            _copy_side_files(Path(plan.base.source), tmp)
            if plan.dtype is not None:
                _set_config_dtype(tmp / "config.json", plan.dtype)
        result.info.update(record or {})
        if model_card:
            from ..model_card import finish_output

            finish_output(
                tmp,
                result.info,
                plan.method,
                config=(record or {}).get("config"),
                source_text=(record or {}).get("config_text"),
            )
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
                if factor != 1.0:
                    merged.mul_(factor)
                merged.add_(base)
                chunk = merged.to(dt)
                _check_finite(key, chunk, start, base, dt)
                sink(key, chunk, start)
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
    if plan.schedules:
        info["schedules"] = plan.schedule_data()
    if plan.tokenizer_source is not None:
        info["tokenizer_source"] = plan.tokenizer_source
        info["aligned_vocabulary"] = plan.aligned_vocabulary
    if plan.lora_models:
        info["lora_models"] = plan.lora_models
    return MergeResult(None, None, plan.lines_alpha, plan.lines_beta, table, info)


def _check_finite(key: str, chunk: torch.Tensor, start: int, base: torch.Tensor, dt: torch.dtype) -> None:
    """Refuse a merged chunk holding inf or NaN, naming the tensor and the likely cause."""
    # fast path, one vectorised reduction (isfinite is ~400x slower on CPU): a sum is finite only if every
    # term is; a non-finite sum (inf/NaN present, or an overflow of the sum alone) gets the exact check below
    try:
        if chunk.element_size() > 1 and math.isfinite(float(chunk.sum())):
            return
    except (RuntimeError, TypeError):  # a dtype without sum: the exact check
        pass
    # isfinite is not implemented for every float8 type: check those in float32 (exact for them)
    bad = ~torch.isfinite(chunk if chunk.element_size() > 1 else chunk.float())
    if not bool(bad.any()):
        return
    pos = start + int(bad.nonzero()[0, 0])
    if not bool(torch.isfinite(base).all()):
        raise CheckpointError(
            f"merged tensor {key!r} holds inf/NaN (first at flat index {pos}) because the base model's "
            "tensor already does; refusing to write a broken model"
        )
    raise ParameterError(
        f"merged tensor {key!r} would hold inf/NaN in {str(dt).replace('torch.', '')} (first at flat index "
        f"{pos}): the parameters (weights, scale, lines) overflow it or an input model holds inf/NaN; "
        "nothing was written"
    )


def _set_config_dtype(config: Path, dtype: torch.dtype) -> None:
    """Set ``torch_dtype``/``dtype`` (at any depth: text/vision sub-configs) of a copied ``config.json``."""
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return  # not ours to fix; copied as it was
    name = str(dtype).replace("torch.", "")
    known = set(DTYPE_CHOICES) | {"float", "half", "bfloat16"}

    def fix(node: Any) -> bool:
        changed = False
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("torch_dtype", "dtype") and isinstance(v, str) and v.replace("torch.", "") in known:
                    if v != name:
                        node[k] = name
                        changed = True
                else:
                    changed = fix(v) or changed
        elif isinstance(node, list):
            for v in node:
                changed = fix(v) or changed
        return changed

    if fix(data):
        config.unlink()  # a copy inside the temporary folder: replace it with the corrected one
        write_json(config, data)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copy config/tokenizer files (anything but weights and indexes, under 100 MB) of a model folder."""
    if not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        if (
            f.is_file()
            and f.name not in (OUTPUT_MARKER, "layerwise_merge.json")
            and not is_temporary_name(f.name)
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
    overwrite: bool = False,
    **kwargs: Any,
) -> MergeResult:
    """Plan and run a merge in one call (keyword arguments as in :func:`plan_merge`; ``out`` and
    ``overwrite`` as in :func:`execute_plan`).

    Example
    -------
    >>> base = {"layers.0.w": torch.zeros(4), "layers.1.w": torch.zeros(4)}
    >>> ft = [{k: torch.full((4,), float(i + 1)) for k in base} for i in range(2)]
    >>> merge_models("task_arithmetic", ft, base).tensors["layers.1.w"]
    tensor([3., 3., 3., 3.])
    """
    plan = plan_merge(method, models, base, **kwargs)
    return execute_plan(plan, out, progress=progress, overwrite=overwrite)
