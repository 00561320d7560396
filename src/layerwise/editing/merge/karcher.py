"""Karcher mean (mergekit's ``karcher``; the Riemannian centre of mass, H. Karcher, "Riemannian center of
mass and mollifier smoothing", Comm. Pure Appl. Math. 30, 1977, https://doi.org/10.1002/cpa.3160300502):
average the directions of the tensors on the unit sphere, and their norms arithmetically.

Per tensor, over the points ``x_i`` (the base model, when given, and every model, as mergekit averages all
its inputs), with equal weights ``alpha_i = 1 / P``: norms ``n_i``, unit vectors ``u_i = x_i / n_i`` (points
with ``n_i <= tol`` are left out of the direction and their weights renormalised),

- start from ``mu = normalise(sum_i alpha_i u_i)`` (the first unit vector if that sum is shorter than tol);
- repeat up to ``max_iter`` times: ``theta_i = arccos(<mu, u_i>)``; the Riemannian gradient
  ``g = sum_i alpha_i theta_i / sin(theta_i) (u_i - <mu, u_i> mu)`` (terms with ``theta_i < tol`` skipped);
  stop when ``||g|| < tol``; else step along the geodesic ``mu <- cos(||g||) mu + sin(||g||) g / ||g||``
  and renormalise;
- the result is ``(sum_i alpha_i n_i) mu``.

The iteration runs on the Gram matrix of the points (:mod:`._sphere`), so tensors stream in chunks.
"""

from __future__ import annotations

import math

import torch

from ...errors import ParameterError
from ._sphere import from_points, point_map
from .registry import Param, register_merge_method

__all__ = ["karcher", "karcher_coefficients"]


def karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients ``c`` (P,) of the Karcher mean ``c^T X`` from the points' Gram matrix ``g`` (P, P)."""
    p = g.shape[0]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(p)]
    alphas = [1.0 / p] * p
    units = []
    for i in range(p):
        e = torch.zeros(p, dtype=torch.float64)
        if norms[i] != 0.0:
            e[i] = 1.0 / norms[i]
        units.append(e)
    valid = [i for i in range(p) if norms[i] > tol]
    if not valid:
        return torch.zeros(p, dtype=torch.float64)
    total = sum(alphas[i] for i in valid)
    alpha = {i: alphas[i] / total for i in valid}

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ g @ c), 0.0))

    mean = sum(alpha[i] * units[i] for i in valid)
    mn = norm(mean)
    mean = units[valid[0]].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros(p, dtype=torch.float64)
        for i in valid:
            dot = min(1.0, max(-1.0, float(mean @ g @ units[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent = tangent + alpha[i] * (theta / math.sin(theta)) * (units[i] - dot * mean)
        tn = norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = norm(mean)
        if un > tol:
            mean = mean / un
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


def _integer_iterations(glob, per_model) -> None:
    if glob["max_iter"] != int(glob["max_iter"]):
        raise ParameterError(f"parameters.max_iter must be an integer, got {glob['max_iter']}")


@register_merge_method(
    "karcher",
    params=[
        Param("max_iter", 10.0, low=0.0, high=10_000.0, doc="most Riemannian gradient steps (an integer)"),
        Param("tol", 1e-5, low=0.0, doc="convergence and zero-norm tolerance"),
    ],
    inputs=("gram", "base", "base_given"),
    needs_base=False,
    reference="https://doi.org/10.1002/cpa.3160300502",
    description="Karcher mean: Riemannian mean of the directions, mean of the norms (base optional)",
    validate=_integer_iterations,
)
def karcher(
    deltas: torch.Tensor,
    *,
    max_iter: float,
    tol: float,
    gram: torch.Tensor,
    base: torch.Tensor,
    base_given: bool,
) -> torch.Tensor:
    """``deltas`` (T, n), ``gram`` (T + 1, T + 1) of [base, deltas] over the whole tensor -> task vector."""
    m = point_map(deltas.shape[0], base_given, include_base=True)
    if m.shape[0] == 1:  # one point: itself
        return torch.zeros_like(base)
    coef = karcher_coefficients(m @ gram.double().cpu() @ m.T, int(max_iter), tol)
    return from_points(coef, m, base, deltas, base_given, include_base=True)
