"""Magnitude pruning of task vectors: keep each vector's largest-magnitude entries, then sum them.

With one model this is the sparsified task vector; with several it is task arithmetic on pruned vectors
(TIES step 1 without sign election).
"""

from __future__ import annotations

import torch

from ._common import DENSITY, TOPK, WEIGHT, keep_topk
from .registry import register_merge_method


@register_merge_method(
    "magnitude_prune",
    params=[WEIGHT, DENSITY, TOPK],
    inputs=("thresholds",),
    reference="https://arxiv.org/abs/2306.01708",
    description="keep the top-density magnitudes of each task vector, then weighted sum",
)
def magnitude_prune(
    deltas: torch.Tensor, *, weight: torch.Tensor, density: torch.Tensor, topk: str, thresholds: torch.Tensor
) -> torch.Tensor:
    """``deltas`` (T, n) -> ``sum_t w_t delta_t 1[|delta_t| >= thresholds_t]`` (n,)."""
    return weight @ keep_topk(deltas, thresholds)
