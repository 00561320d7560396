"""KernelRegressor (ridgeless interpolation, ridge against a direct solve, solvers, fallbacks, score) and
Gaussian-random-field teachers (reproducibility, covariance)."""

from __future__ import annotations

import functools

import pytest
import torch

from layerwise.errors import ParameterError, ParameterTypeError
from layerwise.kernels import KernelRegressor, gaussian_random_field, laplace, local_kernel, make_kernel

KERNEL = functools.partial(local_kernel, s=2, base="laplace", sigma=2.0)


def _data(n=60, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=torch.float64)
    return X, torch.sin(3 * X[:, 0]) + X[:, 1:3].sum(1)


def test_ridgeless_interpolates_and_generalises():
    X, y = _data()
    model = KernelRegressor(KERNEL).fit(X, y)
    assert model.solver_ == "cholesky" and model.jitter_ == 0.0
    assert (model.predict(X) - y).abs().max() < 1e-8 * y.abs().max()
    Xt, yt = _data(200, seed=1)
    assert model.score(Xt, yt) > 0.5  # learns something off the training set


def test_ridge_matches_direct_solve_and_stops_interpolating():
    X, y = _data()
    ridge = 0.1
    model = KernelRegressor(KERNEL, ridge=ridge).fit(X, y)
    K = KERNEL(X, None)
    alpha = torch.linalg.solve(K + ridge * torch.eye(len(X), dtype=torch.float64), y)
    torch.testing.assert_close(model.dual_coef_, alpha, rtol=1e-9, atol=1e-10)
    Xt, _ = _data(7, seed=2)
    torch.testing.assert_close(model.predict(Xt), KERNEL(Xt, X) @ alpha, rtol=1e-9, atol=1e-10)
    assert (model.predict(X) - y).abs().max() > 1e-3  # the ridge is not ignored


def test_lstsq_solver_and_multi_output():
    X, y = _data()
    Y2 = torch.stack([y, -2 * y], 1)
    chol = KernelRegressor(KERNEL).fit(X, Y2)
    lsq = KernelRegressor(KERNEL, solver="lstsq").fit(X, Y2)
    assert lsq.solver_ == "lstsq" and chol.dual_coef_.shape == (60, 2)
    Xt, _ = _data(9, seed=3)
    torch.testing.assert_close(lsq.predict(Xt), chol.predict(Xt), rtol=1e-6, atol=1e-8)


def test_singular_gram_falls_back_to_jitter_or_lstsq():
    X, y = _data(30)
    X = torch.cat([X, X[:5]])  # duplicated points: singular Gram matrix
    y = torch.cat([y, y[:5]])
    model = KernelRegressor(KERNEL).fit(X, y)
    assert model.solver_ == "lstsq" or model.jitter_ > 0
    assert (model.predict(X) - y).abs().max() < 1e-4  # consistent duplicated targets are still fitted
    with_lstsq = KernelRegressor(KERNEL, solver="lstsq").fit(X, y)
    assert bool(torch.isfinite(with_lstsq.dual_coef_).all())
    assert (with_lstsq.predict(X) - y).abs().max() < 1e-6


def test_score_is_r2():
    X, y = _data()
    model = KernelRegressor(KERNEL, ridge=0.5).fit(X, y)
    pred = model.predict(X)
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert model.score(X, y) == pytest.approx(float(r2), rel=1e-12)


def test_bad_input_names_the_parameter():
    X, y = _data()
    with pytest.raises(ParameterError, match="ridge must be"):
        KernelRegressor(KERNEL, ridge=-1.0).fit(X, y)
    with pytest.raises(ParameterError, match="solver must be one of"):
        KernelRegressor(KERNEL, solver="inverse").fit(X, y)
    with pytest.raises(ParameterError, match="y must have shape \\(60,\\)"):
        KernelRegressor(KERNEL).fit(X, y[:10])
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ParameterError, match="X must be finite"):
        KernelRegressor(KERNEL).fit(bad, y)
    with pytest.raises(ParameterError, match="not fitted"):
        KernelRegressor(KERNEL).predict(X)
    with pytest.raises(ParameterTypeError, match="kernel must be a callable"):
        KernelRegressor("laplace").fit(X, y)
    model = KernelRegressor(KERNEL).fit(X, y)
    with pytest.raises(ParameterError, match="trailing shape"):
        model.predict(torch.rand(3, 5, dtype=torch.float64))


def test_grf_reproducible_and_has_the_kernel_covariance():
    kernel = functools.partial(laplace, sigma=1.0)
    X = torch.tensor([[0.0, 0.0], [0.3, 0.1], [1.0, 1.0]], dtype=torch.float64)
    a = gaussian_random_field(kernel, X, n_fields=3, seed=7)
    assert torch.equal(a, gaussian_random_field(kernel, X, n_fields=3, seed=7))
    assert not torch.equal(a, gaussian_random_field(kernel, X, n_fields=3, seed=8))
    fields = gaussian_random_field(kernel, X, n_fields=40_000, seed=0)  # (3, 40000)
    cov = fields @ fields.T / fields.shape[1]
    K = kernel(X)
    # Sample covariance of 40k draws: standard error sqrt((K_ii K_jj + K_ij^2) / n) <= 0.0071; 5 SE.
    assert (cov - K).abs().max() < 0.036
    assert abs(float(fields.mean())) < 0.02


def test_grf_works_with_a_spec_kernel_and_rejects_bad_n_fields():
    X = torch.rand(10, 8, dtype=torch.float64)
    k = make_kernel({"type": "conv", "s": 2, "base": "ntk_relu"})
    assert gaussian_random_field(k, X, 2, seed=0).shape == (10, 2)
    with pytest.raises(ParameterError, match="n_fields"):
        gaussian_random_field(k, X, 0)


def test_cholesky_factor_adds_the_smallest_working_jitter():
    from layerwise.kernels.regression import cholesky_solve_factor

    # A rank-3 PSD matrix of size 8 (exactly singular): the plain factorisation fails, and a jitter of
    # eps * mean(diag) with eps in (1e-14, ..., 1e-8) must be found, with L L^T = K + jitter I.
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    K = A @ A.T
    L, jitter = cholesky_solve_factor(K)
    scale = float(K.diagonal().mean())
    assert L is not None and 0 < jitter <= 1e-8 * scale
    assert any(jitter == pytest.approx(eps * scale, rel=1e-12) for eps in (1e-14, 1e-12, 1e-10, 1e-8))
    torch.testing.assert_close(L @ L.T, K + jitter * torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    # and a positive-definite matrix needs none
    L, jitter = cholesky_solve_factor(K + torch.eye(8, dtype=torch.float64))
    assert jitter == 0.0
    # The duplicated-points regression of the test above takes the jitter route, not the lstsq fallback.
    X, y = _data(30)
    model = KernelRegressor(KERNEL).fit(torch.cat([X, X[:5]]), torch.cat([y, y[:5]]))
    assert model.solver_ == "cholesky" and 0 < model.jitter_ <= 1e-8 * 1.0
