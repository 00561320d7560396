"""Exact belief propagation on the RHM tree: upward messages, marginals at every level, log-likelihood of
the evidence, and exact joint posterior samples.

Sclocchi, Favero, Wyart, "A phase transition in diffusion models reveals the hierarchical nature of data",
PNAS 122 (2025), Methods ("Belief propagation"). Notation: ``R[a, r, i]`` is the i-th child of rule ``r``
of the parent symbol ``a`` (``rhm.rules[l]``); the prior is a uniform class and a uniform rule (``1/m``) at
every internal node; the evidence at leaf ``i`` is ``e_i(x) ∝ p(x_t,i | x0,i = x)``.

* Up (leaves to root): ``u(a) = (1/m) sum_r prod_i u_i(R[a, r, i])``, ``u`` at a leaf is its evidence.
* Marginal of the root: ``P(c | e) ∝ u_0(c) / n_c``.
* Down, without separate downward messages: given the marginal of a parent, the joint posterior of its
  symbol and rule is ``P(a, r | e) = P(a | e) prod_i u_i(R[a, r, i]) / sum_r' prod_i u_i(R[a, r', i])``
  (the subtree below the rule is conditionally independent of the rest), and since a rule fixes its
  children, ``P(child_i = b | e) = sum_{a, r : R[a, r, i] = b} P(a, r | e)``.
* Posterior sample: root from its marginal, then top-down each node's rule with probability
  ``∝ prod_i u_i(R[a, r, i])`` given its sampled symbol ``a``.

Cost and memory: per level, work ``O(N * nodes * n_parents * m * s)`` -- the rule table is used through
index gathers and scatters over its ``n_parents * m`` rules, never as a dense ``(v, n*m, nodes, s)`` tensor;
the temporary ``(rows, n_parents * m)`` tensors are processed in row chunks of bounded size. Messages are
normalized at every node and the log scales are accumulated into ``log_partition``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import make_generator
from .rhm import RHM, RHMSample

__all__ = ["BPResult", "UpwardMessages", "upward_pass", "belief_propagation", "sample_posterior"]

# Upper bound on the elements of one temporary (rows, n_parents * m) tensor; bounds peak memory.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class UpwardMessages:
    """Normalized upward messages and the log-likelihood of the evidence.

    Attributes
    ----------
    messages : L+1 tensors; ``messages[l]`` is ``(N, s**l, n_l)`` (``n_0 = n_c``, else ``v``), each row
        proportional to ``u(a)`` = the likelihood of the evidence below the node given its symbol ``a``,
        normalized to sum to 1 (all zeros where the evidence is impossible).
    log_partition : (N,) -- ``log sum_x P(x) prod_i e_i(x_i)``; ``-inf`` for impossible evidence.
    """

    messages: tuple[torch.Tensor, ...]
    log_partition: torch.Tensor


@dataclass(frozen=True)
class BPResult:
    """Posterior marginals at every level and the log-likelihood of the evidence.

    Attributes
    ----------
    marginals : L+1 tensors; ``marginals[l]`` is ``(N, s**l, n_l)`` (``n_0 = n_c``, else ``v``), the
        posterior ``P(x_node = a | evidence)``; rows sum to 1 (NaN rows where the evidence is impossible).
    log_partition : (N,) -- ``log sum_x P(x) prod_i e_i(x_i)`` under the RHM prior (uniform class, uniform
        rules); ``-inf`` where the evidence has probability zero.
    """

    marginals: tuple[torch.Tensor, ...]
    log_partition: torch.Tensor


# --------------------------------------------------------------------------------------------- validation
def _check_evidence(rhm: RHM, evidence: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(rhm, RHM):
        raise TypeError(f"rhm must be an RHM, got {type(rhm).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(evidence, torch.Tensor) or not evidence.is_floating_point():
        got = evidence.dtype if isinstance(evidence, torch.Tensor) else type(evidence).__name__
        raise TypeError(f"evidence must be a floating tensor, got {got}")
    if evidence.dim() != 3 or evidence.shape[1:] != (rhm.d, rhm.v):
        raise ValueError(
            f"evidence must have shape (N, d={rhm.d}, v={rhm.v}), got {tuple(evidence.shape)}"
        )
    evidence = evidence.to(dtype)
    if evidence.numel() and not (torch.isfinite(evidence).all() and evidence.min() >= 0):
        raise ValueError("evidence must be finite and nonnegative")
    return evidence


# --------------------------------------------------------------------------------------------- helpers
def _normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize the last axis to sum 1. Returns (normalized, log of the sums); zero rows stay zero."""
    total = x.sum(-1, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return x / safe, total.squeeze(-1).log()


def _chunks(rows: int, width: int) -> list[tuple[int, int]]:
    """Row ranges ``(start, stop)`` such that one chunk holds at most ``_CHUNK_ELEMENTS`` elements of
    ``width`` columns."""
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _rule_products(children: torch.Tensor, flat_rules: torch.Tensor) -> torch.Tensor:
    """``prod_i u_i(R[a, r, i])`` for every rule.

    children : (rows, s, v) -- the upward messages of the s children of each node.
    flat_rules : (s, n_parents * m) -- ``R[a, r, i]`` flattened over ``(a, r)``, child index first.
    Returns (rows, n_parents * m).
    """
    prod = children[:, 0].index_select(1, flat_rules[0])  # (rows, n_parents * m)
    for i in range(1, flat_rules.shape[0]):
        prod.mul_(children[:, i].index_select(1, flat_rules[i]))
    return prod


def _flat_rules(table: torch.Tensor) -> torch.Tensor:
    """(n_parents, m, s) -> (s, n_parents * m), contiguous per child index."""
    n_parents, m, s = table.shape
    return table.reshape(n_parents * m, s).t().contiguous()  # (s, n_parents * m)


# --------------------------------------------------------------------------------------------- upward
def upward_pass(rhm: RHM, evidence: torch.Tensor, dtype: torch.dtype = torch.float64) -> UpwardMessages:
    """Upward (leaves-to-root) messages and the log-likelihood of the evidence.

    Parameters
    ----------
    rhm : the model (its rules).
    evidence : (N, d, v) nonnegative leaf likelihoods ``e_i(a) ∝ p(x_t,i | x0,i = a)``.
    dtype : floating dtype of the computation (default float64).

    Returns
    -------
    UpwardMessages -- normalized messages at every level and ``log_partition`` (N,).
    """
    evidence = _check_evidence(rhm, evidence, dtype)
    n, s, m = evidence.shape[0], rhm.s, rhm.m
    msg, log_z = _normalize(evidence)  # (N, d, v), (N, d)
    log_z = log_z.sum(1)  # (N,)
    messages = [msg]
    for level in range(rhm.L - 1, -1, -1):
        table = rhm.rules[level]  # (n_parents, m, s)
        n_parents = table.shape[0]
        flat = _flat_rules(table)
        nodes = s**level
        children = messages[0].reshape(n * nodes, s, rhm.v)  # (N * nodes, s, v)
        up = torch.empty(n * nodes, n_parents, dtype=dtype)
        for start, stop in _chunks(n * nodes, n_parents * m):
            prod = _rule_products(children[start:stop], flat)  # (rows', n_parents * m)
            up[start:stop] = prod.view(-1, n_parents, m).sum(-1)  # (rows', n_parents)
        up, log_c = _normalize(up)  # (N * nodes, n_parents), (N * nodes,)
        log_z = log_z + log_c.view(n, nodes).sum(1)
        messages.insert(0, up.view(n, nodes, n_parents))  # (N, s**level, n_parents)
    # Prior factors: 1/m per internal node and 1/n_c for the class: Z = (1/n_c) sum_c u_0(c) prod (1/m).
    root_sum = messages[0][:, 0].sum(-1)  # (N,) -- 1, or 0 for impossible evidence
    log_z = log_z + root_sum.log() - rhm.n_internal * torch.log(torch.tensor(float(m), dtype=dtype))
    log_z = log_z - torch.log(torch.tensor(float(rhm.n_c), dtype=dtype))
    return UpwardMessages(messages=tuple(messages), log_partition=log_z)


# --------------------------------------------------------------------------------------------- marginals
def belief_propagation(rhm: RHM, evidence: torch.Tensor, dtype: torch.dtype = torch.float64) -> BPResult:
    """Exact posterior marginals of every node of the RHM tree given leaf evidence.

    Parameters
    ----------
    rhm : the model (its rules); prior = uniform class and uniform rule at every internal node.
    evidence : (N, d, v) nonnegative leaf likelihoods ``e_i(a) ∝ p(x_t,i | x0,i = a)``, e.g. from
        :meth:`layerwise.hierarchy.noise.NoiseProcess.leaf_evidence`.
    dtype : floating dtype of the computation (default float64; float32 is faster and looser).

    Returns
    -------
    BPResult -- ``marginals[l]`` (N, s**l, n_l) and ``log_partition`` (N,).

    Example
    -------
    >>> from layerwise.hierarchy import RHM, belief_propagation, make_noise_process
    >>> rhm = RHM(v=8, n_c=8, m=2, s=2, L=3, seed=0)
    >>> x0 = rhm.sample(4, seed=1).tokens
    >>> proc = make_noise_process("uniform", rhm.v)
    >>> ev = proc.leaf_evidence(proc.corrupt(x0, 0.3, torch.Generator().manual_seed(2)), 0.3)
    >>> res = belief_propagation(rhm, ev)
    >>> [tuple(p.shape) for p in res.marginals]
    [(4, 1, 8), (4, 2, 8), (4, 4, 8), (4, 8, 8)]
    """
    up = upward_pass(rhm, evidence, dtype)
    n, s, m = up.log_partition.shape[0], rhm.s, rhm.m
    root, _ = _normalize(up.messages[0])  # uniform class prior: P(c | e) ∝ u_0(c); zeros if impossible
    impossible = torch.isneginf(up.log_partition)
    marginals = [root]
    for level in range(rhm.L):
        table = rhm.rules[level]  # (n_parents, m, s)
        n_parents = table.shape[0]
        flat = _flat_rules(table)
        nodes = s**level
        rows = n * nodes
        children = up.messages[level + 1].reshape(rows, s, rhm.v)  # (N * nodes, s, v)
        parent = marginals[level].reshape(rows, n_parents)  # (N * nodes, n_parents)
        out = torch.zeros(rows, s, rhm.v, dtype=dtype)
        for start, stop in _chunks(rows, n_parents * m):
            prod = _rule_products(children[start:stop], flat).view(-1, n_parents, m)  # (rows', n_parents, m)
            norm = prod.sum(-1)  # (rows', n_parents) -- m * u(a) before normalization
            ratio = torch.where(norm > 0, parent[start:stop] / torch.where(norm > 0, norm, 1.0), 0.0)
            joint = (prod * ratio.unsqueeze(-1)).view(-1, n_parents * m)  # P(a, r | e), (rows', n_parents*m)
            for i in range(s):
                out[start:stop, i].index_add_(1, flat[i], joint)  # P(child_i = b | e)
        child, _ = _normalize(out.view(n, nodes * s, rhm.v))  # (N, s**(level+1), v); removes round-off
        marginals.append(child)
    if impossible.any():
        marginals = [torch.where(impossible.view(-1, 1, 1), torch.nan, p) for p in marginals]
    return BPResult(marginals=tuple(marginals), log_partition=up.log_partition)


# --------------------------------------------------------------------------------------------- sampling
def _inverse_cdf(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of unnormalized nonnegative ``weights`` (..., k) -> (...) long."""
    cdf = weights.cumsum(-1)  # (..., k)
    u = torch.rand(weights.shape[:-1], generator=generator, dtype=weights.dtype) * cdf[..., -1]
    idx = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=weights.shape[-1] - 1)


def sample_posterior(
    rhm: RHM,
    evidence: torch.Tensor,
    seed: int | torch.Generator | None = 0,
    dtype: torch.dtype = torch.float64,
) -> RHMSample:
    """One exact joint posterior sample of the whole tree per row of ``evidence``.

    Draws the class from its posterior marginal, then top-down, at every internal node with sampled symbol
    ``a``, a rule ``r`` with probability ``∝ prod_i u_i(R[a, r, i])`` (the upward messages of its children).

    Parameters
    ----------
    rhm : the model.
    evidence : (N, d, v) nonnegative leaf likelihoods.
    seed : an int, a ``torch.Generator`` (advanced in place) or None (fresh randomness).
    dtype : floating dtype of the messages (default float64).

    Returns
    -------
    RHMSample -- labels (N,), the full tree and the rule choices of each sample.

    Raises
    ------
    ValueError if some row's evidence has probability zero under the RHM (no posterior exists).
    """
    gen = make_generator(seed)
    up = upward_pass(rhm, evidence, dtype)
    impossible = torch.isneginf(up.log_partition)
    if impossible.any():
        rows = torch.nonzero(impossible).flatten()[:10].tolist()
        raise ValueError(f"evidence has probability zero under the RHM for rows {rows} (first 10 shown)")
    n, s = up.log_partition.shape[0], rhm.s
    labels = _inverse_cdf(up.messages[0][:, 0], gen)  # (N,)
    symbols = labels.view(n, 1)  # (N, 1)
    choices = []
    for level in range(rhm.L):
        table = rhm.rules[level]  # (n_parents, m, s)
        nodes = s**level
        kids = table[symbols]  # (N, nodes, m, s) -- the children of every rule of the sampled symbols
        child_up = up.messages[level + 1].view(n, nodes, s, rhm.v)  # (N, nodes, s, v)
        # u_i(R[a, r, i]) for every rule r: gather along v with index (N, nodes, s, m).
        picked = torch.gather(child_up, 3, kids.transpose(2, 3))  # (N, nodes, s, m)
        choice = _inverse_cdf(picked.prod(2), gen)  # (N, nodes)
        choices.append(choice)
        symbols = torch.gather(kids, 2, choice.view(n, nodes, 1, 1).expand(n, nodes, 1, s))
        symbols = symbols.view(n, nodes * s)  # (N, s**(level+1))
    return rhm.from_choices(labels, choices)
