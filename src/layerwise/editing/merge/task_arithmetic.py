"""Task arithmetic (Ilharco et al., ICLR 2023): the merged task vector is ``lambda * sum_t w_t tau_t``
(``lambda`` as in mergekit; ``scale`` multiplies on top of it)."""

from __future__ import annotations

from typing import Any

import torch

from ._common import LAMBDA, WEIGHT
from .registry import register_merge_method


@register_merge_method(
    "task_arithmetic",
    params=[WEIGHT, LAMBDA],
    reference="https://arxiv.org/abs/2212.04089",
    description="weighted sum of task vectors: theta_0 + scale * sum_t w_t tau_t",
)
def task_arithmetic(deltas: torch.Tensor, *, weight: torch.Tensor, **kw: Any) -> torch.Tensor:
    """``deltas`` (T, n), ``weight`` (T,) -> ``lambda * sum_t weight[t] * deltas[t]`` (n,)."""
    merged = weight @ deltas
    return merged if kw["lambda"] == 1 else kw["lambda"] * merged
