"""Change statistics of forward-backward experiments: reconstruction by level, C_ij, C(r), chi, xi.

Sclocchi, Favero, Wyart, "A phase transition in diffusion models reveals the hierarchical nature of data",
PNAS 122 (2025); Sclocchi, Favero, Levi, Wyart, "Probing the latent hierarchical structure of data via
diffusion models", ICLR 2025.

A forward-backward run starts from data ``x0``, noises them to level ``t`` and draws ``x̂0`` back with a
denoiser, ``n_traj`` times per ``x0``. Everything here works on an array of *changes*

    changes : (n_x0, n_traj, *grid)

where ``grid`` is ``(d,)`` for a sequence or ``(k, k)`` for a patch grid and the entries are either 0/1
(token ``i`` changed, ``sigma_i``) or real (``Delta_i = ||e_i(x0) - e_i(x̂0)|| / sqrt(D)`` for embeddings),
so the RHM runs and the real-model adapters share this code.

* Connected correlations are computed over trajectories at fixed ``x0`` and then averaged over ``x0``:
  ``C_ij = < <s_i s_j>_traj - <s_i>_traj <s_j>_traj >_x0`` (unbiased, ``n_traj - 1`` in the denominator,
  so that a finite number of trajectories gives no bias; needs ``n_traj >= 2``).
* ``C(r)`` averages ``C_ij`` over the pairs at Euclidean distance ``r`` on the grid (``r = |i - j|`` in 1-D);
  distances are grouped exactly (by the integer squared distance), ``r = 0`` is the mean variance.
* Susceptibility ``chi = sum_ij C_ij / sum_i C_ii`` (= 1 for independent changes, = the chunk size when
  changes come in blocks that flip together).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._validation import check_choice, check_float, check_int
from ..errors import ParameterError, ParameterTypeError

__all__ = [
    "token_changes",
    "embedding_changes",
    "level_reconstruction",
    "change_probability",
    "connected_correlations",
    "susceptibility",
    "correlation_by_distance",
    "correlation_length",
    "fit_power_law",
    "crossing_point",
    "peak_location",
    "ChangeStatistics",
]


# --------------------------------------------------------------------------------------------- changes
def token_changes(x0: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """0/1 change indicators ``sigma_i = 1[x̂0_i != x0_i]`` as float64.

    Parameters
    ----------
    x0 : (N, *grid) integer tokens.
    x_hat : (N, *grid) or (N, n_traj, *grid) reconstructions; ``x0`` is broadcast over trajectories.

    Returns
    -------
    (N, *grid) or (N, n_traj, *grid) float64 of 0/1.
    """
    _check_tensor("x0", x0)
    _check_tensor("x_hat", x_hat)
    if x_hat.dim() == x0.dim() + 1:
        x0 = x0.unsqueeze(1)  # (N, 1, *grid): broadcast over trajectories
    if x_hat.dim() != x0.dim() or x_hat.shape[0] != x0.shape[0] or x_hat.shape[2:] != x0.shape[2:]:
        raise ParameterError(f"x_hat must have shape (N, [n_traj,] *grid) matching x0 {tuple(x0.shape)}, "
                             f"got {tuple(x_hat.shape)}")
    return (x_hat != x0).to(torch.float64)


def embedding_changes(e0: torch.Tensor, e_hat: torch.Tensor) -> torch.Tensor:
    """Real-valued changes ``Delta_i = ||e_i(x0) - e_i(x̂0)|| / sqrt(D)`` of token embeddings.

    Parameters
    ----------
    e0 : (N, *grid, D) embeddings of the starting data.
    e_hat : (N, *grid, D) or (N, n_traj, *grid, D) embeddings of the reconstructions.

    Returns
    -------
    (N, *grid) or (N, n_traj, *grid) float64.
    """
    _check_tensor("e0", e0)
    _check_tensor("e_hat", e_hat)
    if e_hat.dim() == e0.dim() + 1:
        e0 = e0.unsqueeze(1)  # (N, 1, *grid, D)
    if e_hat.dim() != e0.dim() or e_hat.shape[-1] != e0.shape[-1]:
        raise ParameterError(f"e_hat must have shape (N, [n_traj,] *grid, D) matching e0 {tuple(e0.shape)}, "
                             f"got {tuple(e_hat.shape)}")
    diff = e_hat.to(torch.float64) - e0.to(torch.float64)
    return diff.norm(dim=-1) / math.sqrt(e0.shape[-1])


def level_reconstruction(tree0: Sequence[torch.Tensor], tree_hat: Sequence[torch.Tensor]) -> torch.Tensor:
    """Probability that the symbol at level ``l`` of ``x̂0`` equals that of ``x0``, for every level.

    Parameters
    ----------
    tree0 : L+1 tensors, ``tree0[l]`` is (N, s**l): the latent tree of the starting data (``RHMSample.tree``).
    tree_hat : L+1 tensors (N, s**l) or (N, n_traj, s**l): the latent trees of the reconstructions (BP's
        posterior samples carry them).

    Returns
    -------
    (L+1,) float64: entry 0 is P(class kept), entry L the probability that a token is unchanged.
    """
    if len(tree0) != len(tree_hat) or len(tree0) == 0:
        raise ParameterError(f"tree0 and tree_hat must hold the same number (>= 1) of levels, "
                             f"got {len(tree0)} and {len(tree_hat)}")
    kept = [1.0 - token_changes(a, b).mean() for a, b in zip(tree0, tree_hat, strict=True)]
    return torch.stack(kept)


def change_probability(changes: torch.Tensor, per_position: bool = False) -> torch.Tensor:
    """Mean change: the token change probability for 0/1 changes, the mean ``Delta`` for embeddings.

    Parameters
    ----------
    changes : (n_x0, n_traj, *grid) (or any shape with the grid last when ``per_position`` is False).
    per_position : return the mean over data and trajectories per position, shape ``grid``.

    Returns
    -------
    0-d float64 tensor, or ``grid``-shaped when ``per_position``.
    """
    _check_tensor("changes", changes)
    changes = changes.to(torch.float64)
    if not per_position:
        return changes.mean()
    _check_changes(changes)
    return changes.mean(dim=(0, 1))


# --------------------------------------------------------------------------------------------- correlations
def connected_correlations(changes: torch.Tensor) -> torch.Tensor:
    """Connected correlations over trajectories at fixed ``x0``, averaged over ``x0``.

    ``C_ij = mean_x0 [ sum_t (s_ti - sbar_i)(s_tj - sbar_j) / (n_traj - 1) ]`` (unbiased per ``x0``).

    Parameters
    ----------
    changes : (n_x0, n_traj, *grid), ``n_traj >= 2``.

    Returns
    -------
    (P, P) float64 with ``P = prod(grid)``; positions are flattened row-major (``i = row * k + col``).
    """
    changes = _check_changes(changes)
    n_x0, n_traj = changes.shape[:2]
    flat = changes.reshape(n_x0, n_traj, -1).to(torch.float64)  # (n_x0, n_traj, P)
    centred = flat - flat.mean(dim=1, keepdim=True)
    return torch.einsum("ntp,ntq->pq", centred, centred) / (n_x0 * (n_traj - 1))


def susceptibility(C: torch.Tensor, grid: Sequence[int] | None = None, r_max: float | None = None) -> float:
    """``chi = sum_ij C_ij / sum_i C_ii`` of a (P, P) correlation matrix; NaN when nothing fluctuates.

    Parameters
    ----------
    C : (P, P) correlations.
    grid : positions' grid shape (default ``(P,)``), used only with ``r_max``.
    r_max : if given, sum only the pairs at distance ``<= r_max`` (the text protocol of the ICLR paper
        uses ``r <= 10``), which keeps far, noisy pairs out of long sequences.
    """
    C = _check_square(C)
    diag = float(C.diagonal().sum())
    if diag <= 0.0:
        return float("nan")
    if r_max is None:
        return float(C.sum()) / diag
    r_max = check_float("r_max", r_max, low=0.0)
    grid = (C.shape[0],) if grid is None else tuple(grid)
    if math.prod(grid) != C.shape[0]:
        raise ParameterError(f"grid must have prod(grid) == P = {C.shape[0]}, got grid={grid}")
    near = _squared_distances(grid) <= r_max * r_max + 1e-9
    return float(C[near].sum()) / diag


def _squared_distances(grid: Sequence[int]) -> torch.Tensor:
    """(P, P) integer squared Euclidean distances between the points of a row-major grid."""
    axes = [torch.arange(n) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))  # (P, dim)
    diff = coords[:, None, :] - coords[None, :, :]  # (P, P, dim)
    return (diff * diff).sum(dim=-1)


def correlation_by_distance(
    C: torch.Tensor, grid: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``C(r)``: the mean of ``C_ij`` over the pairs of positions at Euclidean distance ``r``.

    Parameters
    ----------
    C : (P, P) correlations (e.g. from :func:`connected_correlations`).
    grid : shape of the positions, row-major: ``(P,)`` (default, a sequence) or ``(k, k)`` for a patch grid.

    Returns
    -------
    r : (n_r,) float64 distinct distances, ascending, starting at 0.
    C_r : (n_r,) float64 mean correlation at each distance (``C_r[0]`` is the mean variance).
    """
    C = _check_square(C)
    P = C.shape[0]
    grid = (P,) if grid is None else tuple(check_int("grid entry", g, low=1) for g in grid)
    if math.prod(grid) != P:
        raise ParameterError(f"grid must have prod(grid) == P = {P}, got grid={grid}")
    sq = _squared_distances(grid).reshape(-1)  # (P*P,)
    sums = torch.bincount(sq, weights=C.reshape(-1).to(torch.float64))
    counts = torch.bincount(sq)
    present = counts > 0
    r = torch.arange(sums.numel(), dtype=torch.float64)[present].sqrt()
    return r, sums[present] / counts[present]


