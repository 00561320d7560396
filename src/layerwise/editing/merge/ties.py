"""TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

1. Trim: keep the top ``density`` fraction of each task vector by magnitude (per tensor, as mergekit and peft
   do, or over the whole flattened model as in the paper: ``topk: global``).
2. Elect: ``s = sign(sum_t w_t trimmed_t)``.
3. Disjoint mean: average, per entry, the trimmed values whose sign agrees with ``s``.
With ``weight != 1`` the mean is weighted (mergekit's convention); ``normalize: false`` keeps the sum. An
entry whose weighted sum is exactly 0 elects ``+`` (mergekit). ``lambda`` multiplies the result.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import DENSITY, LAMBDA, TOPK, WEIGHT, disjoint_mean, keep_topk
from .registry import Param, register_merge_method


@register_merge_method(
    "ties",
    params=[
        WEIGHT,
        DENSITY,
        TOPK,
        Param("normalize", True, choices=(True, False), doc="divide by the agreeing weights"),
        LAMBDA,
    ],
    inputs=("thresholds",),
    reference="https://arxiv.org/abs/2306.01708",
    description="TIES: top-k trim, sign election, disjoint mean",
)
def ties(
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    topk: str,
    normalize: bool,
    thresholds: torch.Tensor,
    **kw: Any,
) -> torch.Tensor:
    """``deltas`` (T, n), ``thresholds`` (T,) -> TIES-merged task vector (n,)."""
    merged = disjoint_mean(keep_topk(deltas, thresholds), weight, normalize)
    return merged if kw["lambda"] == 1 else kw["lambda"] * merged
