"""SCE (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", https://arxiv.org/abs/2408.07990;
mergekit's ``sce``): Select, Calculate, Erase.

Per tensor, with the task vectors ``tau_t`` (T, n):

1. Select: keep the entries whose variance across the models (``var_i = mean_t (tau_ti - mean_s tau_si)^2``)
   is among the ``k = int(select_topk * #{i: var_i != 0})`` largest; the others are zeroed in every task
   vector (``select_topk >= 1`` keeps all, ``<= 0`` none).
2. Calculate: matrix-level coefficients ``w_t = mean_i tau_ti^2 / sum_s mean_i tau_si^2`` over the selected
   task vectors (``1 / T`` each when that sum is below 1e-6, as mergekit does).
3. Erase: elect the sign of ``sum_t tau_ti`` per entry (a sum of exactly 0 elects ``+``); drop the entries
   of the other sign; ``merged_i = sum_t w_t a_ti tau_ti / max(sum_t w_t a_ti, 1e-6)``.

Steps 1-2 need the whole tensor: the driver's pre-passes (``prepare``) find the exact k-th largest
variance (two histogram passes, :mod:`.topk`) and the coefficients, so tensors stream in chunks. Entries
whose variance equals the k-th largest exactly are all kept (mergekit's top-k keeps exactly k).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ._common import elect_sign, masked
from .registry import Param, register_merge_method
from .topk import TwoPassThreshold

__all__ = ["sce", "sce_statistics"]


def _variance(deltas: torch.Tensor) -> torch.Tensor:
    """Variance across models (n,), float32 (the same rounding in every pass)."""
    d = deltas.float()
    return (d - d.mean(dim=0)).square().mean(dim=0)


def _select(deltas: torch.Tensor, threshold: float | None) -> torch.Tensor:
    if threshold is None:
        return deltas
    return masked(deltas, _variance(deltas) >= threshold)


def sce_statistics(
    chunks: Callable[[], Iterable[tuple[torch.Tensor, Mapping[str, Any]]]],
    glob: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    numel: int,
) -> dict[str, Any]:
    """``{"threshold": k-th largest variance or None, "coefficients": w (T,)}`` of one tensor."""
    topk = glob["select_topk"]
    threshold: float | None = None
    if topk <= 0:
        threshold = float("inf")
    elif topk < 1:
        sel = TwoPassThreshold([1])
        nonzero = 0
        for deltas, _ in chunks():
            var = _variance(deltas)
            nonzero += int((var != 0).sum())
            sel.update(var[None, :].cpu())
        sel.ks = torch.tensor([int(nonzero * topk)], dtype=torch.int64)  # k known after the count
        sel.next_pass()
        for deltas, _ in chunks():
            sel.update(_variance(deltas)[None, :].cpu())
        threshold = float(sel.result()[0])
    sq = None
    for deltas, _ in chunks():
        s = _select(deltas, threshold).double().square().sum(dim=1).cpu()
        sq = s if sq is None else sq + s
    weights = sq / max(numel, 1)
    total = float(weights.sum())
    if abs(total) < 1e-6:
        weights = torch.full_like(weights, 1.0 / len(weights))
    else:
        weights = weights / total
    return {"threshold": threshold, "coefficients": weights}


@register_merge_method(
    "sce",
    params=[
        Param("select_topk", 1.0, low=0.0, high=1.0, doc="fraction of the highest-variance entries kept"),
    ],
    prepare=sce_statistics,
    reference="https://arxiv.org/abs/2408.07990",
    description="SCE: select high-variance entries, variance-based coefficients, erase minority signs",
)
def sce(
    deltas: torch.Tensor,
    *,
    select_topk: float,
    threshold: float | None,
    coefficients: torch.Tensor,
) -> torch.Tensor:
    """``deltas`` (T, n) -> SCE-merged task vector (n,) (``threshold``, ``coefficients``: pre-pass)."""
    tv = _select(deltas, threshold)
    agree = (tv * elect_sign(tv)) > 0  # (T, n)
    ew = coefficients.to(deltas.dtype)[:, None] * agree
    return (tv * ew).sum(dim=0) / ew.sum(dim=0).clamp(min=1e-6)
