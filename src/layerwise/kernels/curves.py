"""Teacher-student learning curves, power-law exponent fits and Gram spectra.

A learning curve draws, for each seed, ``max(P_list) + n_test`` inputs, a teacher field (a Gaussian
random field with the teacher kernel as covariance) jointly on all of them, and fits the student kernel by
ridge(less) regression on the first ``P`` points for every ``P`` of ``P_list`` (nested training sets),
measuring the mean squared error on the ``n_test`` held-out points.

Because training sets are nested, one Cholesky factor of the largest training Gram matrix serves every
``P`` (the factor of a leading block is the leading block of the factor), and each kernel's Gram matrix is
computed once per seed on all points and shared by every teacher/student pair that uses it.

>>> import torch
>>> from functools import partial
>>> from layerwise.kernels import laplace, learning_curve, fit_exponent, hypercube
>>> k = partial(laplace, sigma=1.0)
>>> curve = learning_curve(k, k, [16, 32, 64], n_test=64, seeds=[0, 1], sampler=hypercube(2))
>>> curve.mse.shape
torch.Size([3, 2])
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._device import resolve_device
from .._resources import check_memory
from ..errors import ParameterError, ParameterTypeError, ResourceError
from ._checks import as_data, check_float, check_int
from .data import Sampler
from .regression import Kernel, cholesky_solve_factor, field_from_covariance

__all__ = ["LearningCurve", "ExponentFit", "learning_curve", "fit_exponent", "kernel_spectrum"]

@dataclass(frozen=True)
class LearningCurve:
    """Test MSE of one teacher/student pair: ``mse[i, j]`` at ``P[i]`` training points and ``seeds[j]``."""

    P: tuple[int, ...]
    seeds: tuple[int, ...]
    mse: torch.Tensor  # (len(P), len(seeds)) float64

    def mean(self) -> torch.Tensor:
        """Mean test MSE over seeds, (len(P),)."""
        return self.mse.mean(1)

    def fit(self, **kw: Any) -> ExponentFit:
        """:func:`fit_exponent` of this curve."""
        return fit_exponent(self.P, self.mse, **kw)


@dataclass(frozen=True)
class ExponentFit:
    """``err ~ prefactor * P**(-beta)``, with a confidence interval ``[low, high]`` for beta.

    ``stderr`` is the standard error behind the interval, ``n_seeds`` the number of independent curves and
    ``level`` the confidence level.
    """

    beta: float
    low: float
    high: float
    prefactor: float
    stderr: float
    n_seeds: int
    level: float

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the confidence interval ``[low, high]``."""
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.beta:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _slope(logP: torch.Tensor, logE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares slope and intercept of logE (..., n) against logP (n,)."""
    xc = logP - logP.mean()
    slope = (xc * (logE - logE.mean(-1, keepdim=True))).sum(-1) / (xc * xc).sum()
    return slope, logE.mean(-1) - slope * logP.mean()


def _t_cdf(x: float, dof: int) -> float:
    """Student-t CDF for an integer ``dof`` >= 1, by its closed form in ``theta = atan(x / sqrt(dof))``
    (Abramowitz & Stegun 26.7.3-4); exact up to round-off, and no scipy import (0.8 s) on the quick path."""
    theta = math.atan(x / math.sqrt(dof))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if dof % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ...))
        term, total = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    return (1 + a) / 2


@functools.lru_cache(maxsize=64)
def _t_quantile(q: float, dof: int) -> float:
    """Quantile ``q`` in (0.5, 1) of Student's t with ``dof`` degrees of freedom (bisection on the CDF)."""
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, dof) < q:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf(mid, dof) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return (lo + hi) / 2