def correlation_length(
    r: torch.Tensor, C_r: torch.Tensor, method: str = "moment", r_max: float | None = None
) -> float:
    """A correlation-length estimate from ``C(r)``.

    Parameters
    ----------
    r, C_r : (n_r,) distances (ascending, ``r[0] = 0``) and correlations, e.g. from
        :func:`correlation_by_distance`.
    method :
        ``"moment"``: ``xi = sum_r r C+(r) / sum_r C+(r)`` over ``r <= r_max`` with ``C+ = max(C, 0)``
        (for ``C(r) = q**r`` on integers it is ``q / (1 - q)``; for a power law it grows with ``r_max``);
        ``"threshold"``: the distance where ``C(r) / C(0)`` first falls below ``1/e``, interpolating
        ``log C`` linearly between neighbouring distances (exact for ``C(r) = exp(-r / xi)``); ``inf`` if
        it never does within ``r_max``.
    r_max : largest distance used (default: all).

    Returns
    -------
    float, in the units of ``r`` (tokens or patches); NaN when ``C(0) <= 0``.
    """
    check_choice("method", method, ("moment", "threshold"))
    r = torch.as_tensor(r, dtype=torch.float64)
    C_r = torch.as_tensor(C_r, dtype=torch.float64)
    if r.dim() != 1 or r.shape != C_r.shape or r.numel() == 0:
        raise ParameterError(f"r and C_r must be 1-D of the same non-zero length, got {tuple(r.shape)} "
                             f"and {tuple(C_r.shape)}")
    if r_max is not None:
        r_max = check_float("r_max", r_max, low=0.0)
        keep = r <= r_max
        r, C_r = r[keep], C_r[keep]
    if float(C_r[0]) <= 0.0:
        return float("nan")
    if method == "moment":
        pos = C_r.clamp(min=0.0)
        return float((r * pos).sum() / pos.sum())
    ratio = C_r / C_r[0]
    below = torch.nonzero(ratio < math.exp(-1.0)).flatten()
    if below.numel() == 0:
        return float("inf")
    k = int(below[0])
    lo, hi = math.log(float(ratio[k - 1])), float(ratio[k])
    if hi <= 0.0:  # log undefined: interpolate C itself
        frac = (float(ratio[k - 1]) - math.exp(-1.0)) / (float(ratio[k - 1]) - hi)
    else:
        frac = (lo + 1.0) / (lo - math.log(hi))
    return float(r[k - 1] + frac * (r[k] - r[k - 1]))


