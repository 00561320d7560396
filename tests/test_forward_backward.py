"""Forward-backward with the exact BP denoiser: limits, exact expectations, streaming, the L=9 threshold."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from layerwise.hierarchy import RHM, belief_propagation, make_noise_process, theory
from layerwise.hierarchy.forward_backward import BPDenoiser, Denoiser, forward_backward
from layerwise.hierarchy.observables import connected_correlations, crossing_point, token_changes


@pytest.fixture(scope="module")
def small():
    rhm = RHM(v=8, n_c=4, m=2, s=2, L=3, seed=0)
    return rhm, rhm.sample(64, seed=1)


@pytest.mark.parametrize("name", ["eps", "uniform", "mask"])
def test_noise_zero_changes_nothing(small, name):
    rhm, data = small
    res = forward_backward(data, name, [0.0], 3, BPDenoiser(rhm), seed=2).levels[0]
    assert torch.equal(res.x_hat, data.tokens.unsqueeze(1).expand(-1, 3, -1))
    assert torch.equal(res.level_kept, torch.ones(rhm.L + 1, dtype=torch.float64))
    for level, tree in enumerate(res.tree_hat):
        assert torch.equal(tree, data.tree[level].unsqueeze(1).expand(-1, 3, -1))
    assert res.change_probability == 0.0


@pytest.mark.parametrize("name", ["mask", "eps", "uniform"])
def test_full_noise_keeps_class_with_probability_one_over_n_c(name):
    # Everything masked (or eps = 1): the posterior is the prior, so the class is a fresh uniform draw.
    rhm = RHM(v=8, n_c=4, m=2, s=2, L=3, seed=3)
    res = forward_backward(rhm.sample(1000, seed=4), name, [1.0], 4, BPDenoiser(rhm), seed=5).levels[0]
    # 4000 draws of Bernoulli(1/4): standard error 0.0068; a denoiser that remembers x0 gives 1.
    assert res.class_kept == pytest.approx(1 / rhm.n_c, abs=0.03)
    # And every sample is a valid datum of the grammar (its tree regenerates from its choices).
    assert torch.equal(res.x_hat[:, 0], rhm.from_choices(res.tree_hat[0][:, 0, 0],
                                                         [c for c in _choices_of(rhm, res)]).tokens)


def _choices_of(rhm, res):
    # Rebuild each node's rule index from the sampled tree: the rule whose children match.
    out = []
    for level, table in enumerate(rhm.rules):
        parents = res.tree_hat[level][:, 0]  # (N, s**l)
        kids = res.tree_hat[level + 1][:, 0].reshape(parents.shape[0], parents.shape[1], rhm.s)
        match = (table[parents] == kids.unsqueeze(2)).all(-1)  # (N, s**l, m)
        assert bool((match.sum(-1) == 1).all()), "sampled tree uses a tuple that is not a rule of its parent"
        out.append(match.long().argmax(-1))
    return out


def test_level_reconstruction_matches_exact_bp_marginals():
    # For the eps-process the evidence is a function of x0, so E[1(level-l symbol kept)] is the BP marginal
    # of the true symbol, averaged over nodes and x0: an exact expectation to compare the sampler with.
    rhm = RHM(v=8, n_c=8, m=2, s=2, L=3, seed=6)
    data = rhm.sample(200, seed=7)
    eps = 0.6
    res = forward_backward(data, "eps", [eps], 20, BPDenoiser(rhm), seed=8).levels[0]
    proc = make_noise_process("eps", rhm.v)
    marg = belief_propagation(rhm, proc.leaf_evidence(data.tokens, eps)).marginals
    exact = torch.stack([m.gather(2, t.unsqueeze(-1)).mean() for m, t in zip(marg, data.tree, strict=True)])
    # The exact value is conditional on each x0 (the evidence is fixed given x0), so only the 20 Bernoulli
    # draws per x0 fluctuate: se <= 0.5 / sqrt(200 * 20) = 0.0079 at the class level (leaves average 8
    # nodes, less). atol = 4 se of that worst case.
    assert torch.allclose(res.level_kept, exact, atol=0.032)
    assert 0.05 < exact[0] < 0.95  # a regime where kept/not kept are both frequent: the check means something


def test_streaming_matches_kept_trajectories(small):
    rhm, data = small
    kw = dict(seed=9, batch_size=40)
    full = forward_backward(data, "uniform", [0.2, 0.5], 6, BPDenoiser(rhm), **kw)
    lean = forward_backward(data, "uniform", [0.2, 0.5], 6, BPDenoiser(rhm), keep_trajectories=False, **kw)
    for a, b in zip(full.levels, lean.levels, strict=True):
        assert b.x_hat is None and b.x_t is None and b.tree_hat is None
        assert torch.equal(a.level_kept, b.level_kept)
        assert torch.allclose(a.statistics.C, b.statistics.C, atol=1e-12)
        # The streamed correlations agree with the one-shot observables on the kept trajectories.
        C = connected_correlations(token_changes(full.x0, a.x_hat))
        assert torch.allclose(a.statistics.C, C, atol=1e-12)


def test_levels_are_reproducible_independent_and_parallelisable(small):
    rhm, data = small
    one = forward_backward(data, "mask", [0.3, 0.6], 4, BPDenoiser(rhm), seed=10)
    again = forward_backward(data, "mask", [0.3, 0.6], 4, BPDenoiser(rhm), seed=10)
    with ThreadPoolExecutor(2) as pool:
        par = forward_backward(data, "mask", [0.3, 0.6], 4, BPDenoiser(rhm), seed=10, executor=pool)
    for a, b, c in zip(one.levels, again.levels, par.levels, strict=True):
        assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.x_hat, c.x_hat)
        assert torch.equal(a.x_t, c.x_t)
    other = forward_backward(data, "mask", [0.3, 0.9], 4, BPDenoiser(rhm), seed=10)
    assert torch.equal(one.levels[0].x_hat, other.levels[0].x_hat)  # level 0 does not see level 1


class EchoDenoiser:
    """A token-only denoiser that returns x_t unchanged (tests the generic path)."""

    def sample_x0(self, x_t, process, level, generator=None):
        return x_t.clone()


def test_token_only_denoiser_gets_independent_changes():
    # Uniform resampling then echo: token i changes independently with probability eps (1 - 1/v).
    v, eps = 16, 0.4
    x0 = torch.randint(0, v, (50, 32), generator=torch.Generator().manual_seed(11))
    assert isinstance(EchoDenoiser(), Denoiser)
    res = forward_backward(x0, make_noise_process("uniform", v), [eps], 40, EchoDenoiser(), seed=12).levels[0]
    assert math.isnan(res.class_kept)
    assert res.change_probability == pytest.approx(eps * (1 - 1 / v), abs=0.01)  # 64 000 draws
    assert res.statistics.chi == pytest.approx(1.0, abs=0.1)


def test_bad_arguments_are_named(small):
    rhm, data = small
    with pytest.raises(ValueError, match="levels entry"):
        forward_backward(data, "eps", [1.5], 2, BPDenoiser(rhm))
    with pytest.raises(ValueError, match="n_trajectories"):
        forward_backward(data, "eps", [0.5], 0, BPDenoiser(rhm))
    with pytest.raises(ValueError, match="noise process"):
        forward_backward(data, "gauss", [0.5], 2, BPDenoiser(rhm))
    with pytest.raises(TypeError, match="data"):
        forward_backward([[1, 2]], "eps", [0.5], 2, BPDenoiser(rhm))
    with pytest.raises(ValueError, match="process.v"):
        BPDenoiser(rhm).sample_x0(data.tokens, make_noise_process("eps", 9), 0.1)
    with pytest.raises(TypeError, match="rhm"):
        BPDenoiser("rhm")


@pytest.mark.slow
def test_threshold_at_L9_matches_mean_field_eps_star():
    """v=32, m=8, s=2, n_c=32, L=9 (d=512): P(class kept) crosses 1/2 within 0.03 of eps* ≈ 0.7312.

    Mean-field eps* = v (v - 2m + 1) / ((v - 1)(v - m)) (closed form for s = 2). 384 data per level:
    the standard error of P(class kept) is <= 0.026 and the curve falls by ~0.8 over 0.05 in eps, so the
    crossing is located to ~0.002; a denoiser that ignores (or copies) the data never crosses 1/2.
    """
    v, m = 32, 8
    eps_star = v * (v - 2 * m + 1) / ((v - 1) * (v - m))
    assert theory.critical_noise(v, m, 2) == pytest.approx(eps_star, rel=1e-9)  # the library's mean field
    rhm = RHM(v=v, n_c=v, m=m, s=2, L=9, seed=13)
    levels = [0.69, 0.71, 0.73, 0.75, 0.77]
    res = forward_backward(rhm.sample(384, seed=14), "eps", levels, 1, BPDenoiser(rhm), seed=15,
                           keep_trajectories=False)
    kept = [r.class_kept for r in res.levels]
    assert kept[0] > 0.7 and kept[-1] < 0.15  # a sharp drop inside the window
    measured = crossing_point(levels, kept, 0.5)
    assert abs(measured - eps_star) <= 0.03


def test_docstring_examples_run():
    import doctest

    from layerwise.hierarchy import forward_backward as fb_module
    from layerwise.hierarchy import observables

    for module in (fb_module, observables):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