def fit_exponent(P: Sequence[int] | torch.Tensor, err: Any, *, level: float = 0.95) -> ExponentFit:
    """Fit ``err ~ C P**(-beta)`` by least squares of ``log(mean error over seeds)`` against ``log P``.

    Parameters
    ----------
    P : (n,) training-set sizes (> 0, at least 2 distinct).
    err : (n,) errors, or (n, n_seeds) errors per seed (positive). Each seed must be an independent
        realisation of everything random in the curve -- training inputs, teacher *and test set* (as
        :func:`learning_curve` draws them) -- so that seed-to-seed scatter contains the test-set noise.
    level : confidence level of the interval (default 95%).

    Returns
    -------
    ExponentFit with ``beta`` (from all seeds), the interval ``[low, high]``, its ``stderr`` and
    ``prefactor``.

    Notes
    -----
    With several seeds the interval is ``beta +- t_{n_seeds - 1} * stderr`` where ``stderr`` is the
    leave-one-seed-out jackknife standard error of ``beta`` (each seed's whole curve is left out at once,
    so the correlation between the points of one curve -- shared training and test sets -- is kept).
    The Student-t quantile keeps the coverage near ``level`` with as few as 3-4 seeds, where a percentile
    bootstrap over seeds is far too narrow. With one seed the interval is the least-squares one from the
    scatter of the points around the line (``n - 2`` degrees of freedom; infinite for 2 points): it ignores
    the curve-to-curve fluctuations and should not be used to judge a claim.
    """
    P = as_data("P", P, ndim=1, dtype=torch.float64).cpu()
    err = torch.as_tensor(err, dtype=torch.float64).cpu()
    if err.ndim == 1:
        err = err[:, None]
    if err.ndim != 2 or err.shape[0] != P.shape[0]:
        raise ParameterError(f"err must have shape ({P.shape[0]},) or ({P.shape[0]}, n_seeds), got "
                             f"{tuple(err.shape)}")
    if not bool((P > 0).all()) or len(torch.unique(P)) < 2:
        raise ParameterError(f"P must hold positive sizes with at least 2 distinct values, got {P.tolist()}")
    if not bool(torch.isfinite(err).all()) or not bool((err > 0).all()):
        raise ParameterError("err must be positive and finite (log-log fit)")
    level = check_float("level", level, low=0.0, low_open=True)
    if level >= 1:
        raise ParameterError(f"level must be in (0, 1), got {level}")
    logP = P.log()
    slope, intercept = _slope(logP, err.mean(1).log())  # log of the mean, never the mean of the logs
    n_p, n_s = err.shape
    q = (1 + level) / 2
    if n_s > 1:
        # Leave-one-seed-out curves: (sum - err_j) / (n_s - 1), (n_s, n_P).
        loo = ((err.sum(1, keepdim=True) - err) / (n_s - 1)).T.log()
        jack = _slope(logP, loo)[0]
        stderr = float(((n_s - 1) / n_s * ((jack - jack.mean()) ** 2).sum()).sqrt())
        half = _t_quantile(q, n_s - 1) * stderr
    elif n_p > 2:
        resid = err[:, 0].log() - (intercept + slope * logP)
        xc = logP - logP.mean()
        stderr = float(((resid**2).sum() / (n_p - 2) / (xc * xc).sum()).sqrt())
        half = _t_quantile(q, n_p - 2) * stderr
    else:
        stderr = half = math.inf
    beta = -float(slope)
    return ExponentFit(beta=beta, low=beta - half, high=beta + half, prefactor=math.exp(float(intercept)),
                       stderr=stderr, n_seeds=n_s, level=level)


def kernel_spectrum(kernel: Kernel, X: Any) -> torch.Tensor:
    """Eigenvalues of the Gram matrix divided by the number of points, in decreasing order.

    X : (P, ...) points; returns (P,) float64 (estimates of the kernel's Mercer eigenvalues under the data
    distribution, accurate for the leading ones).
    """
    if not callable(kernel):
        raise ParameterTypeError(f"kernel must be callable, got {kernel!r}")
    X = torch.as_tensor(X)
    K = kernel(X, None)
    return torch.linalg.eigvalsh(K.to(torch.float64)).flip(0) / K.shape[0]


#: Default cap on the number of seeds of one learning curve (a curve's spread needs tens of seeds).
MAX_SEEDS = 10_000


