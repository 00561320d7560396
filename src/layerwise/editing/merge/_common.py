"""Pieces shared by several merge methods (kept here so that each method file reads as its formula)."""

from __future__ import annotations

import torch

from .registry import Param

__all__ = ["WEIGHT", "DENSITY", "TOPK", "disjoint_mean"]

WEIGHT = Param("weight", 1.0, per_model=True, doc="coefficient of this model's task vector")
DENSITY = Param(
    "density",
    0.2,
    low=0.0,
    high=1.0,
    per_model=True,
    doc="fraction of entries kept: the max(1, int(density * n)) largest magnitudes",
)
TOPK = Param(
    "topk",
    "tensor",
    choices=("tensor", "global"),
    doc="rank magnitudes within each tensor (mergekit, peft) or over the whole model (TIES paper)",
)


def disjoint_mean(deltas: torch.Tensor, weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES steps 2-3: elect the sign of ``sum_t w_t delta_t``, average the entries that agree with it.

    ``deltas``: (T, n), already trimmed (dropped entries are 0); ``weight``: (T,). Returns (n,):
    ``sum_t w_t delta_t [sign(delta_t) = s] / sum_t w_t [sign(delta_t) = s]`` (0 where nothing agrees);
    without ``normalize`` the sum is not divided. Zeros never count as agreeing.
    """
    weighted = deltas * weight[:, None]  # (T, n)
    elected = torch.sign(weighted.sum(dim=0))  # (n,)
    agree = (torch.sign(deltas) == elected) & (deltas != 0)  # (T, n)
    total = torch.where(agree, weighted, 0).sum(dim=0)  # (n,)
    if not normalize:
        return total
    divisor = torch.where(agree, weight[:, None], 0).sum(dim=0)  # (n,)
    divisor = torch.where(divisor.abs() < 1e-12, torch.ones_like(divisor), divisor)
    return total / divisor


def keep_topk(deltas: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry of row ``t`` of ``deltas`` (T, n) whose magnitude is below ``thresholds[t]``."""
    keep = deltas.abs().float() >= thresholds[:, None].float()  # (T, n)
    return torch.where(keep, deltas, 0)
