"""Data-dependent merges: RegMean and Fisher merging, from statistics computed on the user's batches.

Unlike the element-wise methods of :data:`~layerwise.editing.merge.MERGE_METHODS` (which see only the task
vectors), these need per-model statistics (:mod:`.statistics`), so they have their own registry,
:data:`DATA_MERGE_METHODS`, and entry point :func:`merge_with_statistics` (CLI: ``layerwise merge-data``).
Both merge the fine-tuned weights themselves; no base model is needed.

- **RegMean** (Jin et al., ICLR 2023, https://arxiv.org/abs/2212.09849), for each linear weight
  ``W_i`` (out, in) with input Gram ``G_i`` (in, in): ``W* = (sum_i W_i G~_i) (sum_i G~_i)^-1``, the
  minimiser of ``sum_i ||X_i W^T - X_i W_i^T||^2``; ``G~_i = alpha G_i + (1 - alpha) diag(G_i)`` (the
  paper's off-diagonal scaling; ``alpha = 1`` is the exact least-squares merge). ``gram: mean`` divides each
  ``G_i`` by its row count first (the reference code's normalisation). Every other tensor is averaged.
- **Fisher merging** (Matena & Raffel, NeurIPS 2022, https://arxiv.org/abs/2111.09832):
  ``theta* = sum_i w_i F_i theta_i / sum_i w_i F_i`` element-wise, with the diagonal Fishers floored at
  ``eps``; tensors without a Fisher are averaged with the weights ``w_i``.

Example
-------
>>> import torch
>>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 2.0])}
>>> fa, fb = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 1.0])}
>>> merge_with_statistics("fisher", [a, b], [fa, fb])["w"]
tensor([3., 2.])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..._registry import Registry
from ...errors import CheckpointError, ParameterError, ParameterTypeError
from ..checkpoints import load_state_dict
from .registry import Param
from .statistics import Statistics, load_statistics

__all__ = [
    "DataMergeMethod",
    "DATA_MERGE_METHODS",
    "merge_with_statistics",
    "regmean",
    "fisher",
    "refuse_data_method",
]


@dataclass(frozen=True)
class DataMergeMethod:
    """A data-dependent merge: ``fn(models, statistics, weights, **params) -> (merged, info)``."""

    name: str
    fn: Callable[..., tuple[dict[str, torch.Tensor], dict[str, Any]]]
    kind: str
    params: tuple[Param, ...]
    reference: str
    description: str


DATA_MERGE_METHODS: Registry[DataMergeMethod] = Registry("data-dependent merge method")


def refuse_data_method(method: object) -> None:
    """Raise :class:`~layerwise.errors.ParameterError` when ``method`` names a data-dependent merge.

    The element-wise entry points (``layerwise merge``, :func:`~layerwise.editing.merge.merge_models`) call
    this before their own lookup, so ``method: regmean`` says where it lives instead of "unknown method".
    """
    if isinstance(method, str) and method in DATA_MERGE_METHODS:
        raise ParameterError(
            f"method {method!r} is data-dependent: it needs per-model statistics computed on your batches; "
            "use `layerwise merge-data CONFIG` or merge_with_statistics() (docs: community benchmarks guide)"
        )


def _register(name: str, kind: str, params: Sequence[Param], reference: str, description: str):
    def deco(fn):
        DATA_MERGE_METHODS.register(
            name, DataMergeMethod(name, fn, kind, tuple(params), reference, description)
        )
        return fn

    return deco


def _average(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack([t.double() for t in tensors])  # (T, ...)
    w = weights.double().reshape(-1, *([1] * (stacked.dim() - 1)))
    return (w * stacked).sum(0) / weights.double().sum()


@_register(
    "regmean",
    "regmean",
    [
        Param("alpha", 1.0, low=0.0, high=1.0, doc="off-diagonal scaling of the Gram matrices (1 = exact)"),
        Param("gram", "sum", choices=("sum", "mean"), doc="Gram of the summed rows, or divided by the rows"),
    ],
    "https://arxiv.org/abs/2212.09849",
    "per linear layer W* = (sum_i W_i G_i)(sum_i G_i)^-1 from input Gram matrices; other tensors averaged",
)
def regmean(
    models: Sequence[Mapping[str, torch.Tensor]],
    statistics: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    *,
    alpha: float,
    gram: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RegMean over state dicts ``models`` with Grams ``statistics`` (``"<layer>.weight" -> (in, in)``)."""
    merged: dict[str, torch.Tensor] = {}
    solved: list[str] = []
    for key, ref in models[0].items():
        if not ref.is_floating_point():
            merged[key] = ref.clone()
            continue
        have = [key in s for s in statistics]
        if any(have) and not all(have):
            raise CheckpointError(f"RegMean: the Gram of {key!r} is missing for model {have.index(False)}")
        if not all(have) or ref.dim() != 2:
            merged[key] = _average([m[key] for m in models], weights).to(ref.dtype)
            continue
        total_g = torch.zeros(ref.shape[1], ref.shape[1], dtype=torch.float64)
        total_wg = torch.zeros(ref.shape, dtype=torch.float64)  # (out, in)
        for i, (m, s) in enumerate(zip(models, statistics, strict=True)):
            g = s[key].double()
            if g.shape != (ref.shape[1], ref.shape[1]):
                raise CheckpointError(
                    f"RegMean: the Gram of {key!r} for model {i} is {list(g.shape)}, expected "
                    f"{[ref.shape[1]] * 2} (the weight's input dimension)"
                )
            if gram == "mean":
                count = getattr(s, "counts", {}).get(key)
                if not count:
                    raise CheckpointError(f"RegMean gram: mean needs the row count of {key!r} (model {i})")
                g = g / count
            g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
            total_g += weights[i].double() * g
            total_wg += weights[i].double() * (m[key].double() @ g)
        # W* = total_wg total_g^-1, i.e. solve W* total_g = total_wg (total_g symmetric)
        try:
            sol = torch.linalg.solve(total_g, total_wg.T).T
        except RuntimeError:
            raise ParameterError(
                f"RegMean: the summed Gram of {key!r} is singular (inputs span fewer than {ref.shape[1]} "
                "dimensions); use more batches or alpha < 1"
            ) from None
        merged[key] = sol.to(ref.dtype)
        solved.append(key)
    return merged, {"regmean_layers": solved}


