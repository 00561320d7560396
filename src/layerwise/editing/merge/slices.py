"""Slices: output models assembled from layer ranges of several models (mergekit's ``slices``), e.g. the
layer-stacking "frankenmerges" of ``passthrough`` or a SLERP of two models layer by layer.

An output slice lists sources, each a model and a ``layer_range`` ``[start, end)`` of its layers (every
source of a slice spans the same number of layers). The slices are laid end to end: output layer ``j``
of slice ``s`` (``j = offset_s + i``) is merged from layer ``start_k + i`` of every source ``k`` of that
slice, with the slice's method parameters, and renumbered ``j`` in the output (layers may repeat, come from
several models, and the output may have more or fewer layers than any input). Tensors outside the layer
stack are merged from the first slice's sources (embeddings: names with ``embed``, ``wte`` or ``wpe``) or
the last slice's (the final norm, the output head), as mergekit does. Per-layer gradients run over each
slice (``t = i / (L_s - 1)``); tensors outside the layers take the first value.

Within a slice, the source whose model is the base (the slice's ``base_model``, else the merge's) is the
base; the other sources are the merged models; a method that needs a base needs it among every slice's
sources. Ranges are checked against each model's number of layers before anything is read, and a copied
``config.json`` gets the output's number of layers.

:func:`plan_slices` returns a :class:`SlicedPlan` (one :class:`~.plan.MergePlan` per group of tensors);
:func:`~.write.execute_plan` runs it like any plan.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_directory, check_output_dir, write_json
from ...errors import CheckpointError, ParameterError, ParameterTypeError
from ..checkpoints import Checkpoint, open_checkpoint
from ..lines import _DEFAULT, _INT_SEGMENT, BlockLayout
from ..lora import is_lora_adapter
from .plan import MergePlan, plan_merge
from .registry import MERGE_METHODS
from .stream import MergeResult, run_passes

__all__ = [
    "LayerStack",
    "OutputSlice",
    "SliceSource",
    "SlicedPlan",
    "execute_sliced",
    "layer_stack",
    "plan_slices",
]

_PRE = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:\.|$)")


@dataclass(frozen=True)
class SliceSource:
    """One source of an output slice: a model (path, state dict or checkpoint), its layers ``[start, end)``
    and its per-model method parameters."""

    model: Any
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """An output slice: its sources, slice-level method parameters and optional base model."""

    sources: tuple[SliceSource, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    base_model: Any = None


@dataclass(frozen=True)
class LayerStack:
    """The layer stack of a checkpoint: ``layers[i]`` lists the keys of layer ``i``; ``other`` the rest."""

    layers: tuple[tuple[str, ...], ...]
    other: tuple[str, ...]

    def rename(self, key: str, index: int) -> str:
        """``key`` (a key of some layer) with its layer index replaced by ``index``."""
        m = _DEFAULT.search(key)
        return key[: m.start(1)] + str(index) + key[m.end(1) :]


def layer_stack(ck: Checkpoint, where: str = "model") -> LayerStack:
    """Find the single stack of numbered layers (``layers.N``, ``h.N``, ``blocks.N``...) of ``ck``.

    Raises :class:`~layerwise.errors.CheckpointError` when there is none, several (a vision tower and a
    text tower), or its layers are not numbered 0..L-1.
    """
    towers: dict[str, dict[int, list[str]]] = {}
    other = []
    for key in ck.keys():
        m = _DEFAULT.search(key)
        if m is None:
            other.append(key)
            continue
        tower = _INT_SEGMENT.sub("*", key[: m.start(1)])
        towers.setdefault(tower, {}).setdefault(int(m.group(1)), []).append(key)
    if len(towers) != 1:
        found = sorted(towers) or "none"
        raise CheckpointError(
            f"{where} ({ck.source}): slices need one stack of numbered layers, found {found}"
        )
    (layers,) = towers.values()
    if sorted(layers) != list(range(len(layers))):
        raise CheckpointError(
            f"{where} ({ck.source}): layers are not numbered 0..{len(layers) - 1}: {sorted(layers)[:8]}"
        )
    return LayerStack(tuple(tuple(layers[i]) for i in range(len(layers))), tuple(other))


class RenamedCheckpoint(Checkpoint):
    """``ck`` seen through ``mapping`` (output key -> key of ``ck``); only the mapped keys exist."""

    def __init__(self, ck: Checkpoint, mapping: Mapping[str, str]) -> None:
        self.ck, self.mapping = ck, dict(mapping)
        self.source = ck.source

    def keys(self) -> list[str]:
        return list(self.mapping)

    def __contains__(self, key: object) -> bool:
        return key in self.mapping

    def shape(self, key: str) -> tuple[int, ...]:
        return self.ck.shape(self.mapping[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.ck.dtype(self.mapping[key])

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.ck.read(self.mapping[key], start, stop)

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        self.ck.read_into(self.mapping[key], out, start)

    def close(self) -> None:  # the underlying checkpoints are shared between groups: closed by the plan
        pass


@dataclass
class SlicedPlan:
    """A slices merge: one :class:`~.plan.MergePlan` per group of output tensors (``parts``: label and
    plan, in output order), the output's number of layers and the folder its side files come from."""

    method: Any
    parts: list[tuple[str, MergePlan]]
    num_layers: int
    source_layers: int
    side_source: str
    max_shard_bytes: int
    dtype: torch.dtype | None
    slices_data: list[dict[str, Any]]
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def out_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(key, shape, dtype)`` of every output tensor, in output order."""
        return [(k, p.base.shape(k), p.out_dtype(k)) for _, p in self.parts for k in p.base.keys()]

    def describe(self) -> str:
        """Human-readable plan: the slices, then each group's plan."""
        lines = [
            f"slices: {len(self.slices_data)} slice(s) -> {self.num_layers} output layers "
            f"(side files from {self.side_source})"
        ]
        for s, data in enumerate(self.slices_data):
            srcs = ", ".join(f"{d['model']} {list(d['layer_range'])}" for d in data["sources"])
            lines.append(f"  slice {s}: {srcs}")
        for label, plan in self.parts:
            lines.append(f"--- {label} ---")
            lines.append(plan.describe())
        return "\n".join(lines)

    def close(self) -> None:
        """Close the checkpoints the plan opened."""
        for ck in self.checkpoints:
            ck.close()


