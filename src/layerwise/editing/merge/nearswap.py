"""NearSwap (mergekit's ``nearswap``; the method of the merge
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): take the other model's value where it is
near the base's, keep the base's where the two differ a lot.

Entry by entry, with ``v0`` the base, ``v1`` the other model and the sameness threshold ``t > 0``:

``w = clamp(t / max(|v1 - v0|, 1e-6), 0, 1)``,  ``merged = w v1 + (1 - w) v0``,

so entries that differ by at most ``t`` become ``v1`` and larger differences move from ``v0`` toward
``v1`` by ``t / |v1 - v0|`` only (the merged task vector is ``w * delta``). The ``1e-6`` floor on the
difference is mergekit's.
"""

from __future__ import annotations

import torch

from ...errors import ParameterError
from .registry import REQUIRED, Param, register_merge_method

__all__ = ["nearswap"]


def _two_models(glob, per_model) -> None:
    if len(per_model) != 1:
        raise ParameterError(
            f"nearswap compares base_model with exactly one other model, got {len(per_model)} models "
            "besides the base"
        )
    if glob["t"] <= 0:
        raise ParameterError(f"parameters.t must be > 0 (the sameness threshold), got {glob['t']}")


@register_merge_method(
    "nearswap",
    params=[Param("t", REQUIRED, low=0.0, doc="sameness threshold: differences up to t take the other")],
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    description="NearSwap: the other model's values where they are within t of the base's",
    validate=_two_models,
)
def nearswap(deltas: torch.Tensor, *, t: float) -> torch.Tensor:
    """``deltas`` (1, n) -> ``clamp(t / max(|delta|, 1e-6), 0, 1) * delta`` (n,)."""
    delta = deltas[0]
    w = (t / delta.abs().clamp(min=1e-6)).clamp(0, 1)
    return w * delta
