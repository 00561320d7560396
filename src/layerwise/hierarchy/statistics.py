"""Class-conditional statistics of RHM inputs: exact (transfer matrices) and empirical (counts).

The correlation argument of Cagnetta et al. (PRX 2024): the class-conditional frequency of an input
s-tuple deviates from its class average by a relative amount that shrinks geometrically with depth (the
paper's estimate is ``sqrt(v / m**L)``); a network can detect it once the sampling noise ``sqrt(v n_c / P)``
falls below it, i.e. at ``P ~ n_c m**L``.

Exact frequencies follow the ancestors of one patch: the symbol above the patch at level ``l + 1`` is
drawn from the symbol at level ``l`` through the transfer matrix
``M_l[a, b] = #{rules r of a with child_i = b} / m``
(``i`` the child position on the path), so the class-conditional distributions are products of these
matrices. Because no tuple has two parents, the patch frequency is that of its parent divided by ``m``.
"""

from __future__ import annotations

import torch

from .._validation import check_int
from ..errors import ParameterError
from .rhm import RHM, RHMSample

__all__ = [
    "ancestor_distributions",
    "tuple_class_frequencies",
    "empirical_tuple_class_frequencies",
    "relative_fluctuation",
]


def _path_children(rhm: RHM, patch: int) -> list[int]:
    """Child index taken at each level l = 0..L-2 on the way from the root to the parent of ``patch``."""
    n_patches = rhm.s ** (rhm.L - 1)
    patch = check_int("patch", patch, low=0, high=n_patches - 1)
    # Base-s digits of the patch index, most significant first, are the child indices along the path.
    return [(patch // rhm.s ** (rhm.L - 2 - k)) % rhm.s for k in range(rhm.L - 1)]


def ancestor_distributions(
    rhm: RHM, patch: int = 0, dtype: torch.dtype = torch.float64
) -> list[torch.Tensor]:
    """Exact class-conditional distributions of the ancestors of input patch ``patch``.

    Returns a list of ``L`` tensors; entry ``l`` is ``(n_c, n_l)``: the probability that the level-``l``
    ancestor of the patch is each symbol, given the class (level 0 is the identity over classes).
    """
    q = torch.eye(rhm.n_c, dtype=dtype)  # (n_c, n_c)
    out = [q]
    for level, child in enumerate(_path_children(rhm, patch)):
        table = rhm.rules[level][:, :, child]  # (n_parents, m): child symbol of each rule
        transfer = torch.zeros(table.shape[0], rhm.v, dtype=dtype)
        transfer.scatter_add_(1, table, torch.full(table.shape, 1.0 / rhm.m, dtype=dtype))  # (n_parents, v)
        q = q @ transfer  # (n_c, v)
        out.append(q)
    return out


def tuple_class_frequencies(rhm: RHM, patch: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Exact ``f(mu | class)`` for the s-tuple ``mu`` at input patch ``patch``: ``(n_c, v**s)``.

    Tuples are indexed in base ``v``, first token most significant. Dense in ``v**s``: meant for small
    vocabularies (use :func:`ancestor_distributions` for the fluctuation of large instances).
    """
    parent = ancestor_distributions(rhm, patch, dtype)[-1]  # (n_c, n_{L-1})
    table = rhm.rules[rhm.L - 1]  # (n_{L-1}, m, s)
    powers = rhm.v ** torch.arange(rhm.s - 1, -1, -1)
    tuple_ids = (table * powers).sum(-1)  # (n_{L-1}, m)
    freq = torch.zeros(rhm.n_c, rhm.v**rhm.s, dtype=dtype)
    weights = parent[:, :, None].expand(-1, -1, rhm.m) / rhm.m  # (n_c, n_{L-1}, m)
    freq.scatter_add_(1, tuple_ids.reshape(1, -1).expand(rhm.n_c, -1), weights.reshape(rhm.n_c, -1))
    return freq


def empirical_tuple_class_frequencies(
    sample: RHMSample, v: int, n_c: int, s: int, patch: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Class-conditional frequencies of the tuple at ``patch`` counted in ``sample``: ``(n_c, v**s)``.

    Row ``a`` is the histogram of the tuple over the data of class ``a``, normalised to sum to one
    (rows of classes absent from ``sample`` are zero).
    """
    tokens = sample.tokens[:, patch * s : (patch + 1) * s]  # (N, s)
    powers = v ** torch.arange(s - 1, -1, -1)
    ids = (tokens * powers).sum(-1)  # (N,)
    counts = torch.zeros(n_c, v**s, dtype=dtype)
    counts.index_put_((sample.labels, ids), torch.ones(len(sample), dtype=dtype), accumulate=True)
    totals = counts.sum(1, keepdim=True)
    return counts / totals.clamp_min(1)


def relative_fluctuation(freq: torch.Tensor) -> float:
    """RMS relative deviation of class-conditional frequencies from their class average.

    ``freq`` is ``(n_c, K)`` with rows summing to one. Returns
    ``sqrt( sum_mu fbar(mu) * mean_a (f(mu|a) / fbar(mu) - 1)**2 )`` with ``fbar = mean_a f(.|a)``: the
    class-to-class spread of a feature's frequency, relative to its mean, averaged over features by
    frequency (features never seen carry no weight).
    """
    if freq.ndim != 2:
        raise ParameterError(f"freq must be 2-D (n_c, K), got shape {tuple(freq.shape)}")
    mean = freq.mean(0)  # (K,)
    seen = mean > 0
    ratio = freq[:, seen] / mean[seen]  # (n_c, K_seen)
    var = ((ratio - 1.0) ** 2).mean(0)  # (K_seen,)
    return float((mean[seen] * var).sum().sqrt())
