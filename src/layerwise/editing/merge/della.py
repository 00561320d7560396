"""DELLA-Merging (Deep, Bhardwaj, Majumder 2024, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", https://arxiv.org/abs/2406.11617): MAGPRUNE, then merge.

MAGPRUNE: within each row of a task-vector tensor (its last dimension; a 1-D tensor is one row) the ``m``
entries are ranked by magnitude (``r = 0`` smallest ... ``m - 1`` largest) and entry ``i`` is *kept* with
probability ``p_i = density - epsilon + 2 epsilon r_i / (m - 1)`` (so the mean keep probability is
``density``; a row of one entry uses ``p = density``). Kept entries are rescaled (``rescale: true``):

- ``rescale_mode: l1`` (default, mergekit 0.1.5): multiplied by ``||delta||_1 / ||kept||_1`` over the whole
  tensor (per model), so each pruned tensor keeps its L1 norm (computed in a pass before the merge);
- ``rescale_mode: probability`` (the paper): divided by ``p_i``, so each entry keeps its expectation.

The pruned vectors are merged by TIES' sign election and disjoint mean (``combine: ties``, mergekit's
``della``) or by a weighted sum (``combine: sum``, ``della_linear``); the result is multiplied by
``lambda``. ``density >= 1`` keeps everything, ``density = 0`` nothing; otherwise ``density - epsilon`` and
``density + epsilon`` must lie strictly inside (0, 1), as mergekit requires.

Draws come from the driver (``inputs=("uniform",)``, seeded by seed, tensor, model and position) and the
driver hands whole rows to the method (``rows=True``), so results do not depend on chunking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ...errors import ParameterError
from ._common import LAMBDA, RESCALE, RESCALE_MODE, WEIGHT, l1_factors_pass
from ._common import combine as _combine
from .registry import Param, register_merge_method

__all__ = ["della", "della_l1_norms", "magprune_probabilities"]


def magprune_probabilities(
    deltas: torch.Tensor, density: torch.Tensor, epsilon: torch.Tensor, row_length: int
) -> torch.Tensor:
    """Keep probabilities (T, n) for ``deltas`` (T, n) made of whole rows of ``row_length`` entries."""
    t, n = deltas.shape
    rows = deltas.reshape(t, n // row_length, row_length).abs().float()
    ranks = rows.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).to(torch.float64)
    frac = ranks / (row_length - 1) if row_length > 1 else torch.full_like(ranks, 0.5)
    d = density.double()[:, None, None]
    e = epsilon.double()[:, None, None]
    probs = (d - e + 2 * e * frac).clamp(0, 1)
    return torch.where(d >= 1, 1.0, torch.where(d <= 0, 0.0, probs)).reshape(t, n)


def _check_probabilities(glob, per_model) -> None:
    for i, mp in enumerate(per_model):
        d, e = mp["density"], mp["epsilon"]
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise ParameterError(
                f"models[{i}].parameters: della needs density - epsilon > 0 and density + epsilon < 1 "
                f"(keep probabilities strictly inside (0, 1), as mergekit requires), got density {d}, "
                f"epsilon {e}"
            )


def della_l1_norms(
    chunks: Callable[[], Iterable[tuple[torch.Tensor, Mapping[str, Any]]]],
    glob: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    numel: int,
) -> dict[str, Any]:
    """``{"l1_factor": (T,)}``: ``||delta_t||_1 / ||kept_t||_1`` over the whole tensor (rescale_mode l1)."""
    return l1_factors_pass(chunks, glob, _keep)


def _keep(deltas: torch.Tensor, kw: Mapping[str, Any]) -> torch.Tensor:
    probs = magprune_probabilities(deltas, kw["density"], kw["epsilon"], kw["row_length"])
    return kw["uniform"].double() < probs


@register_merge_method(
    "della",
    params=[
        WEIGHT,
        Param("density", 0.7, low=0.0, high=1.0, per_model=True, doc="mean keep probability"),
        Param("epsilon", 0.15, low=0.0, high=1.0, per_model=True, doc="spread of the keep probabilities"),
        LAMBDA,
        Param("combine", "ties", choices=("ties", "sum"), doc="TIES sign election (della) or sum"),
        Param("normalize", None, choices=(None, True, False), doc="divide by weights (default: ties)"),
        RESCALE,
        RESCALE_MODE,
    ],
    inputs=("uniform",),
    rows=True,
    prepare=della_l1_norms,
    reference="https://arxiv.org/abs/2406.11617",
    description="DELLA: magnitude-ranked drop probabilities with rescaling, then TIES (or sum)",
    validate=_check_probabilities,
)
def della(deltas: torch.Tensor, **kw) -> torch.Tensor:
    """``deltas`` (T, n) of whole rows, ``uniform`` (T, n), ``row_length`` -> merged task vector (n,)."""
    probs = magprune_probabilities(deltas, kw["density"], kw["epsilon"], kw["row_length"])
    keep = kw["uniform"].double() < probs
    if not kw["rescale"]:
        scaled = deltas
    elif kw["rescale_mode"] == "l1":
        scaled = deltas * kw["l1_factor"].to(deltas.dtype)[:, None]
    else:
        scaled = deltas / probs.to(deltas.dtype)
    kept = torch.where(keep, scaled, 0)
    return kw["lambda"] * _combine(kept, kw["weight"], kw["combine"], kw["normalize"])