@_register(
    "fisher",
    "fisher",
    [
        Param(
            "eps", 1e-8, low=0.0, doc="floor of the diagonal Fisher (all-zero entries fall back to the mean)"
        )
    ],
    "https://arxiv.org/abs/2111.09832",
    "element-wise theta* = sum_i w_i F_i theta_i / sum_i w_i F_i with diagonal Fishers",
)
def fisher(
    models: Sequence[Mapping[str, torch.Tensor]],
    statistics: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    *,
    eps: float,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fisher-weighted average of state dicts ``models`` with diagonal Fishers ``statistics``."""
    merged: dict[str, torch.Tensor] = {}
    averaged: list[str] = []
    for key, ref in models[0].items():
        if not ref.is_floating_point():
            merged[key] = ref.clone()
            continue
        have = [key in s for s in statistics]
        if any(have) and not all(have):
            raise CheckpointError(f"Fisher: the Fisher of {key!r} is missing for model {have.index(False)}")
        if not all(have):
            merged[key] = _average([m[key] for m in models], weights).to(ref.dtype)
            averaged.append(key)
            continue
        num = torch.zeros(ref.shape, dtype=torch.float64)
        den = torch.zeros(ref.shape, dtype=torch.float64)
        for i, (m, s) in enumerate(zip(models, statistics, strict=True)):
            f = s[key].double()
            if f.shape != ref.shape:
                raise CheckpointError(
                    f"Fisher: the Fisher of {key!r} for model {i} is {list(f.shape)}, "
                    f"expected {list(ref.shape)}"
                )
            if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise CheckpointError(
                    f"Fisher: the Fisher of {key!r} for model {i} is negative or not finite"
                )
            f = f.clamp_min(eps) * weights[i].double()
            num += f * m[key].double()
            den += f
        plain = _average([m[key] for m in models], weights)
        merged[key] = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), plain).to(ref.dtype)
    return merged, {"averaged": averaged}


def _state(source: Any, i: int) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return dict(source)
    return load_state_dict(source)


def _stats(source: Any, kind: str, i: int) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        if isinstance(source, Statistics) and source.kind != kind:
            raise ParameterError(f"statistics[{i}] holds {source.kind} statistics, {kind} needed")
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_statistics(source, kind)
    raise ParameterTypeError(f"statistics[{i}] must be a mapping or a file path, got {type(source).__name__}")


def merge_with_statistics(
    method: str,
    models: Sequence[Any],
    statistics: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    return_info: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Merge fine-tuned ``models`` with a data-dependent method.

    Parameters
    ----------
    method : ``"regmean"`` or ``"fisher"`` (names in :data:`DATA_MERGE_METHODS`)
    models : state dicts or checkpoint paths (any form :func:`~layerwise.editing.load_state_dict` reads),
        all with the same tensor names and shapes
    statistics : one per model: mappings from :func:`.collect_regmean_stats` / :func:`.collect_fisher` or
        files from :func:`.save_statistics`
    weights : per-model weights ``w_i`` (default 1 each; positive)
    params : the method's parameters (``alpha``, ``gram`` for RegMean; ``eps`` for Fisher)
    return_info : also return a dict describing what was merged how

    Returns
    -------
    dict
        The merged state dict (each tensor in its input dtype), and the info dict if ``return_info``.
    """
    if not isinstance(method, str):
        raise ParameterTypeError(
            f"method must be one of {sorted(DATA_MERGE_METHODS.names())}, got {method!r}"
        )
    try:
        spec = DATA_MERGE_METHODS.get(method)
    except ValueError as err:
        raise ParameterError(str(err)) from None
    if isinstance(models, (str, os.PathLike, Mapping)) or not isinstance(models, Sequence) or not models:
        raise ParameterError("models must be a non-empty list of state dicts or checkpoint paths")
    if isinstance(statistics, (str, os.PathLike, Mapping)) or not isinstance(statistics, Sequence):
        raise ParameterTypeError("statistics must be a list with one entry per model")
    if len(statistics) != len(models):
        raise ParameterError(
            f"statistics must have one entry per model ({len(models)}), got {len(statistics)}"
        )
    w = [1.0] * len(models) if weights is None else list(weights)
    if len(w) != len(models):
        raise ParameterError(f"weights must have one entry per model ({len(models)}), got {len(w)}")
    for i, v in enumerate(w):
        Param("weight", low=0.0).check(v, f"weights[{i}].")
    if sum(w) <= 0:
        raise ParameterError(f"weights must not all be 0, got {w}")
    values = dict(params or {})
    unknown = sorted(set(values) - {p.name for p in spec.params})
    if unknown:
        raise ParameterError(
            f"unknown parameter(s) {unknown} for {method!r}; valid: {[p.name for p in spec.params]}"
        )
    kwargs = {p.name: p.check(values.get(p.name, p.default), "parameters.") for p in spec.params}
    states = [_state(m, i) for i, m in enumerate(models)]
    for i, s in enumerate(states[1:], start=1):
        if list(s) != list(states[0]) and set(s) != set(states[0]):
            diff = sorted(set(s) ^ set(states[0]))[:5]
            raise CheckpointError(f"models[{i}] has other tensor names than models[0]: {diff}")
        bad = [k for k in s if s[k].shape != states[0][k].shape]
        if bad:
            raise CheckpointError(f"models[{i}]: shapes differ from models[0] for {bad[:5]}")
    stats = [_stats(s, spec.kind, i) for i, s in enumerate(statistics)]
    merged, info = spec.fn(states, stats, torch.tensor(w, dtype=torch.float64), **kwargs)
    info = {"method": method, "params": kwargs, "weights": w, **info}
    return (merged, info) if return_info else merged