def _range(where: str, value: Any, num_layers: int, source: str) -> tuple[int, int]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise ParameterError(f"{where}.layer_range must be [start, end] (two integers), got {value!r}")
    start, end = value
    if not 0 <= start < end <= num_layers:
        raise ParameterError(
            f"{where}.layer_range {list(value)}: {source} has {num_layers} layers (0..{num_layers - 1}); "
            f"a range [start, end) needs 0 <= start < end <= {num_layers}"
        )
    return start, end


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        return os.path.abspath(os.fspath(a)) == os.path.abspath(os.fspath(b))
    return a is b


def plan_slices(
    method: str,
    slices: Sequence[OutputSlice],
    base: Any = None,
    *,
    params: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> SlicedPlan:
    """Plan a slices merge (see the module docstring); read no tensor data.

    Parameters
    ----------
    method : name in ``MERGE_METHODS``.
    slices : the output slices, in output order.
    base : the merge's base model (a slice's own ``base_model`` takes precedence).
    params : global method parameters (a slice's ``parameters`` override them in that slice).
    kwargs : ``scale``, ``dtype``, ``seed``, ``max_shard_bytes``, ``chunk_elements``, ``check_dtypes``,
        ``tokenizer_source`` as in :func:`~.plan.plan_merge` (``lines`` is not supported with slices).
    """
    if kwargs.get("lines") is not None:
        raise ParameterError("lines (LiNeS) is not supported with slices; merge first, then apply LiNeS")
    if not isinstance(slices, Sequence) or isinstance(slices, (str, bytes)) or not slices:
        raise ParameterTypeError(f"slices must be a non-empty list of OutputSlice, got {slices!r}")
    try:
        spec = MERGE_METHODS.get(method)
    except ValueError as err:
        raise ParameterError(str(err)) from None
    if (params or {}).get("topk") == "global":
        raise ParameterError("topk: global ranks over a whole model; with slices use topk: tensor")
    opened: dict[int, tuple[Any, Checkpoint]] = {}
    checkpoints: list[Checkpoint] = []

    def open_model(model: Any, where: str) -> Checkpoint:
        for src, ck in opened.values():
            if _same(src, model):
                return ck
        if is_lora_adapter(model):
            raise ParameterError(f"{where}: LoRA adapters are not supported as slice sources")
        ck = open_checkpoint(model, name=where)
        opened[len(opened)] = (model, ck)
        checkpoints.append(ck)
        return ck

    stacks: dict[int, LayerStack] = {}

    def stack(ck: Checkpoint, where: str) -> LayerStack:
        if id(ck) not in stacks:
            stacks[id(ck)] = layer_stack(ck, where)
        return stacks[id(ck)]

    # resolve every slice: checkpoints, ranges, base source
    resolved = []
    offset = 0
    slices_data = []
    for s, sl in enumerate(slices):
        where = f"slices[{s}]"
        if not isinstance(sl, OutputSlice) or not sl.sources:
            raise ParameterError(f"{where} must have a non-empty list of sources, got {sl!r}")
        srcs = []
        length = None
        for k, src in enumerate(sl.sources):
            w = f"{where}.sources[{k}]"
            ck = open_model(src.model, f"{w}.model")
            st = stack(ck, f"{w}.model")
            start, end = _range(w, src.layer_range, len(st.layers), ck.source)
            if length is not None and end - start != length:
                raise ParameterError(
                    f"{where}: every source must span the same number of layers, got "
                    f"{[list(x.layer_range) for x in sl.sources]}"
                )
            length = end - start
            srcs.append((src, ck, st, start))
        slice_base = sl.base_model if sl.base_model is not None else base
        base_idx = None
        if slice_base is not None and spec.needs_base:
            hits = [i for i, (src, *_rest) in enumerate(srcs) if _same(src.model, slice_base)]
            if not hits:
                raise ParameterError(
                    f"{where}: method {method!r} needs the base model among the slice's sources (its "
                    f"layer_range says which base layers to use); {slice_base} is not one of them"
                )
            base_idx = hits[0]
        elif spec.needs_base:
            raise ParameterError(f"merge method {method!r} needs a base model (base_model)")
        resolved.append((srcs, base_idx, dict(sl.parameters or {}), offset, length))
        slices_data.append(
            {
                "sources": [
                    {"model": ck.source, "layer_range": [a, a + length], "parameters": dict(src.parameters)}
                    for src, ck, _, a in srcs
                ],
                "parameters": dict(sl.parameters or {}),
            }
        )
        offset += length

    glob = dict(params or {})

    def group(
        label: str,
        mappings: list[tuple[Checkpoint, dict[str, str], Mapping[str, Any]]],
        base_idx: int | None,
        slice_params: Mapping[str, Any],
        layout: BlockLayout | None,
    ) -> tuple[str, MergePlan]:
        views = [(RenamedCheckpoint(ck, mp), p) for ck, mp, p in mappings]
        base_view = views[base_idx][0] if base_idx is not None else None
        models = [v for i, v in enumerate(views) if i != base_idx]
        try:
            plan = plan_merge(
                method,
                [v for v, _ in models],
                base_view,
                params={**glob, **slice_params},
                model_params=[dict(p) for _, p in models],
                block_layout=layout,
                **kwargs,
            )
        except (ParameterError, CheckpointError) as err:
            raise type(err)(f"{label}: {err}") from None
        return label, plan

    def other_keys(srcs, pre: bool) -> list[tuple[Checkpoint, dict[str, str], Mapping[str, Any]]]:
        out = []
        for src, ck, st, _ in srcs:
            keys = [k for k in st.other if bool(_PRE.search(k)) == pre]
            out.append((ck, {k: k for k in keys}, src.parameters))
        return out

    parts = []
    first, last = resolved[0], resolved[-1]
    empty = BlockLayout(depth={}, towers={}, keys=())
    pre = other_keys(first[0], True)
    if pre[0][1]:
        parts.append(group("embeddings (first slice's sources)", pre, first[1], first[2], empty))
    for s, (srcs, base_idx, sparams, off, length) in enumerate(resolved):
        mappings = []
        for src, ck, st, start in srcs:
            mp = {}
            for i in range(length):
                for key in st.layers[start + i]:
                    mp[st.rename(key, off + i)] = key
            mappings.append((ck, mp, src.parameters))
        out_keys = list(mappings[0][1])
        depth = {k: ("layers", int(_DEFAULT.search(k).group(1)) - off) for k in out_keys}
        layout = BlockLayout(depth=depth, towers={"layers": length}, keys=tuple(out_keys))
        label = f"slices[{s}] (output layers {off}..{off + length - 1})"
        parts.append(group(label, mappings, base_idx, sparams, layout))
    post = other_keys(last[0], False)
    if post[0][1]:
        parts.append(group("final tensors (last slice's sources)", post, last[1], last[2], empty))
    # side files (config, tokenizer) from the base of the first slice, else its first source
    side_ck = first[0][first[1] if first[1] is not None else 0][1]
    side_stack = stacks[id(side_ck)]
    sample = parts[0][1]
    return SlicedPlan(
        method=spec,
        parts=parts,
        num_layers=offset,
        source_layers=len(side_stack.layers),
        side_source=side_ck.source,
        max_shard_bytes=sample.max_shard_bytes,
        dtype=sample.dtype,
        slices_data=slices_data,
        checkpoints=checkpoints,
    )


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _set_config_layers(config: Path, old: int, new: int) -> None:
    """Set the number of layers (``num_hidden_layers``/``n_layer``/``num_layers`` equal to ``old``, at any
    depth) of a copied ``config.json`` to ``new``."""
    if not config.is_file() or old == new:
        return
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return

    def fix(node: Any) -> bool:
        changed = False
        if isinstance(node, dict):
            for k, v in node.items():
                if k in _LAYER_COUNT_KEYS and type(v) is int and v == old:
                    node[k] = new
                    changed = True
                elif isinstance(v, (dict, list)):
                    changed = fix(v) or changed
        elif isinstance(node, list):
            for v in node:
                changed = fix(v) or changed
        return changed

    if fix(data):
        config.unlink()
        write_json(config, data)


def execute_sliced(
    plan: SlicedPlan,
    out: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    copy_files: bool = True,
    record: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    model_card: bool = True,
) -> MergeResult:
    """Run a :class:`SlicedPlan` (arguments as :func:`~.write.execute_plan`)."""
    from .write import _copy_side_files, _set_config_dtype, write_merged

    info: dict[str, Any] = {
        "method": plan.method.name,
        "slices": plan.slices_data,
        "num_layers": plan.num_layers,
        "params": plan.parts[0][1].params,
        "models": sorted({d["model"] for sl in plan.slices_data for d in sl["sources"]}),
        "base_model": plan.side_source,
        "scale": plan.parts[0][1].scale,
        "seed": plan.parts[0][1].seed,
        "lines_alpha": None,
        "lines_beta": None,
        "lines_table": None,
    }
    specs = plan.out_specs()
    try:
        if out is None:
            tensors = {k: torch.empty(shape, dtype=dt) for k, shape, dt in specs}

            def to_memory(key, chunk, start):
                tensors[key].view(-1)[start : start + chunk.numel()] = chunk

            for _, part in plan.parts:
                run_passes(part, to_memory, None, progress)
            return MergeResult(None, tensors, None, None, None, info)
        inputs = sorted({ck.source for ck in plan.checkpoints if not ck.source.startswith("<")})
        out = check_output_dir(out, overwrite=overwrite, inputs=inputs)
        with atomic_directory(out) as tmp:
            write_merged(
                tmp,
                specs,
                plan.max_shard_bytes,
                lambda sink: [run_passes(part, sink, None, progress) for _, part in plan.parts],
            )
            if copy_files:
                _copy_side_files(Path(plan.side_source), tmp)
                _set_config_layers(tmp / "config.json", plan.source_layers, plan.num_layers)
                if plan.dtype is not None:
                    _set_config_dtype(tmp / "config.json", plan.dtype)
            info.update(record or {})
            if model_card:
                from ..model_card import finish_output

                finish_output(
                    tmp,
                    info,
                    plan.method,
                    config=(record or {}).get("config"),
                    source_text=(record or {}).get("config_text"),
                )
            write_json(tmp / "layerwise_merge.json", info)
        return MergeResult(out, None, None, None, None, info)
    finally:
        plan.close()