def fit_power_law(
    r: torch.Tensor, C_r: torch.Tensor, r_min: float = 1.0, r_max: float | None = None
) -> tuple[float, float]:
    """Least-squares fit of ``C(r) = A r**(-a)`` in log-log over ``r_min <= r <= r_max`` with ``C(r) > 0``.

    Returns
    -------
    (a, A): the decay exponent (``a = 1`` for ``C ~ 1/r``) and the prefactor. Raises ValueError when
    fewer than two usable points remain.
    """
    r = torch.as_tensor(r, dtype=torch.float64)
    C_r = torch.as_tensor(C_r, dtype=torch.float64)
    r_min = check_float("r_min", r_min, low=0.0, low_open=True)
    keep = (r >= r_min) & (C_r > 0)
    if r_max is not None:
        keep &= r <= check_float("r_max", r_max, low=r_min)
    if int(keep.sum()) < 2:
        raise ParameterError(f"fit_power_law needs >= 2 points with r in [{r_min}, {r_max}] and C(r) > 0, "
                             f"got {int(keep.sum())}")
    x, y = r[keep].log(), C_r[keep].log()
    xm, ym = x.mean(), y.mean()
    slope = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    return float(-slope), float((ym - slope * xm).exp())


def crossing_point(levels: Sequence[float], values: Sequence[float], target: float) -> float:
    """The first noise level where a curve crosses ``target``, by linear interpolation.

    Parameters
    ----------
    levels : (n,) increasing noise levels.
    values : (n,) the measured curve (e.g. P(class kept)); NaN entries are skipped.
    target : the value whose crossing is sought (e.g. 1/2).

    Returns
    -------
    float: the interpolated level of the first sign change of ``values - target``; NaN if none.
    """
    x = torch.as_tensor(levels, dtype=torch.float64)
    y = torch.as_tensor(values, dtype=torch.float64)
    if x.dim() != 1 or x.shape != y.shape:
        raise ParameterError(f"levels and values must be 1-D of the same length, got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
    keep = ~torch.isnan(y)
    x, y = x[keep], y[keep] - float(target)
    for k in range(x.numel() - 1):
        if y[k] == 0:
            return float(x[k])
        if y[k] * y[k + 1] < 0:
            return float(x[k] + (x[k + 1] - x[k]) * y[k] / (y[k] - y[k + 1]))
    if x.numel() and y[-1] == 0:
        return float(x[-1])
    return float("nan")


def peak_location(levels: Sequence[float], values: Sequence[float]) -> float:
    """Location of the maximum of a sampled curve, refined by a parabola through the top three points.

    Returns the level of the largest value when it sits at an end of the range (no refinement possible).
    """
    x = torch.as_tensor(levels, dtype=torch.float64)
    y = torch.as_tensor(values, dtype=torch.float64)
    if x.dim() != 1 or x.shape != y.shape or x.numel() == 0:
        raise ParameterError(
            f"levels and values must be 1-D of the same non-zero length, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    y = torch.nan_to_num(y, nan=-math.inf)
    k = int(torch.argmax(y))
    if k == 0 or k == x.numel() - 1:
        return float(x[k])
    x0, x1, x2 = (float(x[k + j]) for j in (-1, 0, 1))
    y0, y1, y2 = (float(y[k + j]) for j in (-1, 0, 1))
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a >= 0:
        return x1
    return min(max(-b / (2 * a), x0), x2)


# --------------------------------------------------------------------------------------------- streaming
class ChangeStatistics:
    """Streaming accumulator of change statistics: feed blocks of changes, read the observables.

    Memory is ``O(P**2)`` whatever the number of data and trajectories, so long runs need not keep every
    trajectory. Feeding the blocks one by one gives exactly what the one-shot functions give on the
    concatenated array.

    Parameters
    ----------
    grid : shape of the positions, ``(d,)`` or ``(k, k)``.

    Example
    -------
    >>> stats = ChangeStatistics((8,))
    >>> stats.update(torch.randint(0, 2, (4, 16, 8)).double())
    >>> stats.C.shape, stats.n_x0
    (torch.Size([8, 8]), 4)
    """

    def __init__(self, grid: Sequence[int]) -> None:
        self.grid = tuple(check_int("grid entry", g, low=1) for g in grid)
        P = math.prod(self.grid)
        self.n_x0 = 0
        self.n_samples = 0
        self._sum_mean = torch.zeros(P, dtype=torch.float64)  # sum over x0 of per-x0 mean changes
        self._sum_C = torch.zeros(P, P, dtype=torch.float64)  # sum over x0 of per-x0 covariances

    def update(self, changes: torch.Tensor) -> None:
        """Add a block ``changes`` of shape (n_x0, n_traj, *grid), ``n_traj >= 2``."""
        changes = _check_changes(changes)
        if tuple(changes.shape[2:]) != self.grid:
            raise ParameterError(f"changes must have grid shape {self.grid}, got {tuple(changes.shape[2:])}")
        n_x0, n_traj = changes.shape[:2]
        flat = changes.reshape(n_x0, n_traj, -1).to(torch.float64)  # (n_x0, n_traj, P)
        self._sum_mean += flat.mean(dim=1).sum(dim=0)
        self._sum_C += connected_correlations(changes) * n_x0
        self.n_x0 += n_x0
        self.n_samples += n_x0 * n_traj

    def _need_data(self) -> None:
        if self.n_x0 == 0:
            raise ParameterError("ChangeStatistics has no data yet: call update() first")

    @property
    def change_probability(self) -> float:
        """Mean change over data, trajectories and positions."""
        self._need_data()
        return float(self._sum_mean.mean() / self.n_x0)

    @property
    def mean_change(self) -> torch.Tensor:
        """Mean change per position, shape ``grid``."""
        self._need_data()
        return (self._sum_mean / self.n_x0).reshape(self.grid)

    @property
    def C(self) -> torch.Tensor:
        """(P, P) connected correlations averaged over ``x0``."""
        self._need_data()
        return self._sum_C / self.n_x0

    @property
    def chi(self) -> float:
        """Susceptibility ``sum_ij C_ij / sum_i C_ii``."""
        return susceptibility(self.C)

    def chi_within(self, r_max: float) -> float:
        """Susceptibility over the pairs at distance ``<= r_max``."""
        return susceptibility(self.C, self.grid, r_max)

    def C_of_r(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, C(r))`` on the grid, see :func:`correlation_by_distance`."""
        return correlation_by_distance(self.C, self.grid)

    def summary(self, r_max: float | None = None) -> dict[str, object]:
        """Key numbers as plain Python values: change probability, chi, xi (moment), r and C(r).

        With ``r_max`` the correlation length uses ``r <= r_max`` and ``chi_r_max`` is added.
        """
        r, C_r = self.C_of_r()
        extra = {} if r_max is None else {"chi_r_max": self.chi_within(r_max)}
        return {
            "change_probability": self.change_probability,
            "chi": self.chi,
            **extra,
            "xi": correlation_length(r, C_r, "moment", r_max=r_max),
            "r": r.tolist(),
            "C_r": C_r.tolist(),
            "n_x0": self.n_x0,
            "n_samples": self.n_samples,
        }


# --------------------------------------------------------------------------------------------- checks
def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ParameterTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_changes(changes: object) -> torch.Tensor:
    changes = _check_tensor("changes", changes)
    if changes.dim() < 3:
        raise ParameterError(f"changes must have shape (n_x0, n_traj, *grid), got {tuple(changes.shape)}")
    if changes.shape[1] < 2:
        raise ParameterError(f"changes need n_traj >= 2 trajectories per x0 for correlations, "
                             f"got {changes.shape[1]}")
    if changes.shape[0] < 1:
        raise ParameterError("changes must hold at least one x0 (n_x0 >= 1), got 0")
    return changes


def _check_square(C: object) -> torch.Tensor:
    C = _check_tensor("C", C)
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ParameterError(f"C must be a square (P, P) matrix, got shape {tuple(C.shape)}")
    return C.to(torch.float64)
