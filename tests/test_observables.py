"""Observables of forward-backward runs, checked on synthetic change arrays with known correlations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from layerwise.hierarchy.observables import (
    ChangeStatistics,
    change_probability,
    connected_correlations,
    correlation_by_distance,
    correlation_length,
    crossing_point,
    embedding_changes,
    fit_power_law,
    level_reconstruction,
    peak_location,
    susceptibility,
    token_changes,
)


def block_flips(n_x0: int, n_traj: int, d: int, block: int, p: float, seed: int) -> torch.Tensor:
    """Changes where each block of ``block`` consecutive tokens flips together with probability p."""
    gen = torch.Generator().manual_seed(seed)
    flips = (torch.rand(n_x0, n_traj, d // block, generator=gen) < p).double()
    return flips.repeat_interleave(block, dim=2)  # (n_x0, n_traj, d)


def test_block_changes_give_closed_form_C_chi_and_C_of_r():
    d, b, p = 32, 4, 0.3
    changes = block_flips(200, 200, d, b, p, seed=0)
    C = connected_correlations(changes)
    var = p * (1 - p)
    same_block = torch.arange(d)[:, None] // b == torch.arange(d)[None, :] // b
    expected = torch.where(same_block, var, 0.0).double()
    # 40 000 Bernoulli(0.3) draws per entry: standard error ~ 0.21 / 200 ≈ 1e-3.
    assert (C - expected).abs().max() < 0.01
    assert susceptibility(C) == pytest.approx(b, rel=0.03)  # chi = block size exactly in expectation
    r, C_r = correlation_by_distance(C)
    assert torch.equal(r, torch.arange(d, dtype=torch.float64))
    # Pairs (i < j) at distance r: d - r in all, (d / b)(b - r) inside a block.
    ref = torch.tensor([var * (d / b) * max(b - k, 0) / (d - k) for k in range(d)], dtype=torch.float64)
    assert (C_r - ref).abs().max() < 0.005
    assert change_probability(changes).item() == pytest.approx(p, abs=0.01)


def test_correlations_are_taken_at_fixed_x0_not_pooled():
    # Independent tokens, but the flip probability depends strongly on x0: pooling all trajectories would
    # create spurious positive correlations (chi >> 1); the connected correlation at fixed x0 gives chi = 1.
    gen = torch.Generator().manual_seed(1)
    n_x0, n_traj, d = 60, 100, 16
    p = torch.where(torch.arange(n_x0) % 2 == 0, 0.1, 0.9).double()[:, None, None]
    changes = (torch.rand(n_x0, n_traj, d, generator=gen, dtype=torch.float64) < p).double()
    C = connected_correlations(changes)
    assert susceptibility(C) == pytest.approx(1.0, abs=0.15)
    pooled = connected_correlations(changes.reshape(1, n_x0 * n_traj, d))
    assert susceptibility(pooled) > 8.0  # the test above could fail if the code pooled


def test_gaussian_ar1_changes_recover_covariance_chi_and_length():
    # Real-valued changes with stationary covariance rho**|i-j| (an AR(1) chain) plus an x0-dependent mean.
    rho, d, n_x0, n_traj = 0.6, 24, 50, 400
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(n_x0, n_traj, d, generator=gen, dtype=torch.float64)
    x = torch.empty_like(z)
    x[..., 0] = z[..., 0]
    for i in range(1, d):
        x[..., i] = rho * x[..., i - 1] + math.sqrt(1 - rho**2) * z[..., i]
    x += torch.randn(n_x0, 1, d, generator=gen, dtype=torch.float64) * 5.0  # per-x0 offsets
    C = connected_correlations(x)
    idx = torch.arange(d)
    sigma = rho ** (idx[:, None] - idx[None, :]).abs().double()
    assert (C - sigma).abs().max() < 0.05
    assert susceptibility(C) == pytest.approx(float(sigma.sum() / d), rel=0.05)
    r, C_r = correlation_by_distance(C)
    # exp(-r / xi) with xi = -1 / ln(rho) ≈ 1.96.
    assert correlation_length(r, C_r, "threshold") == pytest.approx(-1 / math.log(rho), rel=0.06)


def test_correlation_length_closed_forms():
    r = torch.arange(2000, dtype=torch.float64)
    for xi in (0.7, 2.5, 9.0):
        C_r = torch.exp(-r / xi)
        q = math.exp(-1 / xi)
        assert correlation_length(r, C_r, "moment") == pytest.approx(q / (1 - q), rel=1e-9)
        assert correlation_length(r, C_r, "threshold") == pytest.approx(xi, rel=1e-9)
    C_pow = 1.0 / (1.0 + r)
    short, long = (correlation_length(r, C_pow, "moment", r_max=x) for x in (20, 100))
    assert short < long
    assert math.isinf(correlation_length(r[:3], torch.ones(3), "threshold"))


def test_fit_power_law_recovers_exponent():
    r = torch.arange(1, 64, dtype=torch.float64)
    a, A = fit_power_law(r, 3.0 * r**-1.3)
    assert a == pytest.approx(1.3, abs=1e-10)
    assert A == pytest.approx(3.0, rel=1e-10)
    with pytest.raises(ValueError, match="fit_power_law"):
        fit_power_law(r, -r)


def test_2d_grid_C_of_r_against_brute_force_pair_average():
    k = 5
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(k * k, k * k, generator=gen, dtype=torch.float64)
    C = A + A.T
    r, C_r = correlation_by_distance(C, (k, k))
    buckets: dict[int, list[float]] = {}
    points = list(enumerate(itertools.product(range(k), range(k))))  # row-major (row, col)
    for (i, (a, b)), (j, (c, e)) in itertools.product(points, repeat=2):
        buckets.setdefault((a - c) ** 2 + (b - e) ** 2, []).append(float(C[i, j]))
    keys = sorted(buckets)
    assert torch.allclose(r, torch.tensor([math.sqrt(q) for q in keys], dtype=torch.float64))
    means = [sum(buckets[q]) / len(buckets[q]) for q in keys]
    assert torch.allclose(C_r, torch.tensor(means, dtype=torch.float64))


def test_2d_block_chunks_chi_equals_block_area():
    # 2x2 patches of a 6x6 grid flip together: chi = 4, C(1) comes only from neighbours inside a patch.
    gen = torch.Generator().manual_seed(4)
    n_x0, n_traj, p = 80, 120, 0.5
    flips = (torch.rand(n_x0, n_traj, 3, 3, generator=gen) < p).double()
    changes = flips.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (n_x0, n_traj, 6, 6)
    stats = ChangeStatistics((6, 6))
    stats.update(changes)
    assert stats.chi == pytest.approx(4.0, rel=0.04)
    r, C_r = stats.C_of_r()
    # Horizontal/vertical neighbour pairs (ordered): 2 * 6 * 5 * 2 = 120; inside a patch: 9 patches * 8 = 72.
    assert C_r[1].item() == pytest.approx(0.25 * 72 / 120, abs=0.01)
    # Beyond the patch diagonal sqrt(2) nothing is correlated.
    assert C_r[r > 1.5].abs().max() < 0.01


def test_streaming_equals_one_shot():
    changes = block_flips(12, 9, 16, 2, 0.4, seed=5)
    stats = ChangeStatistics((16,))
    for chunk in changes.split(5):
        stats.update(chunk)
    assert torch.allclose(stats.C, connected_correlations(changes), atol=1e-12)
    assert stats.change_probability == pytest.approx(change_probability(changes).item(), abs=1e-12)
    assert torch.allclose(stats.mean_change, changes.mean(dim=(0, 1)))
    summary = stats.summary()
    assert summary["n_x0"] == 12 and summary["n_samples"] == 108
    assert summary["chi"] == pytest.approx(susceptibility(connected_correlations(changes)))


def test_token_and_embedding_changes():
    x0 = torch.tensor([[1, 2, 3], [4, 5, 6]])
    x_hat = torch.tensor([[[1, 0, 3], [1, 2, 3]], [[4, 5, 0], [0, 0, 0]]])  # (2, 2, 3)
    sigma = token_changes(x0, x_hat)
    assert sigma.shape == (2, 2, 3)
    assert sigma.sum().item() == 5
    e0 = torch.zeros(2, 3, 4)
    e_hat = torch.ones(2, 5, 3, 4) * 2.0
    delta = embedding_changes(e0, e_hat)
    assert delta.shape == (2, 5, 3)
    assert torch.allclose(delta, torch.full_like(delta, 2.0))  # ||(2,2,2,2)|| / sqrt(4)
    # A non-constant difference separates the Euclidean norm from a mean of absolute values.
    e_hat = torch.tensor([3.0, 4.0]).expand(1, 1, 2).clone()  # (N=1, grid=1, D=2)
    delta = embedding_changes(torch.zeros(1, 1, 2), e_hat)
    assert torch.allclose(delta, torch.tensor([[5.0 / 2**0.5]]).double())


def test_connected_correlations_use_the_unbiased_estimator():
    # Two trajectories of one x0 that flip (0, 1): sample variance with n_traj - 1 = 1 is 0.5 (biased: 0.25);
    # two positions flipping together give C_01 = 0.5, opposite flips -0.5.
    together = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # (n_x0=1, n_traj=2, d=2)
    opposite = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert torch.allclose(connected_correlations(together), torch.full((2, 2), 0.5).double())
    assert torch.allclose(connected_correlations(opposite), torch.tensor([[0.5, -0.5], [-0.5, 0.5]]).double())


def test_level_reconstruction_counts_matches_per_level():
    tree0 = (torch.tensor([[0], [1]]), torch.tensor([[0, 1], [2, 3]]))
    tree_hat = (torch.tensor([[0], [0]]), torch.tensor([[0, 1], [2, 0]]))
    kept = level_reconstruction(tree0, tree_hat)
    assert torch.allclose(kept, torch.tensor([0.5, 0.75], dtype=torch.float64))


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="n_traj >= 2"):
        connected_correlations(torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="grid"):
        correlation_by_distance(torch.zeros(4, 4), (3, 3))
    with pytest.raises(ValueError, match="method"):
        correlation_length(torch.arange(3.0), torch.ones(3), "nope")
    with pytest.raises(TypeError, match="changes"):
        ChangeStatistics((4,)).update([[0, 1]])
    with pytest.raises(ValueError, match="grid shape"):
        ChangeStatistics((4,)).update(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="update"):
        ChangeStatistics((4,)).chi  # noqa: B018
    assert math.isnan(susceptibility(torch.zeros(3, 3)))


def test_crossing_and_peak_on_known_curves():
    levels = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert crossing_point(levels, 1 - levels, 0.35) == pytest.approx(0.65, abs=1e-12)
    assert math.isnan(crossing_point(levels, torch.ones(11), 0.5))
    # Parabola sampled off-centre: the three-point refinement is exact.
    assert peak_location(levels, -((levels - 0.437) ** 2)) == pytest.approx(0.437, abs=1e-9)
    assert peak_location(levels, levels) == pytest.approx(1.0)


def test_susceptibility_within_distance_counts_only_near_pairs():
    d = 12
    idx = torch.arange(d)
    C = 0.5 ** (idx[:, None] - idx[None, :]).abs().double()
    near = (idx[:, None] - idx[None, :]).abs() <= 3
    assert susceptibility(C, r_max=3) == pytest.approx(float(C[near].sum() / d), rel=1e-12)
    assert susceptibility(C, r_max=d) == pytest.approx(susceptibility(C), rel=1e-12)
