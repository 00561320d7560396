"""Kernel (ridge / ridgeless) regression and Gaussian-random-field teachers.

``KernelRegressor`` solves ``(K + ridge I) alpha = y`` through a Cholesky factorisation; when the Gram
matrix is numerically singular (ridgeless regression with an ill-conditioned kernel), it retries with a
growing jitter ``eps_k mean(diag K)`` (``eps_k = 1e-14, 1e-12, ..., 1e-8``) and finally falls back to a
least-squares solve (``torch.linalg.lstsq``). It never forms an explicit inverse.

``gaussian_random_field`` draws centred Gaussian fields with covariance ``kernel`` jointly on all the
given points (train and test together), as teachers for teacher-student learning curves.

>>> import torch
>>> from functools import partial
>>> from layerwise.kernels import KernelRegressor, laplace
>>> X = torch.rand(20, 3, dtype=torch.float64); y = X.sum(1)
>>> model = KernelRegressor(partial(laplace, sigma=1.0)).fit(X, y)
>>> bool(torch.allclose(model.predict(X), y, atol=1e-8))
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._validation import make_generator
from ..errors import ParameterError, ParameterTypeError
from ._checks import as_data, check_choice, check_float, check_int

__all__ = ["Kernel", "KernelRegressor", "cholesky_solve_factor", "gaussian_random_field"]

Kernel = Callable[..., torch.Tensor]  # kernel(X, Y=None) -> (n, m) Gram matrix

_JITTERS = (0.0, 1e-14, 1e-12, 1e-10, 1e-8)


def cholesky_solve_factor(K: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Lower Cholesky factor of ``K + jitter mean(diag K) I`` with the smallest working jitter of
    ``(0, 1e-14, 1e-12, 1e-10, 1e-8)``; ``(None, nan)`` if all fail.

    Returns the factor (n, n) and the absolute jitter added to the diagonal.
    """
    scale = float(K.diagonal().abs().mean()) or 1.0
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    for eps in _JITTERS:
        jitter = eps * scale
        L, info = torch.linalg.cholesky_ex(K + jitter * eye if jitter else K)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return L, jitter
    return None, float("nan")


def _check_kernel(kernel: Any) -> Kernel:
    if not callable(kernel):
        raise ParameterTypeError(f"kernel must be a callable kernel(X, Y) -> Gram matrix, got {kernel!r}")
    return kernel


class KernelRegressor:
    """Kernel ridge(less) regression with a scikit-learn style interface.

    Parameters
    ----------
    kernel : callable ``kernel(X, Y=None) -> (len(X), len(Y))`` Gram matrix (``Y=None``: ``Y = X``), e.g.
        ``functools.partial(local_kernel, s=2, sigma=2.0)`` or :func:`layerwise.kernels.make_kernel`.
    ridge : ``>= 0``, added to the diagonal of the training Gram matrix (``K + ridge I``); 0 = ridgeless.
    solver : ``"cholesky"`` (with jitter, then lstsq, as fallbacks) or ``"lstsq"`` (least squares, the
        minimum-norm interpolant for a singular Gram matrix).

    Attributes (after ``fit``)
    --------------------------
    X_fit_ : (P, ...) training inputs. dual_coef_ : (P,) or (P, k) coefficients ``alpha``.
    jitter_ : diagonal jitter the Cholesky needed (0.0 normally; nan when lstsq was used).
    solver_ : the solver actually used.
    """

    def __init__(self, kernel: Kernel, ridge: float = 0.0, solver: str = "cholesky") -> None:
        self.kernel = kernel
        self.ridge = ridge
        self.solver = solver

    def fit(self, X: Any, y: Any) -> KernelRegressor:
        """Fit on inputs X (P, ...) and targets y (P,) or (P, k); returns self."""
        kernel = _check_kernel(self.kernel)
        ridge = check_float("ridge", self.ridge, low=0.0)
        solver = check_choice("solver", self.solver, ("cholesky", "lstsq"))
        X = _as_inputs("X", X)
        y = _as_targets(y, X)
        K = kernel(X, None)
        if ridge:
            K = K + ridge * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        rhs = y.to(K.dtype) if y.ndim == 2 else y.to(K.dtype)[:, None]
        self.jitter_, self.solver_ = float("nan"), "lstsq"
        alpha = None
        if solver == "cholesky":
            L, jitter = cholesky_solve_factor(K)
            if L is not None:
                alpha = torch.cholesky_solve(rhs, L)
                self.jitter_, self.solver_ = jitter, "cholesky"
        if alpha is None:
            alpha = _lstsq(K, rhs)
        self.X_fit_ = X
        self.dual_coef_ = alpha if y.ndim == 2 else alpha[:, 0]
        return self

    def predict(self, X: Any) -> torch.Tensor:
        """Predictions (n,) or (n, k) at inputs X (n, ...)."""
        if not hasattr(self, "dual_coef_"):
            raise ParameterError("KernelRegressor is not fitted: call fit(X, y) before predict")
        X = _as_inputs("X", X)
        if X.shape[1:] != self.X_fit_.shape[1:]:
            raise ParameterError(f"X must have the trailing shape {tuple(self.X_fit_.shape[1:])} of the "
                                 f"training inputs, got {tuple(X.shape[1:])}")
        return self.kernel(X, self.X_fit_) @ self.dual_coef_

    def score(self, X: Any, y: Any) -> float:
        """Coefficient of determination R^2 of the predictions at X against y (as scikit-learn)."""
        X = _as_inputs("X", X)
        y = _as_targets(y, X).to(torch.float64)
        pred = self.predict(X).to(torch.float64)
        resid = ((y - pred) ** 2).sum()
        total = ((y - y.mean(0)) ** 2).sum()
        return float(1.0 - resid / total) if float(total) > 0 else float("nan")


