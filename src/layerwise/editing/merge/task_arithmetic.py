"""Task arithmetic (Ilharco et al., ICLR 2023): the merged task vector is ``sum_t w_t tau_t``."""

from __future__ import annotations

import torch

from ._common import WEIGHT
from .registry import register_merge_method


@register_merge_method(
    "task_arithmetic",
    params=[WEIGHT],
    reference="https://arxiv.org/abs/2212.04089",
    description="weighted sum of task vectors: theta_0 + scale * sum_t w_t tau_t",
)
def task_arithmetic(deltas: torch.Tensor, *, weight: torch.Tensor) -> torch.Tensor:
    """``deltas`` (T, n), ``weight`` (T,) -> ``sum_t weight[t] * deltas[t]`` (n,)."""
    return weight @ deltas