def _check_seed_count(n_seeds: int, n_sizes: int, n_pairs: int, max_seeds: int) -> None:
    if n_seeds > max_seeds:
        solves = n_seeds * n_sizes * n_pairs
        raise ResourceError(f"seeds has {n_seeds} entries, over the cap of {max_seeds}: the curve would run "
                            f"{solves:.3g} regressions ({n_seeds} seeds x {n_sizes} sizes x {n_pairs} "
                            f"teacher/student pair(s)) and write as many rows; tens of seeds give the "
                            "spread of a curve; use fewer seeds or raise the cap (max_seeds; config key "
                            "max_seeds)")


def _check_time(first: float, n_seeds: int, max_seconds: float) -> None:
    estimate = first * n_seeds
    if estimate > max_seconds:
        raise ResourceError(f"a learning curve over {n_seeds} seeds would take about {estimate:.3g} s "
                            f"({estimate / 3600:.3g} h; first seed: {first:.3g} s), over the limit of "
                            f"{max_seconds:.3g} s; use fewer seeds or smaller sizes, or raise the limit "
                            "(max_seconds; config key max_hours)")


def _named(name: str, value: Any) -> tuple[dict[str, Kernel], bool]:
    if isinstance(value, Mapping):
        if not value:
            raise ParameterError(f"{name} must not be an empty mapping")
        bad = [k for k, v in value.items() if not callable(v)]
        if bad:
            raise ParameterTypeError(f"{name}[{bad[0]!r}] must be a callable kernel")
        return dict(value), True
    if not callable(value):
        raise ParameterTypeError(f"{name} must be a callable kernel(X, Y) or a mapping name -> kernel, got "
                                 f"{value!r}")
    return {name: value}, False


def _cached_gram(cache: dict[int, torch.Tensor], X: torch.Tensor, k: Kernel) -> torch.Tensor:
    if id(k) not in cache:
        cache[id(k)] = k(X, None).to(torch.float64)
    return cache[id(k)]


