"""Spectral (eigenlearning) learning-curve theory: closed forms and exact kernel-regression averages."""

from __future__ import annotations

import pytest
import torch

from layerwise.errors import ParameterError
from layerwise.kernels import (
    eigenlearning_kappa,
    learning_curve,
    predicted_learning_curve,
    spectral_decomposition,
    tail_as_ridge,
)


def test_isotropic_ridgeless_closed_form():
    # D equal modes, target power S: min-norm interpolation projects the target onto a random n-dim
    # subspace, so the error is exactly S (1 - n / D) for n < D and 0 beyond.
    D, S = 25, 2.0
    lam = torch.full((D,), 0.3, dtype=torch.float64)
    v2 = torch.full((D,), S / D, dtype=torch.float64)
    pred = predicted_learning_curve(lam, v2, [1, 5, 10, 24, 30])
    torch.testing.assert_close(pred, torch.tensor([S * (1 - n / D) for n in (1, 5, 10, 24)] + [0.0],
                                                  dtype=torch.float64))
    assert eigenlearning_kappa(lam, 30) == 0.0
    # Modes of zero eigenvalue are never learnt: their power stays in the error.
    lam0 = torch.cat([lam, torch.zeros(5, dtype=torch.float64)])
    v20 = torch.cat([v2, torch.full((5,), 0.1, dtype=torch.float64)])
    assert float(predicted_learning_curve(lam0, v20, [30])[0]) == pytest.approx(0.5 * 30 / (30 - 25))


def test_kappa_solves_its_equation():
    lam = torch.arange(1, 201, dtype=torch.float64) ** -1.5
    for P, ridge in ((10, 0.0), (50, 0.0), (50, 1e-3)):
        k = eigenlearning_kappa(lam, P, ridge)
        assert float((lam / (lam + k)).sum()) + ridge / k == pytest.approx(P, rel=1e-10)


def _exact_linear_krr(scales, P, R, gen, ridge=0.0):
    """Exact test MSE of kernel regression with k(x, y) = x^T diag(scales) y, x ~ N(0, I_D), teacher a GRF
    of the same covariance (f = x.w, w ~ N(0, diag(scales))), over R independent draws (batched)."""
    D = scales.shape[0]
    X = torch.randn(R, P, D, generator=gen, dtype=torch.float64)
    w = torch.randn(R, D, 1, generator=gen, dtype=torch.float64) * scales.sqrt()[:, None]
    K = (X * scales) @ X.transpose(1, 2) + ridge * torch.eye(P, dtype=torch.float64)
    w_hat = scales[:, None] * (X.transpose(1, 2) @ torch.linalg.solve(K, X @ w))
    return ((w - w_hat) ** 2).sum((1, 2))  # E_x (x.(w - w_hat))^2 for isotropic x


@pytest.mark.parametrize("case", ["isotropic", "power law", "isotropic, ridge"])
def test_prediction_matches_exact_kernel_regression_averages(case):
    D, R = 40, 4000
    scales = (torch.ones(D, dtype=torch.float64) if case.startswith("isotropic")
              else torch.arange(1, D + 1, dtype=torch.float64) ** -1.0)
    scales = scales / scales.sum()
    ridge = 0.05 if "ridge" in case else 0.0
    gen = torch.Generator().manual_seed(0)
    for P in (5, 10, 20, 30):
        err = _exact_linear_krr(scales, P, R, gen, ridge)
        mean, se = float(err.mean()), float(err.std() / R**0.5)
        pred = float(predicted_learning_curve(scales, scales, [P], ridge=ridge)[0])
        # Exact for isotropic ridgeless; otherwise the theory has O(1/D) finite-size corrections (about
        # 1-2% here), allowed as 3% on top of the Monte-Carlo error.
        slack = 0.0 if case == "isotropic" else 0.03 * pred
        assert abs(mean - pred) <= 4 * se + slack, (P, mean, se, pred)


