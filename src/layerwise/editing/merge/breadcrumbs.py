"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging
with Sparse Masks", https://arxiv.org/abs/2312.06795).

Each task vector is masked per tensor: the ``gamma`` fraction of its largest magnitudes (outliers) is
dropped, and of the rest only the next ``density`` fraction is kept (the smallest magnitudes are dropped):
with ``n`` elements, ``n_top = int(gamma n)`` and ``n_keep = int(density n)`` (if ``n_top + n_keep > n``,
``n_top`` shrinks), an entry is kept iff its magnitude rank (1 = largest) is in
``(n_top, n_top + n_keep]``; ``density >= 1`` keeps the task vector whole. The masked vectors are then
summed with their weights (``combine: sum``) or merged by TIES' sign election (``combine: ties``, mergekit's
``breadcrumbs_ties``); ``normalize`` divides by the (agreeing) weights; ``lambda`` multiplies the result.

The ranks come from two exact magnitude thresholds per task vector computed by the driver
(``inputs=("thresholds",)`` with two ranks), so tensors of any size stream in chunks. ``n_top = 0`` (small
tensors, ``gamma n < 1``) drops no outlier (as mergekit 0.1.5 does; earlier mergekit releases emptied the
mask).
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import LAMBDA, WEIGHT, masked
from ._common import combine as _combine
from .registry import Param, register_merge_method

__all__ = ["breadcrumbs", "breadcrumbs_ranks"]


def breadcrumbs_ranks(values, n: int) -> list[int]:
    """``[n_top, n_top + n_keep]``: the ranks of the two thresholds (``values``: one model's parameters)."""
    if values["density"] >= 1:
        return [0, n + 1]  # keep everything: |x| < inf and |x| >= 0
    n_keep = int(values["density"] * n)
    n_top = min(int(values["gamma"] * n), n - n_keep)
    return [n_top, n_top + n_keep]


@register_merge_method(
    "breadcrumbs",
    params=[
        WEIGHT,
        Param("density", 0.9, low=0.0, high=1.0, per_model=True, doc="fraction of entries kept"),
        Param("gamma", 0.01, low=0.0, high=1.0, per_model=True, doc="fraction of largest entries dropped"),
        Param("combine", "sum", choices=("sum", "ties"), doc="weighted sum, or TIES sign election"),
        Param("normalize", False, choices=(True, False), doc="divide by the (agreeing) weights"),
        LAMBDA,
    ],
    inputs=("thresholds",),
    ranks=breadcrumbs_ranks,
    reference="https://arxiv.org/abs/2312.06795",
    description="Breadcrumbs: drop the largest (gamma) and smallest magnitudes, keep density",
)
def breadcrumbs(
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    gamma: torch.Tensor,
    combine: str,
    normalize: bool,
    thresholds: torch.Tensor,
    **kw: Any,
) -> torch.Tensor:
    """``deltas`` (T, n), ``thresholds`` (T, 2): ``[n_top-th, (n_top + n_keep)-th]`` largest magnitudes."""
    mag = deltas.abs().float()
    keep = (mag < thresholds[:, :1].float()) & (mag >= thresholds[:, 1:].float())  # (T, n)
    kept = masked(deltas, keep)
    merged = _combine(kept, weight, combine, normalize)
    return merged if kw["lambda"] == 1 else kw["lambda"] * merged
