"""fit_exponent on synthetic power laws; learning_curve against a per-P refit, a known exponent, and its
options; kernel_spectrum; kernel specs."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from layerwise.errors import ParameterError, ParameterTypeError
from layerwise.kernels import (
    KernelRegressor,
    fit_exponent,
    hypercube,
    kernel_spectrum,
    laplace,
    learning_curve,
    make_kernel,
    patch_spheres,
    sphere,
)
from layerwise.kernels.regression import cholesky_solve_factor


def _synthetic(beta, n_seeds, noise, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = torch.tensor([64, 128, 256, 512, 1024, 2048], dtype=torch.float64)
    err = 3.0 * P[:, None] ** (-beta) * torch.exp(noise * torch.randn(len(P), n_seeds, generator=gen,
                                                                     dtype=torch.float64))
    return P, err


@pytest.mark.parametrize("beta", [0.125, 0.5, 1.0])
def test_fit_exponent_recovers_a_power_law_within_its_interval(beta):
    P, err = _synthetic(beta, n_seeds=10, noise=0.2)
    fit = fit_exponent(P, err)
    assert fit.contains(beta)
    assert fit.high - fit.low < 0.15  # and the interval is informative: a wrong exponent is excluded
    assert not fit.contains(beta + 0.1) and not fit.contains(beta - 0.1)
    assert fit.prefactor == pytest.approx(3.0, rel=0.3)


def test_fit_exponent_exact_without_noise_and_level_option():
    P, err = _synthetic(0.37, n_seeds=4, noise=0.0)
    fit = fit_exponent(P, err)
    assert fit.beta == pytest.approx(0.37, abs=1e-12)
    P, err = _synthetic(0.37, n_seeds=6, noise=0.3, seed=1)
    wide, narrow = fit_exponent(P, err, level=0.95), fit_exponent(P, err, level=0.5)
    assert narrow.high - narrow.low < wide.high - wide.low
    assert fit_exponent(P, err) == fit_exponent(P, err)


def test_fit_exponent_single_seed_uses_the_scatter_of_the_points():
    P, err = _synthetic(0.5, n_seeds=1, noise=0.05)
    fit = fit_exponent(P, err[:, 0])
    assert fit.contains(0.5) and fit.high - fit.low < 0.2
    # Reference: ordinary least squares standard error of the slope, written out here.
    x, y = P.log(), err[:, 0].log()
    xc = x - x.mean()
    slope = (xc * (y - y.mean())).sum() / (xc * xc).sum()
    resid = y - y.mean() - slope * xc
    se = float(((resid**2).sum() / (len(P) - 2) / (xc * xc).sum()).sqrt())
    assert fit.stderr == pytest.approx(se, rel=1e-12) and fit.n_seeds == 1
    assert math.isinf(fit_exponent(P[:2], err[:2, 0]).stderr)  # two points: no scatter to measure


def test_fit_exponent_fits_the_log_of_the_mean_not_the_mean_of_the_logs():
    # Two seeds whose mean is exactly 3 P^-0.6 but whose geometric mean is not a power law: the fit of
    # log(mean) is exact, the fit of mean(log) would be off by several hundredths.
    P = torch.tensor([10.0, 20.0, 40.0, 80.0], dtype=torch.float64)
    mean = 3.0 * P ** (-0.6)
    r = torch.tensor([0.0, 0.3, 0.6, 0.9], dtype=torch.float64)
    err = torch.stack([mean * (1 + r), mean * (1 - r)], 1)
    fit = fit_exponent(P, err)
    assert fit.beta == pytest.approx(0.6, abs=1e-12) and fit.prefactor == pytest.approx(3.0, rel=1e-12)


def test_fit_exponent_jackknife_reference():
    # The interval is beta +- t_{n-1, 0.975} * jackknife standard error over leave-one-seed-out curves.
    from scipy.stats import t as student_t

    P, err = _synthetic(0.4, n_seeds=5, noise=0.2, seed=7)
    fit = fit_exponent(P, err)
    betas = [fit_exponent(P, torch.cat([err[:, :j], err[:, j + 1:]], 1)).beta for j in range(5)]
    mean = sum(betas) / 5
    se = math.sqrt(4 / 5 * sum((b - mean) ** 2 for b in betas))
    assert fit.stderr == pytest.approx(se, rel=1e-10)
    assert fit.high - fit.beta == pytest.approx(student_t.ppf(0.975, 4) * se, rel=1e-10)


def _coverage_sample(gen, n_seeds, beta):
    # A learning curve's noise: each seed shifts the level (sa) and the slope (sc) of its whole curve (its
    # own training set and teacher), and each point gets independent test-set noise (sb, ~ sqrt(2/512) for
    # an MSE over 512 test points). log E[err] has slope -beta exactly: the sc term adds sc^2 x^2 / 2,
    # symmetric in the centred log P of this symmetric grid.
    P = torch.tensor([64, 128, 256, 512, 1024], dtype=torch.float64)
    x = (P.log() - P.log().mean())[:, None]
    a = 0.1 * torch.randn(1, n_seeds, generator=gen, dtype=torch.float64)
    c = 0.03 * torch.randn(1, n_seeds, generator=gen, dtype=torch.float64)
    b = 0.06 * torch.randn(len(P), n_seeds, generator=gen, dtype=torch.float64)
    return P, 2.0 * P[:, None] ** (-beta) * torch.exp(a + c * x + b)


@pytest.mark.parametrize("n_seeds", [4, 8])
def test_fit_exponent_interval_coverage_is_near_95_percent(n_seeds):
    # 400 replications: a correct 95% interval lands in [0.90, 0.99] except with probability ~1e-4
    # (binomial sd 0.011, the window is -4.6 / +3.7 sd); the former percentile bootstrap over seeds
    # covered 0.79 (4 seeds) and 0.89 (8 seeds) on this model, i.e. 5 and 1 sd below 0.90. How many
    # replications a wrong interval needs to fail: true coverage 0.85 passes (>= 0.90 observed) with
    # probability 0.008 at R = 300 and 0.003 at R = 400; coverage 0.80 with probability < 1e-6 at R = 400.
    gen = torch.Generator().manual_seed(12345)
    R, beta = 400, 0.3
    hits = sum(fit_exponent(*_coverage_sample(gen, n_seeds, beta)).contains(beta) for _ in range(R))
    assert 0.90 <= hits / R <= 0.99


def test_fit_exponent_bad_input():
    P, err = _synthetic(0.5, 3, 0.1)
    with pytest.raises(ParameterError, match="err must have shape"):
        fit_exponent(P, err[:3])
    with pytest.raises(ParameterError, match="err must be positive"):
        fit_exponent(P, -err)
    with pytest.raises(ParameterError, match="P must hold positive sizes"):
        fit_exponent(torch.ones(6), err)
    with pytest.raises(ParameterError, match="level"):
        fit_exponent(P, err, level=1.5)


def test_learning_curve_equals_a_refit_per_size():
    # The nested-Cholesky shortcut must give exactly the MSE of a fresh KernelRegressor fit per P.
    teacher = make_kernel({"type": "local", "s": 2, "sigma": 2.0})
    student = make_kernel({"type": "local", "s": 3, "sigma": 3.0})
    P_list, n_test, seed = [10, 25, 40], 30, 4
    curve = learning_curve(teacher, student, P_list, n_test, [seed], hypercube(6))
    gen = torch.Generator().manual_seed(seed)
    X = hypercube(6)(40 + n_test, gen)
    noise = torch.randn(40 + n_test, 1, generator=gen, dtype=torch.float64)
    y = (cholesky_solve_factor(teacher(X))[0] @ noise)[:, 0]
    for i, p in enumerate(P_list):
        model = KernelRegressor(student).fit(X[:p], y[:p])
        mse = float(((model.predict(X[40:]) - y[40:]) ** 2).mean())
        assert curve.mse[i, 0] == pytest.approx(mse, rel=1e-8)


def test_learning_curve_known_exponent_laplace_in_one_dimension():
    # Laplace teacher and student on [0, 1]: beta = alpha / d = 1 (Spigler, Geiger, Wyart 2020).
    k = functools.partial(laplace, sigma=1.0)
    curve = learning_curve(k, k, [16, 32, 64, 128, 256], 256, [0, 1, 2, 3], hypercube(1))
    fit = curve.fit()
    assert 0.8 < fit.beta < 1.2


def test_learning_curve_reproducible_with_mappings_and_ridge():
    t = make_kernel({"type": "local", "s": 2, "sigma": 2.0})
    s = make_kernel({"type": "conv", "s": 2, "sigma": 2.0})
    args = ({"local": t}, {"local": t, "conv": s}, [8, 16, 32], 32, [0, 1], hypercube(6))
    a, b = learning_curve(*args), learning_curve(*args)
    assert set(a) == {("local", "local"), ("local", "conv")}
    assert torch.equal(a[("local", "local")].mse, b[("local", "local")].mse)
    ridged = learning_curve(*args, ridge=1.0)
    assert not torch.equal(ridged[("local", "local")].mse, a[("local", "local")].mse)
    # Same kernel object as teacher and student: the student fits its own field best at the largest P.
    assert a[("local", "local")].mean()[-1] < a[("local", "conv")].mean()[-1]


def test_learning_curve_bad_input():
    k = functools.partial(laplace, sigma=1.0)
    with pytest.raises(ParameterError, match="strictly increasing"):
        learning_curve(k, k, [32, 16], 8, [0], hypercube(2))
    with pytest.raises(ParameterError, match="n_test"):
        learning_curve(k, k, [8], 0, [0], hypercube(2))
    with pytest.raises(ParameterTypeError, match="teacher must be a callable"):
        learning_curve("laplace", k, [8], 4, [0], hypercube(2))
    with pytest.raises(ParameterError, match="ridge"):
        learning_curve(k, k, [8], 4, [0], hypercube(2), ridge=-0.1)
    with pytest.raises(ParameterError, match="seeds\\[0\\]"):
        learning_curve(k, k, [8], 4, [-1], hypercube(2))
    with pytest.raises(ParameterError, match="device must be one of cpu, cuda"):
        learning_curve(k, k, [8], 4, [0], hypercube(2), device="bogus")


def test_kernel_spectrum_sorted_and_traced():
    X = sphere(5)(80, torch.Generator().manual_seed(0))
    k = make_kernel({"type": "full", "base": "ntk_relu"})
    ev = kernel_spectrum(k, X)
    assert ev.shape == (80,) and bool((ev[:-1] >= ev[1:]).all())
    assert float(ev.sum()) == pytest.approx(float(k(X).diagonal().mean()), rel=1e-10)


def test_samplers():
    gen = torch.Generator().manual_seed(0)
    assert hypercube((3, 4))(5, gen).shape == (5, 3, 4)
    X = patch_spheres(12, 3)(6, gen)
    torch.testing.assert_close(X.view(6, 4, 3).norm(dim=-1), torch.ones(6, 4, dtype=torch.float64))
    with pytest.raises(ParameterError, match="s must divide d"):
        patch_spheres(10, 3)


def test_make_kernel_specs():
    X = torch.rand(6, 8, dtype=torch.float64)
    k = make_kernel({"type": "hierarchical", "filters": [2, 2], "support": [0, 4]})
    from layerwise.kernels import hierarchical_kernel

    torch.testing.assert_close(k(X), hierarchical_kernel(X[:, :4], None, (2, 2)))
    with pytest.raises(ParameterError, match="unknown \\['sigma'\\]"):
        make_kernel({"type": "local", "s": 2, "base": "ntk_relu", "sigma": 1.0})
    with pytest.raises(ParameterError, match="needs key\\(s\\) \\['s'\\]"):
        make_kernel({"type": "conv"})
    with pytest.raises(ParameterError, match="'type' must be one of"):
        make_kernel({"type": "rbf"})
    with pytest.raises(ParameterError, match="support"):
        make_kernel({"type": "full", "support": [3, 1]})


def test_learning_curve_progress_bar(capsys):
    k = functools.partial(laplace, sigma=1.0)
    learning_curve(k, k, [8, 16], 8, [0], hypercube(2), progress=True)
    assert "learning curve" in capsys.readouterr().err
    learning_curve(k, k, [8, 16], 8, [0], hypercube(2), progress=False)
    assert "learning curve" not in capsys.readouterr().err


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 7, 10, 31, 200])
def test_student_t_quantile_matches_scipy(dof):
    from scipy.stats import t as student_t

    from layerwise.kernels.curves import _t_quantile

    for q in (0.6, 0.75, 0.95, 0.975, 0.995):
        assert _t_quantile(q, dof) == pytest.approx(float(student_t.ppf(q, dof)), rel=1e-11)


def test_seed_cap_refuses_before_any_work_on_its_boundary():
    from layerwise.errors import ResourceError
    from layerwise.kernels.curves import MAX_SEEDS

    class Drawn(Exception):
        pass

    def sampler(n, gen):  # reached only after the seed cap was passed
        raise Drawn

    k = functools.partial(laplace, sigma=1.0)
    run = functools.partial(learning_curve, k, {"a": k, "b": k}, [4, 8], 4, sampler=sampler)
    with pytest.raises(ResourceError, match=r"seeds has 10001 entries, over the cap of 10000: the curve "
                                            r"would run 4e\+04 regressions \(10001 seeds x 2 sizes x 2"):
        run(list(range(MAX_SEEDS + 1)))
    with pytest.raises(Drawn):  # exactly at the cap: allowed
        run(list(range(MAX_SEEDS)))
    with pytest.raises(Drawn):  # no cap
        run(list(range(MAX_SEEDS + 1)), max_seeds=None)
    with pytest.raises(ResourceError, match="seeds has 3 entries, over the cap of 2"):
        run([0, 1, 2], max_seeds=2)
    with pytest.raises(ParameterError, match="max_seeds"):
        run([0], max_seeds=0)