def learning_curve(
    teacher: Kernel | Mapping[str, Kernel],
    student: Kernel | Mapping[str, Kernel],
    P_list: Sequence[int],
    n_test: int,
    seeds: Sequence[int],
    sampler: Sampler,
    *,
    ridge: float = 0.0,
    device: torch.device | str | None = None,
    progress: bool = False,
    max_seconds: float | None = None,
    max_seeds: int | None = MAX_SEEDS,
) -> LearningCurve | dict[tuple[str, str], LearningCurve]:
    """Test MSE of kernel regression of a teacher field by a student kernel, per training size and seed.

    The memory of one seed (inputs, one ``(N, N)`` float64 Gram matrix per distinct kernel, the Cholesky
    factor; ``N = max(P_list) + n_test``) is checked before anything is drawn (``ResourceError``).

    Parameters
    ----------
    teacher, student : kernel callables ``k(X, Y=None) -> Gram``, or mappings name -> kernel to run all
        teacher x student pairs on the same inputs and teacher draws (Gram matrices of a kernel object used
        several times are computed once per seed).
    P_list : increasing training-set sizes (>= 1).
    n_test : held-out test points (>= 1).
    seeds : one run per seed (inputs, teacher field); same seed, same numbers.
    sampler : ``sampler(n, generator) -> (n, ...)`` inputs, e.g. :func:`layerwise.kernels.hypercube`.
    ridge : ``>= 0`` added to the training Gram diagonal (0: ridgeless).
    device : where Gram matrices and solves run (default CPU); inputs and fields are drawn on CPU.
    progress : show a tqdm progress bar over seeds and pairs.
    max_seconds : refuse (``ResourceError``, with the estimate) when the time of the first seed times the
        number of seeds exceeds this; None: no limit.
    max_seeds : refuse (``ResourceError``, with the number of regressions) more seeds than this, before
        any work (default :data:`MAX_SEEDS`); None: no cap.

    Returns
    -------
    :class:`LearningCurve` for single kernels; for mappings, a dict ``(teacher, student) -> LearningCurve``.
    """
    teachers, t_map = _named("teacher", teacher)
    students, s_map = _named("student", student)
    if isinstance(P_list, (str, bytes)) or not isinstance(P_list, Sequence) or not P_list:
        raise ParameterTypeError(f"P_list must be a non-empty sequence of ints, got {P_list!r}")
    P = tuple(check_int(f"P_list[{i}]", p, low=1) for i, p in enumerate(P_list))
    if any(b <= a for a, b in zip(P, P[1:], strict=False)):
        raise ParameterError(f"P_list must be strictly increasing, got {list(P)}")
    n_test = check_int("n_test", n_test, low=1)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ParameterTypeError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    if max_seeds is not None:
        _check_seed_count(len(seeds), len(P), len(teachers) * len(students),
                          check_int("max_seeds", max_seeds, low=1))
    seeds = tuple(check_int(f"seeds[{i}]", s, low=0) for i, s in enumerate(seeds))
    ridge = check_float("ridge", ridge, low=0.0)
    if not callable(sampler):
        raise ParameterTypeError(f"sampler must be a callable sampler(n, generator), got {sampler!r}")
    device = resolve_device(device)
    if max_seconds is not None:
        max_seconds = check_float("max_seconds", max_seconds, low=0.0, low_open=True)
    p_max = P[-1]
    n_all = p_max + n_test
    n_kernels = len({id(k) for k in (*teachers.values(), *students.values())})
    check_memory(8 * (n_all * n_all * (n_kernels + 1) + p_max * p_max * (1 + (ridge > 0))),
                 f"a learning curve with max(P) = {p_max}, n_test = {n_test} and {n_kernels} kernel(s) "
                 f"({n_all} x {n_all} float64 Gram matrices)", device)
    pairs = [(t, s) for t in teachers for s in students]
    mse = {pair: torch.empty(len(P), len(seeds), dtype=torch.float64) for pair in pairs}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds) * len(pairs), desc="learning curve", leave=False)
    clock = time.perf_counter()
    for j, seed in enumerate(seeds):
        if j == 1 and max_seconds is not None:
            _check_time(time.perf_counter() - clock, len(seeds), max_seconds)
        gen = torch.Generator().manual_seed(seed)
        X = as_data("sampler output", sampler(p_max + n_test, gen), ndim=None, dtype=None)
        if X.shape[0] != p_max + n_test:
            raise ParameterError(f"sampler returned {X.shape[0]} points, asked for {p_max + n_test}")
        X = X.to(device)
        grams: dict[int, torch.Tensor] = {}
        gram = functools.partial(_cached_gram, grams, X)
        fields = {}
        for name, k in teachers.items():
            noise = torch.randn(p_max + n_test, 1, generator=gen, dtype=torch.float64).to(device)
            fields[name] = field_from_covariance(gram(k), noise)  # (N, 1)
        student_ids = {id(k) for k in students.values()}
        for k in teachers.values():  # free teacher-only Gram matrices before the students' solves
            if id(k) not in student_ids:
                grams.pop(id(k), None)
        for s_name, k in students.items():
            K = gram(k)
            train = K[:p_max, :p_max]
            if ridge:
                train = train + ridge * torch.eye(p_max, dtype=K.dtype, device=K.device)
            L, _ = cholesky_solve_factor(train)
            for t_name in teachers:
                y = fields[t_name]
                for i, p in enumerate(P):
                    if L is not None:
                        alpha = torch.cholesky_solve(y[:p], L[:p, :p])
                    else:
                        alpha = torch.linalg.lstsq(train[:p, :p].cpu(), y[:p].cpu(), driver="gelsd").solution
                        alpha = alpha.to(device)
                    pred = K[p_max:, :p] @ alpha
                    mse[(t_name, s_name)][i, j] = float(((pred - y[p_max:]) ** 2).mean())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(seed=seed, teacher=t_name, student=s_name)
    if bar is not None:
        bar.close()
    curves = {pair: LearningCurve(P, seeds, m) for pair, m in mse.items()}
    if not t_map and not s_map:
        return curves[pairs[0]]
    return curves
