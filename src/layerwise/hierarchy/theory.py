"""Mean-field theory of the forward-backward phase transition on the RHM.

Sclocchi, Favero, Wyart, "A phase transition in diffusion models reveals the hierarchical nature of data",
PNAS 122 (2025). Under the eps-process a leaf keeps its token with probability ``p_L = 1 - eps + eps/v``;
in an annealed mean-field approximation the probability that a level-``l`` symbol is reconstructed obeys

    p_{l-1} = F(p_l),   F(p) = (p**s + c (1 - p**s)) / (p**s + f (1 - p**s)),
    c = (m - 1) / (v**s - 1),   f = (m v - 1) / (v**s - 1),

and P(class kept) ~ p_0 for large L. ``F`` has the fixed points ``1/v`` (nothing known) and ``1`` (all
known); when both are stable (``F'(1) = s m (v - 1) / (v**s - 1) < 1`` and ``F'(1/v) < 1``) an unstable
fixed point ``p*`` lies between them, and the class is reconstructed iff ``p_L > p*``: the threshold is
``eps* = (1 - p*) / (1 - 1/v)``. For ``s = 2``: ``p* = (m - 1) / (v - m)`` and
``eps* = v (v - 2m + 1) / ((v - 1)(v - m))``. Near ``eps*`` the correlation length diverges as
``|eps - eps*|**(-nu)`` with ``nu = ln s / ln F'(p*)``.

(The map is the project's annealed derivation; it reproduces the numbers reported from the paper's
equations, e.g. ``eps* ≈ 0.7312`` and ``F'(p*) ≈ 1.442`` for ``v=32, m=8, s=2``.)

Example
-------
>>> info = mean_field(v=32, m=8, s=2)
>>> round(info.eps_star, 4), round(info.slope_at_critical, 3)
(0.7312, 1.442)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .._validation import check_float, check_int
from ..errors import ParameterError

__all__ = [
    "MeanField",
    "mean_field",
    "map_coefficients",
    "mean_field_map",
    "mean_field_slope",
    "fixed_points",
    "has_transition",
    "critical_point",
    "critical_noise",
    "correlation_exponent",
    "level_curves",
]

# Roots of the fixed-point polynomial closer than this to the real axis / to [1/v, 1] count as real / inside.
_ROOT_TOL = 1e-7


def _check(v: int, m: int, s: int) -> tuple[int, int, int]:
    v = check_int("v", v, low=2)
    m = check_int("m", m, low=1)
    s = check_int("s", s, low=2)
    if m * v > v**s:
        raise ParameterError(f"m * v must be <= v**s = {v**s} (rules without replacement), got m={m}, v={v}")
    return v, m, s


def map_coefficients(v: int, m: int, s: int) -> tuple[float, float]:
    """``(c, f) = ((m - 1) / (v**s - 1), (m v - 1) / (v**s - 1))``, the coefficients of the map ``F``."""
    v, m, s = _check(v, m, s)
    return (m - 1) / (v**s - 1), (m * v - 1) / (v**s - 1)


def mean_field_map(p: float | torch.Tensor, v: int, m: int, s: int) -> float | torch.Tensor:
    """``F(p) = (p**s + c (1 - p**s)) / (p**s + f (1 - p**s))``; ``p`` a float or a tensor in [0, 1]."""
    c, f = map_coefficients(v, m, s)
    q = p**s
    return (q + c * (1 - q)) / (q + f * (1 - q))


def mean_field_slope(p: float | torch.Tensor, v: int, m: int, s: int) -> float | torch.Tensor:
    """``F'(p)``: with ``q = p**s``, ``N = q + c(1-q)``, ``D = q + f(1-q)``,
    ``F' = s p**(s-1) ((1-c) D - (1-f) N) / D**2``."""
    c, f = map_coefficients(v, m, s)
    q = p**s
    num, den = q + c * (1 - q), q + f * (1 - q)
    return s * p ** (s - 1) * ((1 - c) * den - (1 - f) * num) / den**2


def fixed_points(v: int, m: int, s: int) -> list[float]:
    """All fixed points of ``F`` in ``[1/v, 1]``, ascending (always includes ``1/v`` and ``1``).

    ``F(p) = p`` iff ``G(p) = -(1-f) p**(s+1) + (1-c) p**s - f p + c = 0``, a polynomial of degree
    ``s + 1``; its real roots in ``[1/v, 1]`` are found with ``numpy.roots`` (torch has no polynomial
    root finder).
    """
    v, m, s = _check(v, m, s)
    c, f = map_coefficients(v, m, s)
    coeffs = np.zeros(s + 2)
    coeffs[0], coeffs[1], coeffs[s], coeffs[s + 1] = -(1 - f), 1 - c, -f, c  # highest degree first
    roots = np.roots(coeffs)
    real = sorted(float(r.real) for r in roots if abs(r.imag) < _ROOT_TOL)
    # Snap the known roots 1/v and 1 (numerically perturbed) and keep the ones strictly between.
    inner = [r for r in real if 1 / v + _ROOT_TOL < r < 1 - _ROOT_TOL]
    points = [1 / v]
    for r in inner:
        if r - points[-1] > _ROOT_TOL:
            points.append(r)
    return [*points, 1.0]


