"""TALL masks and Consensus merging (Wang et al., ICML 2024, "Localizing Task Information for Improved
Model Merging and Compression", https://arxiv.org/abs/2405.07813).

With the multi-task vector ``tau_MTL = sum_t w_t tau_t`` (task arithmetic), the TALL mask of task ``t`` keeps
the entries where the task's own update dominates what the merge changes for it:
``m_t = |tau_t| > lambda_t |tau_MTL - tau_t|`` (equivalently ``|theta_0 - theta_t| > lambda_t
|theta_MTL - theta_t|``).

- ``consensus``: keep the entries active in at least ``k`` masks: ``1[sum_t m_t >= k] * tau_MTL``.
- ``tall_masks``: reconstruct one task's model from the merge: ``m_target * tau_MTL``.
"""

from __future__ import annotations

import torch

from ...errors import ParameterError
from ._common import WEIGHT, masked
from .registry import Param, register_merge_method

LAMBDA = Param(
    "mask_lambda",
    0.6,
    low=0.0,
    per_model=True,
    doc="TALL-mask threshold lambda_t (the paper searches 0.2 ... 0.6)",
)


def tall_mask(
    deltas: torch.Tensor, weight: torch.Tensor, mask_lambda: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masks (T, n) bool, tau_MTL (n,))`` for task vectors ``deltas`` (T, n)."""
    mtl = weight.to(deltas.dtype) @ deltas  # (n,)
    masks = deltas.abs() > mask_lambda[:, None].to(deltas.dtype) * (mtl[None, :] - deltas).abs()  # (T, n)
    return masks, mtl


@register_merge_method(
    "consensus",
    params=[WEIGHT, LAMBDA, Param("k", 2.0, low=0.0, doc="minimum number of tasks (masks) agreeing")],
    reference="https://arxiv.org/abs/2405.07813",
    description="Consensus TA: keep entries active in >= k TALL masks",
)
def consensus(
    deltas: torch.Tensor, *, weight: torch.Tensor, mask_lambda: torch.Tensor, k: float
) -> torch.Tensor:
    masks, mtl = tall_mask(deltas, weight, mask_lambda)
    return masked(mtl, masks.sum(dim=0) >= k)


def _check_target(glob, per_model) -> None:
    """``target`` must index one of the models (checked before any tensor is read)."""
    target, n = glob["target"], len(per_model)
    if target != int(target) or not 0 <= target < n:
        raise ParameterError(
            f"parameters.target must be a model index, an integer in [0, {n - 1}] for {n} model(s), "
            f"got {target}"
        )


@register_merge_method(
    "tall_masks",
    params=[
        WEIGHT,
        LAMBDA,
        Param("target", 0.0, low=0.0, doc="index (0-based, in models) of the task to reconstruct"),
    ],
    reference="https://arxiv.org/abs/2405.07813",
    description="TALL masks: one task's model rebuilt from the multi-task vector",
    validate=_check_target,
)
def tall_masks(
    deltas: torch.Tensor, *, weight: torch.Tensor, mask_lambda: torch.Tensor, target: float
) -> torch.Tensor:
    t = int(target)
    if t != target or not 0 <= t < deltas.shape[0]:
        raise ParameterError(f"target must be a model index in [0, {deltas.shape[0] - 1}], got {target}")
    masks, mtl = tall_mask(deltas, weight, mask_lambda)
    return masked(mtl, masks[t])
