"""Noise processes: a common suite over the registry, and each process against its exact transition law."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from layerwise.hierarchy import NOISE_PROCESSES, NoiseProcess, make_noise_process

V = 5


def test_registry_names_and_unknown_name():
    assert {"eps", "uniform", "mask"} <= set(NOISE_PROCESSES.names())
    with pytest.raises(ValueError, match="unknown noise process .gauss.; valid names: .*eps"):
        make_noise_process("gauss", 4)
    for name in NOISE_PROCESSES:
        proc = make_noise_process(name, V)
        assert isinstance(proc, NoiseProcess) and proc.name == name and proc.v == V


# ------------------------------------------------------------------------------------------- common suite
@pytest.fixture(params=sorted(NOISE_PROCESSES.names()))
def proc(request) -> NoiseProcess:
    return make_noise_process(request.param, V)


def _x0(n: int = 40, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n, d), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("level", [-0.1, 1.5, float("nan")])
def test_level_validated(proc, level):
    with pytest.raises(ValueError, match="level"):
        proc.corrupt(_x0(), level, torch.Generator())
    with pytest.raises(ValueError, match="level"):
        proc.leaf_evidence(_x0(), level)


def test_token_validation(proc):
    with pytest.raises(ValueError, match=r"x0 values must be in \[0, 5\)"):
        proc.corrupt(torch.full((2, 3), V), 0.5, torch.Generator())
    with pytest.raises(TypeError, match="x0 must be a long tensor"):
        proc.corrupt(torch.zeros(2, 3), 0.5, torch.Generator())
    with pytest.raises(ValueError, match="x_t values"):
        proc.leaf_evidence(torch.full((2, 3), V + 1), 0.5)
    with pytest.raises(ValueError, match=r"shape \(N, d\)"):
        proc.leaf_evidence(torch.zeros(3, dtype=torch.long), 0.5)
    with pytest.raises(TypeError, match="dtype"):
        proc.leaf_evidence(torch.zeros(2, 3, dtype=torch.long), 0.5, dtype=torch.long)


def test_shapes_dtypes_and_seeding(proc):
    x0 = _x0()
    a = proc.corrupt(x0, 0.5, torch.Generator().manual_seed(3))
    b = proc.corrupt(x0, 0.5, torch.Generator().manual_seed(3))
    assert a.shape == x0.shape and a.dtype == torch.long and torch.equal(a, b)
    assert a.min() >= 0 and a.max() < proc.n_states
    ev = proc.leaf_evidence(a, 0.5)
    assert ev.shape == (*x0.shape, V) and ev.dtype == torch.float64 and (ev >= 0).all()
    assert proc.leaf_evidence(a, 0.5, dtype=torch.float32).dtype == torch.float32
    assert torch.equal(proc.corrupt(x0, 0.5, 3), a)  # an int seed is accepted too


def test_level_zero_is_exact(proc):
    """No noise: x_t = x0 and the evidence is a point mass on x0."""
    x0 = _x0()
    x_t = proc.corrupt(x0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(x_t, x0)
    ev = proc.leaf_evidence(x_t, 0.0)
    torch.testing.assert_close(ev, torch.nn.functional.one_hot(x0, V).double())


# ------------------------------------------------------------------------------------------- exact laws
@pytest.mark.parametrize("name", ["uniform", "mask"])
@pytest.mark.parametrize("level", [0.3, 0.8])
def test_evidence_is_the_likelihood_of_the_corruption(name, level):
    """For processes that emit x_t: evidence e_b(a) must be proportional (over a) to the empirical
    transition law p(x_t = b | x0 = a), estimated from 40 000 corruptions per clean token."""
    proc = make_noise_process(name, V)
    n = 40_000
    x0 = torch.arange(V).repeat_interleave(n).view(V, n)  # row a: n copies of token a
    x_t = proc.corrupt(x0, level, torch.Generator().manual_seed(1))
    counts = torch.stack([torch.bincount(row, minlength=proc.n_states) for row in x_t])  # (V, n_states)
    emp = counts.double() / n  # emp[a, b] ~ p(b | a)
    ev = proc.leaf_evidence(torch.arange(proc.n_states).view(1, -1), level)[0]  # (n_states, V): e_b(a)
    for b in range(proc.n_states):
        lik = emp[:, b]  # (V,)
        # Evidence is up to a constant: compare after scaling by the exact mass on a = 0.
        exact = ev[b] * (lik.sum() / ev[b].sum())
        se = (exact * (1 - exact) / n).sqrt() + 1e-12
        assert ((lik - exact).abs() <= 5 * se + 1e-9).all(), (b, lik, exact)


def test_uniform_replacement_statistics():
    """P(token changes) = eps (1 - 1/v); the tokens that changed are uniform over the other v - 1 values."""
    proc = make_noise_process("uniform", V)
    x0 = torch.zeros(200_000, 1, dtype=torch.long)
    eps = 0.4
    x_t = proc.corrupt(x0, eps, torch.Generator().manual_seed(2))
    changed = (x_t != 0).double().mean().item()
    p = eps * (1 - 1 / V)
    assert abs(changed - p) < 5 * math.sqrt(p * (1 - p) / x0.numel())
    counts = torch.bincount(x_t[x_t != 0], minlength=V)[1:]
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_eps_process_keeps_tokens_and_smooths_evidence():
    proc = make_noise_process("eps", V)
    x0 = _x0()
    x_t = proc.corrupt(x0, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(x_t, x0) and x_t is not x0
    ev = proc.leaf_evidence(x_t, 0.7)
    want = 0.3 * torch.nn.functional.one_hot(x0, V).double() + 0.7 / V
    torch.testing.assert_close(ev, want)
    torch.testing.assert_close(proc.leaf_evidence(x_t, 1.0), torch.full_like(ev, 1 / V))


def test_mask_process():
    proc = make_noise_process("mask", V)
    assert proc.mask_id == V and proc.n_states == V + 1
    x0 = _x0(n=500, d=64)
    x_t = proc.corrupt(x0, 0.3, torch.Generator().manual_seed(0))
    masked = x_t == V
    assert torch.equal(x_t[~masked], x0[~masked])
    frac = masked.double().mean().item()
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / x0.numel())
    ev = proc.leaf_evidence(x_t, 0.3)
    assert (ev[masked] == 1).all()
    torch.testing.assert_close(ev[~masked], torch.nn.functional.one_hot(x0[~masked], V).double())
    assert (proc.corrupt(x0, 1.0, torch.Generator()) == V).all()
