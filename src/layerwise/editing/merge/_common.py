"""Pieces shared by several merge methods (kept here so that each method file reads as its formula)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .registry import Param

__all__ = [
    "WEIGHT",
    "DENSITY",
    "TOPK",
    "LAMBDA",
    "RESCALE",
    "RESCALE_MODE",
    "combine",
    "disjoint_mean",
    "elect_sign",
    "keep_topk",
    "masked",
    "l1_rescale_factors",
    "weighted_sum",
]

WEIGHT = Param("weight", 1.0, per_model=True, doc="coefficient of this model's task vector")
DENSITY = Param(
    "density",
    0.2,
    low=0.0,
    high=1.0,
    per_model=True,
    doc="fraction of entries kept: the max(1, int(density * n)) largest magnitudes",
)
LAMBDA = Param(
    "lambda",
    1.0,
    doc="multiplies the merged task vector (mergekit's lambda; on top of scale)",
)
RESCALE = Param("rescale", True, choices=(True, False), doc="rescale the entries kept by the random drop")
RESCALE_MODE = Param(
    "rescale_mode",
    "l1",
    choices=("l1", "probability"),
    doc="l1: multiply each tensor's kept entries by ||delta||_1 / ||kept||_1 (mergekit); probability: "
    "divide each kept entry by its keep probability (the papers' unbiased form)",
)
TOPK = Param(
    "topk",
    "tensor",
    choices=("tensor", "global"),
    doc="rank magnitudes within each tensor (mergekit, peft) or over the whole model (TIES paper)",
)


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES step 2 on weighted task vectors (T, n): ``+1`` where ``sum_t weighted_t >= 0``, else ``-1`` (n,).

    An entry whose sum is exactly 0 elects ``+`` (mergekit's convention), so its positive contributions
    are kept.
    """
    # 2 * [sum >= 0] - 1: exactly +-1, without torch.where (see masked)
    return (weighted.sum(dim=0) >= 0).to(weighted.dtype).mul_(2).sub_(1)


def disjoint_mean(deltas: torch.Tensor, weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES steps 2-3: elect the sign of ``sum_t w_t delta_t``, average the contributions that agree with it.

    ``deltas``: (T, n), already trimmed (dropped entries are 0); ``weight``: (T,). Returns (n,):
    ``sum_t w_t delta_t a_t / sum_t w_t a_t`` with ``a_t = 1[sign(w_t delta_t) = s]`` and ``s`` from
    :func:`elect_sign` (a sum of exactly 0 elects ``+``); a divisor of exactly 0 is replaced by 1, as
    mergekit does. Without ``normalize`` the sum is not divided. Zeros never agree. With positive weights
    this is the paper's disjoint mean; signs of weighted deltas follow mergekit for negative weights.
    """
    weighted = deltas * weight[:, None]  # (T, n)
    elected = elect_sign(weighted)  # (n,)
    aligned = weighted * elected  # (T, n): |weighted| where it agrees with the elected sign, <= 0 elsewhere
    # the agreeing magnitudes summed, then the elected sign: exactly the sum of the agreeing entries (a sum
    # of one sign is negated exactly), without torch.where (see masked)
    total = aligned.clamp(min=0).sum(dim=0).mul_(elected)  # (n,)
    if not normalize:
        return total
    divisor = weight @ (aligned > 0).to(weight.dtype)  # (n,) the agreeing weights
    return total / (divisor + (divisor == 0))  # a divisor of exactly 0 becomes 1


def l1_rescale_factors(l1_before: torch.Tensor, l1_after: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-model factors ``||delta_t||_1 / ||kept_t||_1`` (T,) over a whole tensor; 1 where either norm is
    below ``eps`` (mergekit's ``rescaled_masked_tensor`` with the L1 norm)."""
    ok = (l1_before >= eps) & (l1_after >= eps)
    return torch.where(ok, l1_before / torch.where(ok, l1_after, 1.0), 1.0)


def l1_factors_pass(
    chunks: Callable[[], Iterable[tuple[torch.Tensor, Mapping[str, Any]]]],
    glob: Mapping[str, Any],
    keep: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor],
) -> dict[str, Any]:
    """The ``prepare`` pass of the random-drop methods (DARE, DELLA): ``{"l1_factor": (T,)}`` =
    ``||delta_t||_1 / ||kept_t||_1`` over the whole tensor, with ``keep(deltas, kw)`` the (T, n) keep mask of
    one chunk; ``{}`` unless ``rescale`` is on with ``rescale_mode: l1``."""
    if not glob["rescale"] or glob["rescale_mode"] != "l1":
        return {}
    before = after = None
    for deltas, kw in chunks():
        mag = deltas.abs().double()
        b, a = mag.sum(dim=1).cpu(), torch.where(keep(deltas, kw), mag, 0).sum(dim=1).cpu()
        before, after = (b, a) if before is None else (before + b, after + a)
    return {"l1_factor": l1_rescale_factors(before, after)}


def masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` where the boolean ``keep`` (broadcast to ``x``) holds, 0 elsewhere, for finite ``x``.

    The product with the 0/1 mask, as mergekit computes it: ``torch.where`` is not vectorised on CPU
    (~10 ms per 4 M entries against ~2 ms). A dropped negative entry becomes -0.0 (== 0); a dropped inf or
    NaN would become NaN, so ``x`` must be finite where it is dropped (task vectors are; a divided one, as in
    DELLA, may not be: use ``torch.where`` there).
    """
    return x * keep.to(x.dtype)


def keep_topk(deltas: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry of row ``t`` of ``deltas`` (T, n) whose magnitude is below ``thresholds[t]``."""
    return masked(deltas, deltas.abs().float() >= thresholds[:, None].float())


def weighted_sum(kept: torch.Tensor, weight: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``sum_t w_t kept_t`` (n,) for ``kept`` (T, n); with ``normalize`` divided by ``sum_t w_t`` (by 1 when
    that is below 1e-8 in magnitude, as mergekit does)."""
    total = weight @ kept
    if not normalize:
        return total
    divisor = float(weight.sum())
    return total / (divisor if abs(divisor) >= 1e-8 else 1.0)


def combine(kept: torch.Tensor, weight: torch.Tensor, how: str, normalize: bool | None) -> torch.Tensor:
    """Merge trimmed task vectors ``kept`` (T, n): TIES sign election and disjoint mean (``how="ties"``) or a
    weighted sum (``"sum"``); ``normalize`` None means True for ``"ties"``, False for ``"sum"``."""
    if normalize is None:
        normalize = how == "ties"
    if how == "ties":
        return disjoint_mean(kept, weight, normalize)
    return weighted_sum(kept, weight, normalize)
