"""Merge planning: open the checkpoints, check they match, validate every parameter; read no tensor data.

:func:`plan_merge` returns a :class:`MergePlan`, everything decided before any tensor is read (what
``layerwise merge --dry-run`` prints); :mod:`.stream` runs it chunk by chunk and :mod:`.write` puts the
result on disk.

>>> import torch
>>> base = {"layers.0.w": torch.zeros(4)}
>>> plan = plan_merge("task_arithmetic", [{"layers.0.w": torch.ones(4)}], base, scale=0.5)
>>> plan.float_keys, plan.scale
(['layers.0.w'], 0.5)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..._validation import check_float, check_int, check_seed
from ...errors import ParameterError, ParameterTypeError
from ..checkpoints import Checkpoint, check_compatible, open_checkpoint, parse_size
from ..lines import discover_blocks, format_lines_table, lines_table
from ..lora import LoraCheckpoint, is_lora_adapter
from ..task_vector import compute_dtype
from ..vocab import align_vocabulary
from .data_dependent import refuse_data_method
from .gradients import key_values, split_schedules
from .registry import MERGE_METHODS, MergeMethod

__all__ = ["DTYPE_CHOICES", "LinesSpec", "MergePlan", "plan_merge"]

DTYPE_CHOICES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


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
    union_vocabulary: Any = None  # tokenizer_source "union": output tokenizer and row maps (..vocab_union)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where chunks are merged

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
        if self.union_vocabulary is not None:
            u = self.union_vocabulary
            lines.append(
                f"union vocabulary: {u.size} tokens (base {u.sizes[0]}, models {u.sizes[1:]}); rows found "
                f"by token in {self.aligned_vocabulary}"
            )
        elif self.aligned_vocabulary:
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


def merge_device(device: str | torch.device | None, *, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``: None = CPU, ``"auto"`` (case and spaces ignored) = CUDA when
    available, anything else checked by :func:`layerwise._device.resolve_device`; a device this machine
    lacks raises :class:`~layerwise.errors.ParameterError` naming ``name``."""
    from ..._device import resolve_device

    if isinstance(device, str) and device.strip().lower() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return resolve_device(device, name=name)
    except ParameterError as err:
        raise ParameterError(f"{err} (or 'auto': CUDA when available, else cpu)") from None


def _union(base: Any, models: Sequence[Any], lora: list[int], base_ck: Checkpoint, opened: list[Any]):
    """``tokenizer_source: union``: base and models on the union vocabulary (:mod:`..vocab_union`)."""
    from ..vocab_union import union_checkpoints

    def folder(x: Any, what: str) -> Path:
        if not isinstance(x, (str, os.PathLike)) or not Path(x).is_dir():
            raise ParameterError(
                f"tokenizer_source union needs model folders holding tokenizers; {what} is {x!r}"
            )
        return Path(x)

    folders = [folder(base, "base_model")]
    folders += [None if i in lora else folder(m, f"models[{i}]") for i, m in enumerate(models)]
    return union_checkpoints(base_ck, opened, folders)


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
    block_layout: Any = None,
    device: str | torch.device | None = None,
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
        truncated/padded to the base's rows with a warning (:mod:`..vocab`); ``"union"``: the output
        vocabulary is the union of the tokenizers, every model's embedding/output rows looked up by token
        string (:mod:`..vocab_union`; model folders with tokenizers, extra ``hf``); None: such models are
        refused.
    device : where the chunks are merged (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` = CUDA when
        available); None: CPU. Tensors are read and written on the CPU; results equal the CPU's up to
        floating-point rounding of the device's kernels.
    block_layout : the :class:`~layerwise.editing.lines.BlockLayout` that per-layer gradients follow; None
        discovers it from the keys (slices pass the layout of the slice, :mod:`.slices`).
    """
    if not isinstance(method, str):
        raise ParameterTypeError(f"method must be a name in {sorted(MERGE_METHODS.names())}, got {method!r}")
    refuse_data_method(method)
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
    union = None
    if tokenizer_source == "base":
        opened, aligned = align_vocabulary(opened, base_ck)
    elif tokenizer_source == "union":
        base_ck, opened, union, aligned = _union(
            base if base is not None else models[0], models, lora, base_ck, opened
        )
    elif tokenizer_source is not None:
        raise ParameterError(f"tokenizer_source must be 'base', 'union' or None, got {tokenizer_source!r}")
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
        union_vocabulary=union,
        device=merge_device(device),
    )
    plan.float_keys = [k for k in base_ck.keys() if base_ck.dtype(k).is_floating_point]
    if block_layout is not None:
        plan.schedule_layout = block_layout
    elif any(s.needs_blocks for s in schedules.values()):
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