def test_spectral_decomposition_and_agreement_with_learning_curve():
    D = 12
    scales = torch.arange(1, D + 1, dtype=torch.float64) ** -1.0

    def student(X, Y=None):
        return (X * scales) @ (X if Y is None else Y).T

    def teacher(X, Y=None):  # depends on the first coordinate only: power on the top mode alone
        return X[:, :1] @ (X if Y is None else Y)[:, :1].T

    X = torch.randn(1000, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ev, v2 = spectral_decomposition(student(X), teacher(X))
    assert bool((ev[:-1] >= ev[1:]).all())
    assert float(v2.sum()) == pytest.approx(float(teacher(X).diagonal().mean()), rel=1e-10)
    torch.testing.assert_close(ev[:D], scales, atol=0.05, rtol=0.1)  # Gram / N estimates the operator
    assert float(v2[0]) > 0.9 * float(v2.sum())
    same_ev, same_v2 = spectral_decomposition(student(X), student(X))
    torch.testing.assert_close(same_v2, same_ev)  # a teacher equal to the student: v_i^2 = lambda_i
    # The library's learning curve on these kernels agrees with the prediction from the Gram spectrum.
    seeds = list(range(60))
    curve = learning_curve(teacher, student, [3, 6, 9], 200, seeds,
                           lambda n, g: torch.randn(n, D, generator=g, dtype=torch.float64))
    pred = predicted_learning_curve(ev, v2, [3, 6, 9])
    se = curve.mse.std(1) / len(seeds) ** 0.5
    assert bool(((curve.mean() - pred).abs() <= 4 * se + 0.05 * pred).all()), (curve.mean(), pred, se)


def test_bad_input():
    lam = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ParameterError, match="target_power must have the shape"):
        predicted_learning_curve(lam, torch.ones(3), [2])
    with pytest.raises(ParameterError, match=">= 0"):
        predicted_learning_curve(-lam, lam, [2])
    with pytest.raises(ParameterError, match="P_list"):
        predicted_learning_curve(lam, lam, [0])
    with pytest.raises(ParameterError, match="square"):
        spectral_decomposition(torch.ones(3, 3), torch.ones(2, 2))


def test_tail_as_ridge_approximates_the_full_spectrum():
    # 20000 power-law modes: keeping 2000 and folding the rest into a ridge and an unlearnt power changes
    # the prediction little for P well below 2000, while simply dropping the tail is visibly wrong.
    lam = torch.arange(1, 20001, dtype=torch.float64) ** -1.5
    v2 = torch.arange(1, 20001, dtype=torch.float64) ** -1.2
    P = [20, 50, 100, 200]
    full = predicted_learning_curve(lam, v2, P)
    folded = predicted_learning_curve(P_list=P, **tail_as_ridge(lam, v2, 2000))
    dropped = predicted_learning_curve(lam[:2000], v2[:2000], P)
    torch.testing.assert_close(folded, full, rtol=0.02, atol=0.0)
    assert bool(((dropped - full).abs() > 0.05 * full).any())
    parts = tail_as_ridge(lam, v2, 2000, ridge=0.5)
    assert parts["ridge"] == pytest.approx(0.5 + float(lam[2000:].sum()))
    assert parts["noise"] == pytest.approx(float(v2[2000:].sum()))
    with pytest.raises(ParameterError, match="decreasing"):
        tail_as_ridge(lam.flip(0), v2, 10)


def test_spectral_decomposition_of_several_teachers_equals_one_at_a_time():
    X = torch.randn(50, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Ks, Ka, Kb = X @ X.T + 1.0, (X[:, :1] @ X[:, :1].T), torch.exp(-torch.cdist(X, X))
    ev, both = spectral_decomposition(Ks, {"a": Ka, "b": Kb})
    for name, K in (("a", Ka), ("b", Kb)):
        ev1, p1 = spectral_decomposition(Ks, K)
        torch.testing.assert_close(ev1, ev)
        torch.testing.assert_close(p1, both[name])
