"""Whole-tensor geometry for the sphere methods (``multislerp``, ``karcher``) from a Gram matrix.

The driver gives a method the Gram matrix ``G0`` (T + 1, T + 1) of ``[base, delta_1, ..., delta_T]`` over a
whole tensor. The points a method averages are fixed linear combinations of these rows, ``X = M @ [base;
deltas]``, so every norm and angle it needs is a quadratic form in ``M G0 M^T`` and its result is again a
combination ``c^T X``: the method works on coefficient vectors (float64) and the merged chunk is formed
once, so tensors of any size stream in chunks.
"""

from __future__ import annotations

import torch

__all__ = ["point_map", "from_points"]


def point_map(t: int, base_given: bool, include_base: bool) -> torch.Tensor:
    """``M`` (P, T + 1): the points as combinations of ``[base, delta_1, ..., delta_T]``.

    With a base: the task vectors (``include_base`` False) or the base and the models (``include_base``
    True). Without one the driver's reference is the first model (its delta is 0) and the points are the
    models ``base + delta_t``.
    """
    eye = torch.eye(t, dtype=torch.float64)
    if base_given and not include_base:
        return torch.cat([torch.zeros(t, 1, dtype=torch.float64), eye], dim=1)
    models = torch.cat([torch.ones(t, 1, dtype=torch.float64), eye], dim=1)
    if base_given:
        first = torch.zeros(1, t + 1, dtype=torch.float64)
        first[0, 0] = 1.0
        return torch.cat([first, models])
    return models


def from_points(
    coef: torch.Tensor,
    m: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    base_given: bool,
    include_base: bool,
) -> torch.Tensor:
    """The merged task vector (n,) of the point ``coef^T X`` (``coef``: (P,)), i.e. ``coef^T X - base``,
    except that points that are task vectors (a base given, ``include_base`` False) are returned as they
    are (the result is itself a task vector)."""
    src = coef.double() @ m  # (T + 1,): coefficients of [base, deltas]
    shift = 0.0 if (base_given and not include_base) else 1.0
    out = src[1:].to(deltas.dtype).to(deltas.device) @ deltas
    b = float(src[0]) - shift
    return out if b == 0 else out + b * base
