"""Maximum-entropy fields: mode variances, border, injectivity scale, displacement formulas, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.diffeo import (
    centre_displacement_rms,
    estimate_typical_displacement,
    fields_from_coefficients,
    mode_mask,
    sample_coefficients,
    sample_fields,
    temperature_for_displacement,
    temperature_range,
    typical_displacement,
)
from layerwise.errors import ParameterError, ParameterTypeError


def _project(fields: torch.Tensor, modes: int) -> torch.Tensor:
    """Sine coefficients of pixel fields (n, 2, H, W) on x_p = p/(n-1), by the discrete sine transform.

    sum_{p=1}^{n-2} sin(i pi p/(n-1)) sin(k pi p/(n-1)) = (n-1)/2 delta_ik for 1 <= i, k <= n-2, so the
    projection is exact for the modes kept here. Returns (n, 2, modes, modes) in units of the side.
    """
    _, _, h, w = fields.shape
    tau = fields / torch.tensor([w, h], dtype=fields.dtype).reshape(1, 2, 1, 1)
    k = torch.arange(1, modes + 1, dtype=torch.float64)
    su = torch.sin(math.pi * torch.arange(w, dtype=torch.float64)[:, None] / (w - 1) * k) * 2 / (w - 1)
    sv = torch.sin(math.pi * torch.arange(h, dtype=torch.float64)[:, None] / (h - 1) * k) * 2 / (h - 1)
    return torch.einsum("bayx,xi,yj->baij", tau, su, sv)


def test_mode_mask_is_the_disk_rule():
    for c in (1, 2, 3, 5, 15):
        mask = mode_mask(c)
        for i in range(1, c + 1):
            for j in range(1, c + 1):
                assert bool(mask[i - 1, j - 1]) == (math.hypot(i, j) < c + 0.5)
    # c = 3 keeps (3, 1) and (1, 3) (the i^2 + j^2 <= c^2 rule would drop them) and drops (3, 2).
    assert mode_mask(3)[2, 0] and not mode_mask(3)[2, 1]


def test_per_mode_variance_is_T_over_i2_plus_j2():
    """Project 2 x 3000 sampled fields back onto the sine modes; each mode's variance must be
    T / (i^2 + j^2) (chi-square: z-score of the sample variance within 4.5 for every mode), dropped modes
    must vanish, and distinct modes must be uncorrelated."""
    c, T, n, size = 5, 3e-3, 3000, 20
    fields = sample_fields(n, size, size + 4, c, T, seed=11, dtype=torch.float64)  # rectangular on purpose
    coef = _project(fields, size - 2)  # (n, 2, 18, 18)
    samples = coef.permute(1, 0, 2, 3).reshape(2 * n, size - 2, size - 2)  # both components pooled
    mask = mode_mask(c)
    m = 2 * n
    for i in range(1, size - 1):
        for j in range(1, size - 1):
            x = samples[:, i - 1, j - 1]
            if i <= c and j <= c and mask[i - 1, j - 1]:
                expected = T / (i * i + j * j)
                var = float((x**2).mean())  # known zero mean: m degrees of freedom
                z = (var / expected - 1) / math.sqrt(2 / m)
                assert abs(z) < 4.5, (i, j, var, expected)
            else:
                assert float(x.abs().max()) < 1e-12, (i, j)
    # Uncorrelated modes: correlation of (1, 1) with (1, 2) and (2, 1) ~ N(0, 1/m).
    a, b, d = samples[:, 0, 0], samples[:, 0, 1], samples[:, 1, 0]
    for other in (b, d):
        corr = float((a * other).mean() / (a.std() * other.std()))
        assert abs(corr) < 4.5 / math.sqrt(m)
    # The two components are independent too.
    u0, v0 = coef[:, 0, 0, 0], coef[:, 1, 0, 0]
    corr = float((u0 * v0).mean() / (u0.std() * v0.std()))
    assert abs(corr) < 4.5 / math.sqrt(n)


def test_per_image_temperatures_scale_each_field():
    T = torch.tensor([1e-3, 4e-3, 0.0])
    coef = sample_coefficients(3, 4, T, seed=5)
    ref = sample_coefficients(3, 4, 1.0, seed=5)  # same normal draws at T = 1
    assert torch.allclose(coef, ref * T.double().sqrt().reshape(3, 1, 1, 1), atol=1e-15)
    with pytest.raises(ParameterError, match="T"):
        sample_coefficients(3, 4, torch.tensor([1e-3, 2e-3]), seed=0)


def test_field_vanishes_on_the_border():
    fields = sample_fields(50, 17, 23, c=7, T=5e-3, seed=0, dtype=torch.float64)
    assert float(fields.abs().max()) > 0.1  # a real field, not zeros
    for border in (fields[..., 0, :], fields[..., -1, :], fields[..., :, 0], fields[..., :, -1]):
        assert float(border.abs().max()) < 1e-12


def test_pixel_units_follow_the_side_length():
    coef = sample_coefficients(4, 3, 1e-3, seed=2)
    small = fields_from_coefficients(coef, 9, 9)
    big = fields_from_coefficients(coef, 17, 17)
    # Same unit-square field sampled at u = p / (n-1): the centre pixel (u = 1/2) scales like n.
    assert torch.allclose(big[..., 8, 8] / 17, small[..., 4, 4] / 9, atol=1e-14)
    rect = fields_from_coefficients(coef, 9, 17)
    assert torch.allclose(rect[:, 0, 4, 8] / 17, small[:, 0, 4, 4] / 9, atol=1e-14)  # horizontal: x W
    assert torch.allclose(rect[:, 1, 4, 8] / 9, small[:, 1, 4, 4] / 9, atol=1e-14)  # vertical: x H


def test_batched_fields_equal_one_at_a_time():
    coef = sample_coefficients(6, 5, 2e-3, seed=3)
    batched = fields_from_coefficients(coef, 12, 15)
    for b in range(6):
        single = fields_from_coefficients(coef[b:b + 1], 12, 15)
        assert torch.allclose(batched[b:b + 1], single, atol=1e-12, rtol=0)
    # And against a direct double sum written mode by mode.
    u = torch.linspace(0, 1, 15, dtype=torch.float64)
    v = torch.linspace(0, 1, 12, dtype=torch.float64)
    direct = torch.zeros(2, 12, 15, dtype=torch.float64)
    for i in range(1, 6):
        for j in range(1, 6):
            direct += coef[0, :, i - 1, j - 1, None, None] * torch.outer(torch.sin(j * math.pi * v),
                                                                        torch.sin(i * math.pi * u))
    direct *= torch.tensor([15.0, 12.0]).reshape(2, 1, 1).double()
    assert torch.allclose(batched[0], direct, atol=1e-12)


def test_seed_reproducible_and_dtype_device():
    a = sample_fields(3, 8, 8, 3, 1e-3, seed=4)
    b = sample_fields(3, 8, 8, 3, 1e-3, seed=torch.Generator().manual_seed(4))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    c = sample_fields(3, 8, 8, 3, 1e-3, seed=4, dtype=torch.float64)
    assert c.dtype == torch.float64 and torch.allclose(c.float(), a)
    assert not torch.equal(a, sample_fields(3, 8, 8, 3, 1e-3, seed=5))


def _min_jacobian(coef: torch.Tensor, n: int = 97) -> torch.Tensor:
    """min over a fine grid of det(I - grad tau) of the sampling map p -> p - tau(p), per draw."""
    m = coef.shape[-1]
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    k = torch.arange(1, m + 1, dtype=torch.float64)
    s = torch.sin(math.pi * x[:, None] * k)
    ds = math.pi * k * torch.cos(math.pi * x[:, None] * k)
    du = torch.einsum("baij,xi,yj->bayx", coef, ds, s)  # d tau_a / du
    dv = torch.einsum("baij,xi,yj->bayx", coef, s, ds)  # d tau_a / dv
    det = (1 - du[:, 0]) * (1 - dv[:, 1]) - dv[:, 0] * du[:, 1]
    return det.flatten(1).min(1).values


def test_jacobian_helper_matches_finite_differences():
    coef = sample_coefficients(1, 3, 5e-3, seed=0)
    n = 401
    f = fields_from_coefficients(coef, n, n)[0] / n  # unit-square field (2, n, n)
    h = 1.0 / (n - 1)
    du = (f[:, 1:-1, 2:] - f[:, 1:-1, :-2]) / (2 * h)
    dv = (f[:, 2:, 1:-1] - f[:, :-2, 1:-1]) / (2 * h)
    det_fd = ((1 - du[0]) * (1 - dv[1]) - dv[0] * du[1]).min()
    assert abs(float(det_fd) - float(_min_jacobian(coef, n)[0])) < 1e-3


@pytest.mark.parametrize("c", [3, 5, 15])
def test_injective_well_below_T_max_and_overhangs_far_above(c):
    """T_max is where overhangs set in for *typical* fields: at T_max about a quarter of the draws already
    fold somewhere (measured: 33%, 27%, 5% for c = 3, 5, 15), so injectivity is checked at T_max / 5 (all
    300 draws have det > 0 on a 97 x 97 grid) and the scale is checked at 5 T_max (almost all fold)."""
    _, t_max = temperature_range(32, c)
    below = _min_jacobian(sample_coefficients(300, c, t_max / 5, seed=c))
    assert bool((below > 0).all()), float(below.min())
    above = _min_jacobian(sample_coefficients(100, c, 5 * t_max, seed=c + 1))
    assert float((above <= 0).double().mean()) > 0.9


def test_temperature_range_formulas():
    t_min, t_max = temperature_range(32, 5)
    assert t_min == pytest.approx(1 / (math.pi * 32**2 * math.log(5)), rel=1e-12)
    assert t_max == pytest.approx(4 / (math.pi**3 * 25 * math.log(5)), rel=1e-12)
    # T_min is half a pixel at the centre by the asymptotic formula; the inverse formula round-trips.
    assert typical_displacement(32, 5, t_min) == pytest.approx(0.5, rel=1e-12)
    assert temperature_for_displacement(32, 5, 0.5) == pytest.approx(t_min, rel=1e-12)
    with pytest.raises(ParameterError, match="c"):
        temperature_range(32, 1)


@pytest.mark.parametrize("c", [3, 5])
def test_monte_carlo_displacement_matches_the_exact_mode_sum(c):
    T = temperature_for_displacement(32, c, 1.0)
    rms, se = estimate_typical_displacement(32, c, T, n_samples=20000, seed=c)
    exact = centre_displacement_rms(32, c, T)
    assert abs(rms - exact) < 4 * se, (rms, exact, se)
    # At small c the finite sum exceeds the asymptotic formula (design note: 2.32 vs 2.04 px at c=5).
    assert exact / typical_displacement(32, c, T) == pytest.approx(
        {3: 1.2738, 5: 1.1477}[c], abs=1e-3)
    # and the Monte-Carlo evaluation at the centre agrees with the sampled pixel fields at the centre.
    fields = sample_fields(4000, 33, 33, c, T, seed=1, dtype=torch.float64)  # pixel 16 is u = 1/2
    centre = (fields[:, :, 16, 16] ** 2).sum(1).mean().sqrt() * 32 / 33
    assert abs(float(centre) - exact) < 0.06 * exact


def test_formula_is_the_large_c_limit():
    T = 1e-4
    ratio = centre_displacement_rms(64, 200, T) / typical_displacement(64, 200, T)
    assert abs(ratio - 1) < 0.05


def test_bad_input_names_the_parameter():
    with pytest.raises(ParameterError, match="T"):
        sample_fields(2, 8, 8, 3, -1e-3, seed=0)
    with pytest.raises(ParameterError, match="c"):
        sample_fields(2, 8, 8, 0, 1e-3, seed=0)
    with pytest.raises(ParameterError, match="height"):
        sample_fields(2, 1, 8, 3, 1e-3, seed=0)
    with pytest.raises(ParameterTypeError, match="n"):
        sample_fields(2.5, 8, 8, 3, 1e-3, seed=0)
    with pytest.raises(ParameterError, match="seed"):
        sample_fields(2, 8, 8, 3, 1e-3, seed=-1)
    with pytest.raises(ParameterError, match="coefficients"):
        fields_from_coefficients(torch.zeros(2, 3, 4, 4), 8, 8)
