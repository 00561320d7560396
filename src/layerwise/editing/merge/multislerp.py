"""Multi-SLERP (mergekit's ``multislerp``, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
barycentric interpolation of several tensors on a hypersphere.

Per tensor, with the points ``x_t`` (the task vectors ``theta_t - theta_0`` when a base model is given,
else the models' tensors), weights ``w_t`` (divided by their sum with ``normalize_weights``), norms
``n_t = ||x_t||`` and unit vectors ``u_t = x_t / (n_t + eps)``:

1. ``m = sum_t w_t u_t``, ``m_hat = m / ||m||`` (the weighted Euclidean mean, on the sphere);
2. tangent vectors at ``m_hat``: ``v_t = u_t - <u_t, m_hat> m_hat``; ``v = sum_t w_t v_t``;
3. exponential map back: ``r = cos(tau) m_hat + sin(tau) / tau * v`` with ``tau = ||v|| + eps``;
4. the result is ``(sum_t w_t n_t) r`` (plus the base when one is given).

One model is returned as it is. When ``||m|| < eps`` (antipodal points whose weights cancel) two models
fall back to ``w_0 x_0 + w_1 x_1``, more raise :class:`~layerwise.errors.ParameterError`; when every point
is 0 (a tensor that no model changed) the result is 0, where mergekit 0.1.5 raises for three models or
more. All of it runs on
the tensor's Gram matrix (:mod:`._sphere`), so tensors stream in chunks.
"""

from __future__ import annotations

import math

import torch

from ...errors import ParameterError
from ._common import WEIGHT
from ._sphere import from_points, point_map
from .registry import Param, register_merge_method

__all__ = ["multislerp", "multislerp_coefficients"]


def multislerp_coefficients(g: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Coefficients ``c`` (T,) of the result ``c^T X`` from the points' Gram matrix ``g`` (T, T) and the
    (already normalised) weights ``w`` (T,), float64."""
    norms = g.diagonal().clamp(min=0).sqrt()
    if eps == 0 and bool((norms == 0).any()) and bool((norms > 0).any()):
        # a zero tensor has no unit direction: with eps 0 it would become NaN (mergekit writes NaN here)
        raise ParameterError(
            "multislerp: eps is 0 and a model's tensor is all zeros; use eps > 0 (default 1e-8)"
        )
    inv = 1.0 / (norms + eps)  # u_t = inv_t x_t

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ g @ c), 0.0))

    a = w * inv  # m = sum_t w_t u_t
    if not bool((norms > 0).any()):
        return torch.zeros_like(w)  # every point is 0 (e.g. a tensor no model changed): the result is 0
    m_norm = norm(a)
    if m_norm < eps:
        if len(w) == 2:
            return w.clone()
        raise ParameterError(
            "multislerp: the weighted mean of the unit tensors is zero (antipodal tensors whose weights "
            "cancel); use other weights"
        )
    m_hat = a / m_norm
    dots = (g @ m_hat) * inv  # <u_t, m_hat>
    v = a - float(w @ dots) * m_hat  # sum_t w_t (u_t - <u_t, m_hat> m_hat)
    tau = norm(v) + eps
    sinc = math.sin(tau) / tau if tau > 0 else 1.0  # tau = 0 only with eps 0 and equal directions: the limit
    r = math.cos(tau) * m_hat + sinc * v
    return float(w @ norms) * r


def _at_least_one(glob, per_model) -> None:
    if glob["normalize_weights"]:
        total = sum(mp["weight"] for mp in per_model)
        if total == 0:
            raise ParameterError(
                f"multislerp: the weights sum to 0 ({[mp['weight'] for mp in per_model]}); with "
                "normalize_weights they are divided by their sum"
            )


@register_merge_method(
    "multislerp",
    params=[
        WEIGHT,
        Param("normalize_weights", True, choices=(True, False), doc="divide the weights by their sum"),
        Param("eps", 1e-8, low=0.0, doc="added to norms before dividing by them"),
    ],
    inputs=("gram", "base", "base_given"),
    needs_base=False,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    description="Multi-SLERP: weighted barycentric interpolation on the hypersphere (base optional)",
    validate=_at_least_one,
)
def multislerp(
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    normalize_weights: bool,
    eps: float,
    gram: torch.Tensor,
    base: torch.Tensor,
    base_given: bool,
) -> torch.Tensor:
    """``deltas`` (T, n), ``gram`` (T + 1, T + 1) of [base, deltas] over the whole tensor -> task vector."""
    t = deltas.shape[0]
    if t == 1:  # one model: returned as it is
        return deltas[0] if base_given else torch.zeros_like(base)
    m = point_map(t, base_given, include_base=False)
    g = m @ gram.double().cpu() @ m.T  # small (T, T) geometry on the CPU, in float64
    w = weight.double().cpu()
    if normalize_weights:
        w = w / w.sum()
    coef = multislerp_coefficients(g, w, eps)
    return from_points(coef, m, base, deltas, base_given, include_base=False)