def _exact_slope(p: Fraction, v: int, m: int, s: int) -> Fraction:
    """``F'(p)`` in exact rational arithmetic (same formula as :func:`mean_field_slope`)."""
    c, f = Fraction(m - 1, v**s - 1), Fraction(m * v - 1, v**s - 1)
    q = p**s
    num, den = q + c * (1 - q), q + f * (1 - q)
    return s * p ** (s - 1) * ((1 - c) * den - (1 - f) * num) / den**2


def has_transition(v: int, m: int, s: int) -> bool:
    """True iff both trivial fixed points are stable (``F'(1) < 1`` and ``F'(1/v) < 1``), so an unstable
    fixed point ``p*`` separates reconstruction from its loss.

    Decided in exact rational arithmetic: at degenerate parameters where ``F'(1) = 1`` exactly (e.g.
    ``v=13, m=61, s=3``: ``s m (v-1) = v**s - 1``) floats could land on either side of 1."""
    v, m, s = _check(v, m, s)
    return _exact_slope(Fraction(1), v, m, s) < 1 and _exact_slope(Fraction(1, v), v, m, s) < 1


def critical_point(v: int, m: int, s: int) -> float:
    """The unstable fixed point ``p*`` of ``F`` (closed form ``(m - 1)/(v - m)`` for ``s = 2``).

    Raises ValueError when there is no transition (see :func:`has_transition`).
    """
    v, m, s = _check(v, m, s)
    if not has_transition(v, m, s):
        at_one, at_uniform = mean_field_slope(1.0, v, m, s), mean_field_slope(1 / v, v, m, s)
        raise ParameterError(
            f"no phase transition for v={v}, m={m}, s={s}: needs F'(1) = {at_one:.4g} < 1 "
            f"and F'(1/v) = {at_uniform:.4g} < 1"
        )
    if s == 2:
        return (m - 1) / (v - m)
    inner = [p for p in fixed_points(v, m, s) if 1 / v + _ROOT_TOL < p < 1 - _ROOT_TOL]
    unstable = [p for p in inner if mean_field_slope(p, v, m, s) > 1]
    if len(unstable) != 1:  # not expected for this map; say so rather than guess
        raise ParameterError(
            f"expected one unstable fixed point in (1/v, 1), found {unstable} (v={v}, m={m}, s={s})"
        )
    return unstable[0]


def critical_noise(v: int, m: int, s: int) -> float:
    """``eps* = (1 - p*) / (1 - 1/v)``, where ``p_L = 1 - eps + eps/v`` meets ``p*``.

    For ``s = 2``: ``v (v - 2m + 1) / ((v - 1)(v - m))``.
    """
    p_star = critical_point(v, m, s)
    return (1 - p_star) / (1 - 1 / v)


def correlation_exponent(v: int, m: int, s: int) -> float:
    """``nu = ln s / ln F'(p*)``: the correlation length diverges as ``|eps - eps*|**(-nu)``."""
    p_star = critical_point(v, m, s)
    return math.log(s) / math.log(mean_field_slope(p_star, v, m, s))


@dataclass(frozen=True)
class MeanField:
    """Mean-field summary of an RHM's transition (see :func:`mean_field`)."""

    v: int
    m: int
    s: int
    c: float
    f: float
    slope_at_one: float
    slope_at_uniform: float
    has_transition: bool
    p_star: float | None
    eps_star: float | None
    slope_at_critical: float | None
    nu: float | None


def mean_field(v: int, m: int, s: int) -> MeanField:
    """All mean-field quantities at once; transition-dependent fields are None when there is none."""
    v, m, s = _check(v, m, s)
    c, f = map_coefficients(v, m, s)
    exists = has_transition(v, m, s)
    p_star = critical_point(v, m, s) if exists else None
    return MeanField(
        v=v,
        m=m,
        s=s,
        c=c,
        f=f,
        slope_at_one=float(mean_field_slope(1.0, v, m, s)),
        slope_at_uniform=float(mean_field_slope(1 / v, v, m, s)),
        has_transition=exists,
        p_star=p_star,
        eps_star=critical_noise(v, m, s) if exists else None,
        slope_at_critical=float(mean_field_slope(p_star, v, m, s)) if exists else None,
        nu=correlation_exponent(v, m, s) if exists else None,
    )


def level_curves(eps: float | torch.Tensor, v: int, m: int, s: int, L: int) -> torch.Tensor:
    """Mean-field reconstruction probabilities ``p_l`` at every level for noise levels ``eps``.

    Parameters
    ----------
    eps : a float or a tensor of noise levels in [0, 1] (any shape ``S``).
    v, m, s : RHM parameters; L : depth (>= 1).

    Returns
    -------
    (*S, L + 1) float64 -- ``[..., l] = p_l``: ``p_L = 1 - eps + eps/v``, ``p_{l-1} = F(p_l)``;
    ``[..., 0]`` approximates P(class kept).
    """
    v, m, s = _check(v, m, s)
    L = check_int("L", L, low=1)
    eps_t = torch.as_tensor(eps, dtype=torch.float64)
    if eps_t.numel() == 1 and eps_t.dim() == 0:
        check_float("eps", float(eps_t), low=0.0, high=1.0)
    elif eps_t.numel() and not bool(((eps_t >= 0) & (eps_t <= 1)).all()):
        raise ParameterError(
            f"eps must be in [0, 1], got values in [{float(eps_t.min())}, {float(eps_t.max())}]"
        )
    levels = [1 - eps_t + eps_t / v]  # p_L
    for _ in range(L):
        levels.append(mean_field_map(levels[-1], v, m, s))
    return torch.stack(levels[::-1], dim=-1)  # (*S, L + 1), index l = level l
