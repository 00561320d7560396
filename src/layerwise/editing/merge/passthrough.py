"""Passthrough (mergekit's ``passthrough``): copy one model's tensors, optionally scaled.

The method of layer-stacking merges ("frankenmerges", :mod:`.slices`): each output slice takes its layers
from one model. ``scale`` (per model, default 1) multiplies the copied tensor; with a ``filter`` list it
scales only some tensors (e.g. ``o_proj``/``down_proj`` of repeated layers). Exactly one model.
"""

from __future__ import annotations

import torch

from ...errors import ParameterError
from .registry import Param, register_merge_method

__all__ = ["passthrough"]


def _one_model(glob, per_model) -> None:
    if len(per_model) != 1:
        raise ParameterError(
            f"passthrough copies exactly one model's tensors, got {len(per_model)} models (use slices to "
            "take layers from several models)"
        )


@register_merge_method(
    "passthrough",
    params=[Param("scale", 1.0, per_model=True, doc="multiplies the copied tensor")],
    inputs=("base",),
    needs_base=False,
    reference="https://github.com/arcee-ai/mergekit",
    description="passthrough: one model's tensors as they are (times scale); layer stacking with slices",
    validate=_one_model,
)
def passthrough(deltas: torch.Tensor, *, scale: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``deltas`` (1, n), ``base`` (n,) -> ``scale * (base + delta) - base`` (n,)."""
    s = float(scale[0])
    model = base + deltas[0]
    return deltas[0] if s == 1 else s * model - base