def _as_inputs(name: str, X: Any) -> torch.Tensor:
    X = torch.as_tensor(X) if not isinstance(X, torch.Tensor) else X
    if X.ndim < 2:
        raise ParameterError(f"{name} must have shape (points, ...) with at least 2 dimensions, got "
                             f"{tuple(X.shape)}")
    return as_data(name, X, ndim=X.ndim, dtype=None)


def _as_targets(y: Any, X: torch.Tensor) -> torch.Tensor:
    y = torch.as_tensor(y) if not isinstance(y, torch.Tensor) else y
    if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
        raise ParameterError(f"y must have shape ({X.shape[0]},) or ({X.shape[0]}, k) to match X, got "
                             f"{tuple(y.shape)}")
    return as_data("y", y, ndim=y.ndim, dtype=None, device=X.device)


def _lstsq(K: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    # gelsd (SVD-based, minimum norm) on CPU; CUDA only has gels (full rank): solve there via eigh instead.
    if K.device.type == "cpu":
        return torch.linalg.lstsq(K, rhs, driver="gelsd").solution
    evals, evecs = torch.linalg.eigh(K)
    cutoff = evals.abs().max() * K.shape[0] * torch.finfo(K.dtype).eps
    inv = torch.where(evals.abs() > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return evecs @ (inv[:, None] * (evecs.T @ rhs))


def gaussian_random_field(kernel: Kernel, X: Any, n_fields: int = 1, seed: int | torch.Generator | None = 0,
                          ) -> torch.Tensor:
    """Draw ``n_fields`` centred Gaussian fields with covariance ``kernel`` jointly at the points X.

    Parameters
    ----------
    kernel : callable ``kernel(X, None) -> (N, N)`` covariance.
    X : (N, ...) points (train and test together, so that both see the same field).
    n_fields : number of independent fields.
    seed : int, ``torch.Generator`` (CPU) or None (fresh randomness). Same seed, same fields.

    Returns
    -------
    (N, n_fields) field values (float64 unless the kernel returns another dtype). The covariance is
    factorised by Cholesky with the smallest jitter of :func:`cholesky_solve_factor` that works (a jitter
    ``eps mean(diag K)`` is white noise of that variance added to the field), else by an eigendecomposition
    with negative eigenvalues clipped to 0.
    """
    kernel = _check_kernel(kernel)
    n_fields = check_int("n_fields", n_fields, low=1)
    X = _as_inputs("X", X)
    gen = make_generator(seed)
    K = kernel(X, None)
    noise = torch.randn(K.shape[0], n_fields, generator=gen, dtype=torch.float64).to(K.device, K.dtype)
    return field_from_covariance(K, noise)


def field_from_covariance(K: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``A @ noise`` with ``A A^T = K``: the Cholesky factor of :func:`cholesky_solve_factor` if one works,
    else ``V sqrt(max(Lambda, 0))`` from an eigendecomposition. ``noise``: (N, k) standard normal."""
    L, _ = cholesky_solve_factor(K)
    if L is not None:
        return L @ noise
    evals, evecs = torch.linalg.eigh(K)
    return evecs @ (evals.clamp_min(0.0).sqrt()[:, None] * (evecs.T @ noise))
