"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", https://arxiv.org/abs/2311.03099): drop each entry of each task vector with probability
``p``, rescale the kept entries, then combine by weighted sum or by TIES' sign election and disjoint mean
(``combine: ties``, mergekit's dare_ties).

Rescaling (``rescale: true``, the default), per tensor and model:

- ``rescale_mode: l1`` (default, mergekit 0.1.5): the kept entries are multiplied by
  ``||delta||_1 / ||kept||_1`` over the whole tensor, so each sparsified tensor keeps its L1 norm (no
  rescaling where either norm is below 1e-7). The ratio needs the whole tensor: the driver computes both
  norms in a pass before the merge (:func:`dare_l1_norms`), so tensors of any size still stream in chunks.
- ``rescale_mode: probability`` (the paper's form): each kept entry is divided by ``1 - p``, which keeps
  the expectation of every entry (the L1 norm only on average).

``rescale: false`` skips both. ``normalize`` divides by the (agreeing) weights (default: with ``ties``
only; mergekit's ``dare_ties`` does not); ``lambda`` multiplies the merged vector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ._common import LAMBDA, RESCALE, RESCALE_MODE, WEIGHT, l1_factors_pass
from ._common import combine as _combine
from .registry import Param, register_merge_method

__all__ = ["dare", "dare_l1_norms"]


def _keep(uniform: torch.Tensor, drop_rate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keep mask (T, n): entry kept iff its draw is ``>= p``."""
    return uniform.to(dtype) >= drop_rate[:, None].to(dtype)


def dare_l1_norms(
    chunks: Callable[[], Iterable[tuple[torch.Tensor, Mapping[str, Any]]]],
    glob: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    numel: int,
) -> dict[str, Any]:
    """``{"l1_factor": (T,)}``: ``||delta_t||_1 / ||kept_t||_1`` over the whole tensor (module doc)."""
    return l1_factors_pass(
        chunks, glob, lambda deltas, kw: _keep(kw["uniform"], kw["drop_rate"], deltas.dtype)
    )


@register_merge_method(
    "dare",
    params=[
        WEIGHT,
        Param("drop_rate", 0.9, low=0.0, high=0.999, per_model=True, doc="probability p of dropping"),
        Param("combine", "sum", choices=("sum", "ties"), doc="how the rescaled vectors are merged"),
        Param("normalize", None, choices=(None, True, False), doc="divide by weights (default: ties)"),
        RESCALE,
        RESCALE_MODE,
        LAMBDA,
    ],
    inputs=("uniform",),
    prepare=dare_l1_norms,
    reference="https://arxiv.org/abs/2311.03099",
    description="DARE: random drop with rescaling, then sum (or TIES sign election)",
)
def dare(deltas: torch.Tensor, *, uniform: torch.Tensor, **kw: Any) -> torch.Tensor:
    """``deltas`` (T, n), ``uniform`` (T, n) draws in [0, 1): entry kept iff ``uniform >= drop_rate``."""
    keep = _keep(uniform, kw["drop_rate"], deltas.dtype)  # (T, n)
    if not kw["rescale"]:
        scaled = deltas
    elif kw["rescale_mode"] == "l1":
        scaled = deltas * kw["l1_factor"].to(deltas.dtype)[:, None]
    else:
        scaled = deltas / (1 - kw["drop_rate"][:, None].to(deltas.dtype))
    kept = torch.where(keep, scaled, 0)
    merged = _combine(kept, kw["weight"], kw["combine"], kw["normalize"])
    return merged if kw["lambda"] == 1 else kw["lambda"] * merged
