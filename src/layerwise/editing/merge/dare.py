"""DARE (Yu et al., ICML 2024): drop each entry of each task vector with probability ``p``, rescale the rest
by ``1 / (1 - p)`` (so the expectation is unchanged), then combine by weighted sum or by TIES' sign election
and disjoint mean (``combine: ties``, mergekit's dare_ties). ``normalize`` divides by the (agreeing)
weights (default: with ``ties`` only; mergekit's ``dare_ties`` does not); ``rescale: false`` skips the
``1 / (1 - p)``.
"""

from __future__ import annotations

import torch

from ._common import WEIGHT
from ._common import combine as _combine
from .registry import Param, register_merge_method


@register_merge_method(
    "dare",
    params=[
        WEIGHT,
        Param("drop_rate", 0.9, low=0.0, high=0.999, per_model=True, doc="probability p of dropping"),
        Param("combine", "sum", choices=("sum", "ties"), doc="how the rescaled vectors are merged"),
        Param("normalize", None, choices=(None, True, False), doc="divide by weights (default: ties)"),
        Param("rescale", True, choices=(True, False), doc="divide kept entries by 1 - p"),
    ],
    inputs=("uniform",),
    reference="https://arxiv.org/abs/2311.03099",
    description="DARE: random drop with rescaling, then sum (or TIES sign election)",
)
def dare(
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    drop_rate: torch.Tensor,
    combine: str,
    uniform: torch.Tensor,
    normalize: bool | None = None,
    rescale: bool = True,
) -> torch.Tensor:
    """``deltas`` (T, n), ``uniform`` (T, n) draws in [0, 1): entry kept iff ``uniform >= drop_rate``."""
    p = drop_rate[:, None].to(deltas.dtype)  # (T, 1)
    kept = torch.where(uniform.to(deltas.dtype) >= p, deltas / (1 - p) if rescale else deltas, 0)  # (T, n)
    return _combine(kept, weight, combine, normalize)
