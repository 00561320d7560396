"""Spectral (eigenlearning) theory of kernel ridge(less) regression: the predicted learning curve.

For a kernel with Mercer eigenvalues ``lambda_i`` under the input distribution and a target whose
coefficients on the eigenfunctions have mean squares ``v_i^2``, kernel regression on ``P`` samples with
ridge ``delta`` (added to the diagonal of the ``P x P`` Gram matrix, as :func:`.learning_curve` does) has,
in the spectral / Gaussian-equivalence description of Bordelon, Canatar & Pehlevan (ICML 2020), Canatar,
Bordelon & Pehlevan (Nat. Commun. 2021) and Simon et al. ("eigenlearning", TMLR 2023), the test MSE::

    P = sum_i lambda_i / (lambda_i + kappa) + delta / kappa          (defines kappa >= 0)
    L_i = lambda_i / (lambda_i + kappa)                              (learnability of mode i)
    E0 = P / (P - sum_i L_i^2)
    MSE(P) = E0 (sum_i (1 - L_i)^2 v_i^2 + noise)

It is exact for isotropic Gaussian features and accurate whenever many modes matter; it is what the
asymptotic exponents of the teacher-student papers are derived from, so comparing it with measured
curves at the *same* finite P separates "the code is wrong" from "this P range is pre-asymptotic".

From ``N`` sample points, :func:`spectral_decomposition` estimates ``lambda_i`` as the eigenvalues of
``K_student / N`` and ``v_i^2`` for a Gaussian-random-field teacher of covariance ``K_teacher`` as
``u_i^T K_teacher u_i / N`` (``u_i`` the unit eigenvectors): the theory then describes sampling from
those N points, close to the population for ``P`` well below ``N``: modes beyond ``N`` are missing and
the last estimated ones are lumped, so a ridgeless prediction reaches 0 at ``P = N``.
:func:`tail_as_ridge` keeps the leading modes and replaces the rest by what they do when their
eigenvalues are far below ``kappa``: their eigenvalue mass acts as a ridge and their target power is
unlearnt (as label noise).

>>> import torch
>>> lam = torch.full((10,), 0.1, dtype=torch.float64)   # 10 equal modes, target power 1 in total
>>> [round(v, 12) for v in predicted_learning_curve(lam, lam, [2, 5]).tolist()]  # exact: 1 - P/10
[0.8, 0.5]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import ParameterError
from ._checks import as_data, check_float, check_int

__all__ = ["eigenlearning_kappa", "predicted_learning_curve", "spectral_decomposition", "tail_as_ridge"]


def _spectrum(eigenvalues: Any, target_power: Any) -> tuple[torch.Tensor, torch.Tensor]:
    lam = as_data("eigenvalues", eigenvalues, ndim=1, dtype=torch.float64).cpu()
    v2 = as_data("target_power", target_power, ndim=1, dtype=torch.float64).cpu()
    if v2.shape != lam.shape:
        raise ParameterError(f"target_power must have the shape of eigenvalues {tuple(lam.shape)}, got "
                             f"{tuple(v2.shape)}")
    # Round-off in an eigendecomposition leaves tiny negative values: clip those, refuse real negatives.
    floor = -1e-10 * float(lam.abs().max())
    if bool((lam < floor).any()) or bool((v2 < -1e-10 * float(v2.abs().max())).any()):
        raise ParameterError("eigenvalues and target_power must be >= 0 (a kernel is positive semi-definite)")
    return lam.clamp_min(0.0), v2.clamp_min(0.0)


def eigenlearning_kappa(eigenvalues: Any, P: int, ridge: float = 0.0) -> float:
    """The effective regularisation ``kappa`` solving ``P = sum_i lam_i / (lam_i + kappa) + ridge / kappa``.

    eigenvalues : (M,) Mercer eigenvalues (>= 0). P : training-set size (>= 1). ridge : ``>= 0``.
    Returns 0.0 for ridgeless regression with ``P >=`` the number of positive eigenvalues (interpolation
    of every mode). Solved by bisection on ``log kappa`` to relative precision ~1e-13.
    """
    lam = as_data("eigenvalues", eigenvalues, ndim=1, dtype=torch.float64).cpu()
    lam = _spectrum(lam, torch.zeros_like(lam))[0]
    P = check_int("P", P, low=1)
    ridge = check_float("ridge", ridge, low=0.0)
    rank = int((lam > 0).sum())
    if ridge == 0.0 and P >= rank:
        return 0.0

    def excess(kappa: float) -> float:  # decreasing in kappa
        return float((lam / (lam + kappa)).sum()) + ridge / kappa - P

    hi = 2.0 * (float(lam.sum()) + ridge) / P  # excess(hi) <= (sum lam + ridge) / hi - P = -P/2 < 0
    lo = hi
    for _ in range(400):
        lo *= 1e-3
        if excess(lo) > 0:
            break
    else:  # pragma: no cover - needs eigenvalues spanning more than 1e1200
        return 0.0
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-13:
            break
    return (lo * hi) ** 0.5


def predicted_learning_curve(eigenvalues: Any, target_power: Any, P_list: Sequence[int], *,
                             ridge: float = 0.0, noise: float = 0.0) -> torch.Tensor:
    """Predicted test MSE of kernel ridge(less) regression for each training-set size of ``P_list``.

    Parameters
    ----------
    eigenvalues : (M,) Mercer eigenvalues ``lambda_i`` of the student kernel (>= 0).
    target_power : (M,) mean squared target coefficients ``v_i^2`` on the same eigenfunctions (>= 0);
        their sum is the target's variance.
    P_list : training-set sizes (>= 1).
    ridge : ``delta >= 0`` added to the diagonal of the ``P x P`` training Gram matrix.
    noise : variance of label noise (>= 0); 0 for a noiseless teacher.

    Returns
    -------
    (len(P_list),) float64 predicted test MSE (the module docstring gives the formulas). Ridgeless with
    ``P`` equal to the number of positive eigenvalues is the interpolation peak: ``inf`` unless the
    unlearnable part (zero-eigenvalue modes and noise) is exactly 0, then 0.
    """
    lam, v2 = _spectrum(eigenvalues, target_power)
    noise = check_float("noise", noise, low=0.0)
    ridge = check_float("ridge", ridge, low=0.0)
    if isinstance(P_list, (str, bytes)) or not isinstance(P_list, Sequence) or not P_list:
        raise ParameterError(f"P_list must be a non-empty sequence of ints, got {P_list!r}")
    out = []
    for i, p in enumerate(P_list):
        p = check_int(f"P_list[{i}]", p, low=1)
        kappa = eigenlearning_kappa(lam, p, ridge)
        learn = lam / (lam + kappa) if kappa > 0 else (lam > 0).to(lam.dtype)
        residual = float(((1 - learn) ** 2 * v2).sum()) + noise
        denom = p - float((learn**2).sum())
        if denom <= 0:
            out.append(0.0 if residual == 0 else float("inf"))
        else:
            out.append(p / denom * residual)
    return torch.tensor(out, dtype=torch.float64)


def spectral_decomposition(student_gram: Any, teacher_gram: Any) -> tuple[torch.Tensor, Any]:
    """Eigenvalues of the student and the teacher field's power on them, from Gram matrices on N points.

    Parameters
    ----------
    student_gram : (N, N) Gram matrix of the student kernel on N points drawn from the input distribution.
    teacher_gram : (N, N) Gram matrix of the teacher's covariance kernel on the same points, or a mapping
        name -> such Gram matrix (several teachers share one eigendecomposition of the student).

    Returns
    -------
    ``(eigenvalues, target_power)``, both (N,) float64 in decreasing order of eigenvalue
    (``target_power`` is a dict name -> (N,) for a mapping): ``eigenvalues = eig(K_student) / N`` and
    ``target_power_i = u_i^T K_teacher u_i / N`` (``u_i`` unit eigenvectors of ``K_student``), whose sum is
    ``trace(K_teacher) / N``, the teacher's variance. Inputs for :func:`predicted_learning_curve`.
    """
    Ks = as_data("student_gram", student_gram, ndim=2, dtype=torch.float64)
    n = Ks.shape[0]
    many = isinstance(teacher_gram, Mapping)
    teachers = dict(teacher_gram) if many else {"teacher_gram": teacher_gram}
    grams = {}
    for name, K in teachers.items():
        grams[name] = as_data(str(name), K, ndim=2, dtype=torch.float64, device=Ks.device)
        if Ks.shape != (n, n) or grams[name].shape != (n, n):
            raise ParameterError(f"student_gram and {name} must be square of the same size, got "
                                 f"{tuple(Ks.shape)} and {tuple(grams[name].shape)}")
    evals, evecs = torch.linalg.eigh((Ks + Ks.T) / 2)
    evals, evecs = evals.flip(0), evecs.flip(1)
    power = {name: (((Kt @ evecs) * evecs).sum(0) / n).cpu() for name, Kt in grams.items()}
    return (evals / n).cpu(), (power if many else power["teacher_gram"])


def tail_as_ridge(eigenvalues: Any, target_power: Any, n_modes: int, ridge: float = 0.0
                  ) -> dict[str, Any]:
    """Keep the ``n_modes`` largest modes; fold the rest into an effective ridge and an unlearnt power.

    A mode with ``lambda_i << kappa`` contributes ``lambda_i / kappa`` to the equation for ``kappa`` (as a
    ridge ``lambda_i`` does) and its whole power ``v_i^2`` to the error (as label noise does, including the
    ``E0`` factor). So for ``P`` well below ``n_modes``::

        predicted_learning_curve(**tail_as_ridge(lam, v2, n_modes), P_list=...)

    approximates the prediction of the full spectrum while ignoring how the (badly estimated) tail of a
    finite-sample spectrum is distributed over modes.

    Parameters
    ----------
    eigenvalues, target_power : (M,) as for :func:`predicted_learning_curve`, eigenvalues decreasing.
    n_modes : leading modes kept (1 <= n_modes <= M).
    ridge : the regression's own ridge, added to the tail's.

    Returns
    -------
    ``{"eigenvalues": (n_modes,), "target_power": (n_modes,), "ridge": float, "noise": float}``.
    """
    lam, v2 = _spectrum(eigenvalues, target_power)
    n_modes = check_int("n_modes", n_modes, low=1, high=lam.shape[0])
    ridge = check_float("ridge", ridge, low=0.0)
    if bool((lam[:-1] < lam[1:]).any()):
        raise ParameterError("eigenvalues must be in decreasing order")
    return {"eigenvalues": lam[:n_modes], "target_power": v2[:n_modes],
            "ridge": ridge + float(lam[n_modes:].sum()), "noise": float(v2[n_modes:].sum())}
