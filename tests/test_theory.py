"""Mean-field map: closed forms against independent numerical roots, finite differences and iteration."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import optimize

from layerwise.hierarchy.theory import (
    correlation_exponent,
    critical_noise,
    critical_point,
    fixed_points,
    has_transition,
    level_curves,
    mean_field,
    mean_field_map,
    mean_field_slope,
)

WITH_TRANSITION_S2 = [(32, 8), (16, 4), (8, 2), (64, 8), (10, 3), (20, 6)]


def brentq_root(v: int, m: int, s: int) -> float:
    """Independent numerical root of F(p) - p strictly between the trivial fixed points."""
    return optimize.brentq(lambda p: mean_field_map(p, v, m, s) - p, 1 / v + 1e-9, 1 - 1e-9, xtol=1e-15)


@pytest.mark.parametrize(("v", "m"), WITH_TRANSITION_S2)
def test_s2_closed_form_matches_numerical_root(v, m):
    assert has_transition(v, m, 2)
    p_star = critical_point(v, m, 2)
    assert p_star == pytest.approx((m - 1) / (v - m), abs=0)
    assert p_star == pytest.approx(brentq_root(v, m, 2), abs=1e-12)
    # The polynomial route (numpy.roots), used for s > 2, agrees too.
    inner = [p for p in fixed_points(v, m, 2) if 1 / v < p < 1]
    assert inner == pytest.approx([p_star], abs=1e-10)
    assert critical_noise(v, m, 2) == pytest.approx(v * (v - 2 * m + 1) / ((v - 1) * (v - m)), rel=1e-13)


@pytest.mark.parametrize(("v", "m", "s"), [(16, 4, 3), (32, 8, 3), (8, 4, 4), (12, 3, 3), (16, 8, 4)])
def test_general_s_root_matches_brentq(v, m, s):
    assert has_transition(v, m, s)
    p_star = critical_point(v, m, s)
    assert p_star == pytest.approx(brentq_root(v, m, s), abs=1e-10)
    assert mean_field_map(p_star, v, m, s) == pytest.approx(p_star, abs=1e-12)
    assert mean_field_slope(p_star, v, m, s) > 1  # unstable


@pytest.mark.parametrize(("v", "m", "s"), [(32, 8, 2), (8, 2, 3), (16, 4, 3), (5, 5, 2)])
def test_trivial_fixed_points_and_slopes(v, m, s):
    assert mean_field_map(1 / v, v, m, s) == pytest.approx(1 / v, rel=1e-13)
    assert mean_field_map(1.0, v, m, s) == pytest.approx(1.0, rel=1e-13)
    points = fixed_points(v, m, s)
    assert points[0] == pytest.approx(1 / v) and points[-1] == 1.0
    # F'(1) = s m (v - 1) / (v**s - 1) (design formula), F'(1/v) -> s/m up to O(1/v**(s-1)).
    assert mean_field_slope(1.0, v, m, s) == pytest.approx(s * m * (v - 1) / (v**s - 1), rel=1e-12)
    c, f = (m - 1) / (v**s - 1), (m * v - 1) / (v**s - 1)
    assert mean_field_slope(1 / v, v, m, s) == pytest.approx(s * ((1 - c) - (1 - f) / v) / m, rel=1e-12)


def test_slope_matches_finite_differences():
    p = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    for v, m, s in [(32, 8, 2), (16, 4, 3), (8, 2, 3)]:
        h = 1e-6
        fd = (mean_field_map(p + h, v, m, s) - mean_field_map(p - h, v, m, s)) / (2 * h)
        torch.testing.assert_close(mean_field_slope(p, v, m, s), fd, rtol=1e-7, atol=1e-9)


def test_reported_numbers_v32_m8_s2():
    """Design facts: eps* ≈ 0.7312, F'(p*) ≈ 1.442; and the example of the PNAS paper, where exact BP at
    L = 9 keeps the class with ≈ 0.86 at eps = 0.70 and ≈ 0.05 at eps = 0.75 (mean field gives p_0)."""
    info = mean_field(32, 8, 2)
    assert info.eps_star == pytest.approx(0.7312, abs=5e-5)
    assert info.slope_at_critical == pytest.approx(1.442, abs=5e-4)
    assert info.nu == pytest.approx(math.log(2) / math.log(info.slope_at_critical), rel=1e-14)
    p0 = level_curves(torch.tensor([0.70, 0.75]), 32, 8, 2, 9)[:, 0]
    assert p0[0] == pytest.approx(0.86, abs=0.01) and p0[1] == pytest.approx(0.05, abs=0.01)


def test_no_transition_example():
    """v=8, m=2, s=3: 1/v is unstable (F'(1/v) ≈ s/m > 1), so there is no transition."""
    assert not has_transition(8, 2, 3)
    info = mean_field(8, 2, 3)
    assert info.slope_at_uniform > 1 and info.p_star is None and info.nu is None
    with pytest.raises(ValueError, match="no phase transition"):
        critical_noise(8, 2, 3)


def test_level_curves_iterate_the_map():
    eps = torch.tensor([[0.1, 0.5], [0.7, 0.9]], dtype=torch.float64)
    curves = level_curves(eps, 32, 8, 2, 6)
    assert curves.shape == (2, 2, 7)
    torch.testing.assert_close(curves[..., 6], 1 - eps + eps / 32)
    for lev in range(6):
        torch.testing.assert_close(curves[..., lev], mean_field_map(curves[..., lev + 1], 32, 8, 2))
    assert level_curves(0.3, 32, 8, 2, 1).shape == (2,)


def test_phase_transition_sharpens_with_depth():
    """Below eps* the class is kept (p_0 -> 1), above it is lost (p_0 -> 1/v), at eps* p_0 = p*."""
    v, m, s = 32, 8, 2
    eps_star = critical_noise(v, m, s)
    below, above = level_curves(torch.tensor([eps_star - 0.02, eps_star + 0.02]), v, m, s, 60)[:, 0]
    assert below > 0.99 and above < 1 / v + 1e-3
    # At eps* p_L = p*, a fixed point; unstable, so round-off grows like F'(p*)**L: keep L moderate.
    at = level_curves(eps_star, v, m, s, 20)
    torch.testing.assert_close(at, torch.full((21,), critical_point(v, m, s), dtype=torch.float64))


def test_nu_gives_the_divergence_of_the_number_of_levels():
    """Levels needed to leave the neighbourhood of p* grow like ln(1/|eps - eps*|) / ln F'(p*), i.e.
    xi = s**levels ~ |eps - eps*|**(-nu)."""
    v, m, s = 32, 8, 2
    eps_star, nu = critical_noise(v, m, s), correlation_exponent(v, m, s)
    p_star = critical_point(v, m, s)

    def levels_to_escape(delta: float) -> int:
        p = 1 - (eps_star - delta) * (1 - 1 / v)
        for k in range(1, 10_000):
            p = mean_field_map(p, v, m, s)
            if abs(p - p_star) > 0.05:
                return k
        raise AssertionError("never escaped")

    gap = levels_to_escape(1e-10) - levels_to_escape(1e-4)
    assert gap * math.log(s) == pytest.approx(nu * math.log(1e6), abs=1.5 * math.log(s))


def test_validation():
    with pytest.raises(ValueError, match="m \\* v must be <= v\\*\\*s"):
        mean_field(4, 5, 2)
    with pytest.raises(ValueError, match="v must be in"):
        mean_field(1, 1, 2)
    with pytest.raises(ValueError, match="eps"):
        level_curves(1.5, 32, 8, 2, 3)
    with pytest.raises(ValueError, match="eps"):
        level_curves(torch.tensor([0.2, -0.1]), 32, 8, 2, 3)
    with pytest.raises(ValueError, match="L must be in"):
        level_curves(0.5, 32, 8, 2, 0)
