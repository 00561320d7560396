"""SLERP: spherical linear interpolation between two models (Shoemake, SIGGRAPH 1985, "Animating rotation
with quaternion curves", https://doi.org/10.1145/325165.325242; the model-merging form of mergekit,
https://github.com/arcee-ai/mergekit).

Each tensor is a vector: with ``v0`` the base model's tensor, ``v1`` the other model's, and
``cos(theta) = <v0, v1> / (||v0|| ||v1||)`` over the whole tensor (a norm at most ``eps`` is taken as 1),

``slerp(t) = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1``,

and when the tensors are nearly colinear (``|cos(theta)| > dot_threshold``, default 0.9995) the linear
interpolation ``(1 - t) v0 + t v1``. ``t`` is per tensor (a gradient over blocks or filters, see
:mod:`.gradients`): ``t = 0`` gives the base, ``t = 1`` the other model.

In task-vector form (``delta = v1 - v0``) the merged task vector is ``(s0 + s1 - 1) v0 + s1 delta``; the
driver supplies the tensor's Gram matrix (``inputs=("gram", "base")``) so that the angle is the whole
tensor's even when it is streamed in chunks.
"""

from __future__ import annotations

import math

import torch

from ...errors import ParameterError
from .registry import REQUIRED, Param, register_merge_method

__all__ = ["slerp", "slerp_coefficients"]


def slerp_coefficients(
    gram: torch.Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """``(s0, s1)`` with ``slerp(t) = s0 v0 + s1 v1`` from the Gram matrix of ``[v0, v1 - v0]`` (2, 2)."""
    g = gram.double()
    g00, g0d, gdd = float(g[0, 0]), float(g[0, 1]), float(g[1, 1])
    n0 = math.sqrt(max(g00, 0.0))
    n1 = math.sqrt(max(g00 + 2 * g0d + gdd, 0.0))  # ||v0 + delta||
    dot = (g00 + g0d) / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _two_models(glob, per_model) -> None:
    if len(per_model) != 1:
        raise ParameterError(
            f"slerp interpolates between base_model and exactly one other model, got {len(per_model)} "
            "models besides the base"
        )


@register_merge_method(
    "slerp",
    params=[
        Param("t", REQUIRED, low=0.0, high=1.0, doc="interpolation factor: 0 = base model, 1 = the other"),
        Param("dot_threshold", 0.9995, low=0.0, high=1.0, doc="|cos| above which lerp is used (colinear)"),
        Param("eps", 1e-8, low=0.0, doc="norms at most eps are not normalised"),
    ],
    inputs=("gram", "base"),
    reference="https://doi.org/10.1145/325165.325242",
    description="SLERP between the base and one model, per tensor (lerp when colinear)",
    validate=_two_models,
)
def slerp(
    deltas: torch.Tensor,
    *,
    t: float,
    dot_threshold: float,
    eps: float,
    gram: torch.Tensor,
    base: torch.Tensor,
) -> torch.Tensor:
    """``deltas`` (1, n), ``base`` (n,), ``gram`` (2, 2) over the whole tensor -> ``slerp(t) - v0`` (n,)."""
    s0, s1 = slerp_coefficients(gram, t, dot_threshold, eps)
    return torch.mul(deltas[0], s1).add_(base, alpha=s0 + s1 - 1.0)  # one new tensor, two passes
