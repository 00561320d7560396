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
the ``(n_parents * m, nodes)`` temporaries are processed in cache-sized chunks of nodes. Memory: the upward
messages of all levels plus the outputs, ``O(N * d * v)``. Messages are normalized at every node and the
log scales are accumulated into ``log_partition``, so nothing underflows at any depth.

Threads (CPU): the many small per-chunk operations are spread over ``torch.get_num_threads()`` Python
threads while torch's own intra-op parallelism is set to 1 for the duration of the call (and restored
after): with OpenMP parallelism per operation, barrier spin-waiting made 2-thread runs 5-10x slower than
one thread on a CPU shared with other jobs. Results do not depend on the number of threads.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .._resources import check_memory
from .._validation import make_generator
from ..errors import ParameterError, ParameterTypeError
from .rhm import RHM, RHMSample

__all__ = [
    "BPResult",
    "UpwardMessages",
    "upward_pass",
    "belief_propagation",
    "sample_posterior",
    "marginals_and_sample",
    "bp_memory",
]

# Elements of one temporary (n_parents * m, cols) tensor: 2 MiB in float64, so the gathers stay in cache.
_CHUNK_ELEMENTS = 1 << 18


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
def _n_message_values(rhm: RHM) -> int:
    """Message (or marginal) values of one datum over all levels: ``n_c + v * (s + s**2 + ... + s**L)``."""
    return rhm.n_c + rhm.v * (rhm.s ** (rhm.L + 1) - rhm.s) // (rhm.s - 1)


def bp_memory(rhm: RHM, n: int, dtype: torch.dtype = torch.float64) -> int:
    """Estimated peak bytes of :func:`belief_propagation` on ``n`` rows (beyond the evidence itself).

    The messages of every level, ``n * (n_c + v * (s + s**2 + ... + s**L))`` values, are held twice (upward
    messages and marginals), plus a converted copy of the ``(n, d, v)`` evidence and the chunk temporaries.
    Exact Python int (astronomical for deep trees).
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    values = n * _n_message_values(rhm)
    return itemsize * (2 * values + n * rhm.d * rhm.v + 8 * _CHUNK_ELEMENTS)


def _check_evidence(rhm: RHM, evidence: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(rhm, RHM):
        raise ParameterTypeError(f"rhm must be an RHM, got {type(rhm).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ParameterTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(evidence, torch.Tensor) or not evidence.is_floating_point():
        got = evidence.dtype if isinstance(evidence, torch.Tensor) else type(evidence).__name__
        raise ParameterTypeError(f"evidence must be a floating tensor, got {got}")
    if evidence.dim() != 3 or evidence.shape[1:] != (rhm.d, rhm.v):
        raise ParameterError(
            f"evidence must have shape (N, d={rhm.d}, v={rhm.v}), got {tuple(evidence.shape)}"
        )
    n = evidence.shape[0]
    check_memory(bp_memory(rhm, n, dtype), f"belief propagation on {n} data of {rhm!r}", evidence.device)
    evidence = evidence.to(dtype)
    if evidence.numel():
        low, high = torch.aminmax(evidence)  # one pass; NaN makes both comparisons false
        if not (low >= 0 and high < math.inf):
            raise ParameterError(f"evidence must be finite and nonnegative, got values in [{low}, {high}]")
    return evidence


# --------------------------------------------------------------------------------------------- layout
# Internally a level l >= 1 is stored "split": a (s, n_l, N * s**(l-1)) tensor whose entry [i, a, (n, k)]
# belongs to node k*s + i of datum n, i.e. the i-th child of node k of level l-1. Gathering the messages of
# every rule is then a gather of contiguous rows (``index_select`` along dim 0 of ``split[i]``), an order of
# magnitude faster than gathering along the last axis; the root is stored as (n_c, N). Work is done in
# column chunks small enough to stay in cache. Public results are (N, s**l, n_l).


def _chunks(cols: int, width: int, align: int) -> list[tuple[int, int]]:
    """Column ranges ``(start, stop)``, starts multiple of ``align``, such that a (width, stop - start)
    temporary has about ``_CHUNK_ELEMENTS`` elements."""
    step = max(align, (_CHUNK_ELEMENTS // max(1, width)) // align * align)
    return [(start, min(start + step, cols)) for start in range(0, cols, step)]


class _IntraOpGuard:
    """Sets torch's intra-op threads to 1 while any BP call is in flight (calls may overlap from several
    Python threads); the first call in saves the user's setting and the last one out restores it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved = 1

    def threads(self) -> int:
        """The user's thread count (the saved one while calls are in flight)."""
        with self._lock:
            return self._saved if self._active else torch.get_num_threads()

    def enter(self) -> None:
        with self._lock:
            if self._active == 0:
                self._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                torch.set_num_threads(self._saved)


_intra_op = _IntraOpGuard()


_RunChunks = Callable[[Callable[[int, int], None], list[tuple[int, int]]], None]


@contextlib.contextmanager
def _chunk_runner(device: torch.device) -> Iterator[_RunChunks]:
    """Yield ``run(fn, ranges)``, which calls ``fn(start, stop)`` for every range.

    On the CPU with ``k = torch.get_num_threads() > 1``, the chunks are spread over k Python threads while
    torch's intra-op parallelism is set to 1 for the call (restored after): a chunk's small operations
    release the GIL, so the threads run in parallel without an OpenMP barrier per operation -- thousands of
    those barriers made multi-threaded runs 5-10x slower than one thread on a CPU shared with other jobs.
    Each ``fn`` writes a disjoint slice of the outputs.
    """
    workers = _intra_op.threads() if device.type == "cpu" else 1
    if workers <= 1:

        def run_serial(fn: Callable[[int, int], None], ranges: list[tuple[int, int]]) -> None:
            for start, stop in ranges:
                fn(start, stop)

        yield run_serial
        return
    _intra_op.enter()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layerwise-bp") as pool:

            def run_pool(fn: Callable[[int, int], None], ranges: list[tuple[int, int]]) -> None:
                for future in [pool.submit(fn, start, stop) for start, stop in ranges]:
                    future.result()  # re-raises a worker's exception here

            yield run_pool
    finally:
        _intra_op.leave()




def _flat_rules(table: torch.Tensor) -> torch.Tensor:
    """(n_parents, m, s) -> (s, n_parents * m): ``R[a, r, i]`` flattened over ``(a, r)``, per child i."""
    n_parents, m, s = table.shape
    return table.reshape(n_parents * m, s).t().contiguous()  # (s, n_parents * m)


def _rule_products(children: torch.Tensor, flat_rules: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``prod_i u_i(R[a, r, i])`` for every rule ``(a, r)`` and the parent nodes ``start:stop``.

    children : (s, v, rows) -- split messages of the s children of every parent node.
    flat_rules : (s, n_parents * m).
    Returns (n_parents * m, stop - start).
    """
    prod = children[0, :, start:stop].index_select(0, flat_rules[0])  # (n_parents * m, cols)
    for i in range(1, flat_rules.shape[0]):
        prod.mul_(children[i, :, start:stop].index_select(0, flat_rules[i]))
    return prod


def _normalize_(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Normalize ``x`` in place to sum 1 along ``dim``; return the log of the sums (-inf for zero sums)."""
    total = x.sum(dim, keepdim=True)
    x.div_(torch.where(total > 0, total, torch.ones_like(total)))
    return total.squeeze(dim).log()


def _to_public(msg: torch.Tensor, n: int, level: int) -> torch.Tensor:
    """Root (n_c, N) or split level ``level`` (s, n_l, N * s**(level-1)) -> (N, s**level, n_l)."""
    if level == 0:
        return msg.t().unsqueeze(1).contiguous()  # (N, 1, n_c)
    s, n_sym, _ = msg.shape
    # (s, n_sym, N, nodes) -> (N, nodes, s, n_sym) -> (N, nodes * s, n_sym)
    nodes = s ** (level - 1)
    return msg.view(s, n_sym, n, nodes).permute(2, 3, 0, 1).reshape(n, nodes * s, n_sym)


def _upward(rhm: RHM, evidence: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Normalized upward messages of every level (root (n_c, N), else split) and log Z (N,).

    Up: ``u(a) = (1/m) sum_r prod_i u_i(R[a, r, i])``; every message is divided by its sum and the log
    of that sum is added to log Z, so nothing underflows however deep the tree.
    """
    n, s, m, dtype, device = evidence.shape[0], rhm.s, rhm.m, evidence.dtype, evidence.device
    # (N * d / s, s, v) -> (s, v, N * d / s): split layout of the leaves (a copy; the input is untouched).
    split = evidence.reshape(-1, s, rhm.v).permute(1, 2, 0).contiguous()
    log_z = _normalize_(split, 1).view(s, n, rhm.d // s).sum((0, 2))  # (N,)
    messages = [split]
    with _chunk_runner(device) as run:
        for level in range(rhm.L - 1, -1, -1):
            table = rhm.rules[level]  # (n_parents, m, s)
            n_parents = table.shape[0]
            flat = _flat_rules(table).to(device)
            cols = n * s**level
            if level > 0:
                out = torch.empty(s, n_parents, cols // s, dtype=dtype, device=device)
                out_cols = out.permute(1, 2, 0)  # (n_parents, cols / s, s) view; (n, k) -> [:, k // s, k % s]
            else:
                out = out_cols = torch.empty(n_parents, cols, dtype=dtype, device=device)  # root: (n_c, N)
            log_c = torch.empty(cols, dtype=dtype, device=device)

            def up_chunk(start: int, stop: int, split=split, flat=flat, out_cols=out_cols, log_c=log_c,
                         n_parents=n_parents, level=level) -> None:
                prod = _rule_products(split, flat, start, stop)  # (n_parents * m, c)
                up = prod.view(n_parents, m, -1).sum(1)  # sum over rules r: (n_parents, c)
                log_c[start:stop] = _normalize_(up, 0)
                if level > 0:
                    out_cols[:, start // s : stop // s] = up.view(n_parents, -1, s)
                else:
                    out_cols[:, start:stop] = up

            run(up_chunk, _chunks(cols, n_parents * m, s if level > 0 else 1))
            log_z = log_z + log_c.view(n, s**level).sum(1)
            messages.insert(0, out)
            split = out
    # Prior: Z = (1/n_c) sum_c u_0(c) prod (1/m) over internal nodes; sum_c u_0(c) = 1 or 0 (impossible).
    log_z = log_z + messages[0].sum(0).log()
    log_z = log_z - rhm.n_internal * math.log(m) - math.log(rhm.n_c)
    return messages, log_z


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
    messages, log_z = _upward(rhm, evidence)
    n = evidence.shape[0]
    public = tuple(_to_public(msg, n, level) for level, msg in enumerate(messages))
    return UpwardMessages(messages=public, log_partition=log_z)


# --------------------------------------------------------------------------------------------- marginals
def belief_propagation(rhm: RHM, evidence: torch.Tensor, dtype: torch.dtype = torch.float64) -> BPResult:
    """Exact posterior marginals of every node of the RHM tree given leaf evidence.

    Parameters
    ----------
    rhm : the model (its rules); prior = uniform class and uniform rule at every internal node.
    evidence : (N, d, v) nonnegative leaf likelihoods ``e_i(a) ∝ p(x_t,i | x0,i = a)``, e.g. from
        :meth:`layerwise.hierarchy.noise.NoiseProcess.leaf_evidence`; on any device (the work runs there).
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
    evidence = _check_evidence(rhm, evidence, dtype)
    messages, log_z = _upward(rhm, evidence)
    return _marginals(rhm, messages, log_z)


def _marginals(rhm: RHM, messages: list[torch.Tensor], log_z: torch.Tensor) -> BPResult:
    """The downward pass from :func:`_upward`'s output; ``messages`` is consumed (entries are released as
    they are used, to bound the peak memory)."""
    n, s, m = log_z.shape[0], rhm.s, rhm.m
    device, dtype = messages[0].device, messages[0].dtype
    impossible = torch.isneginf(log_z)
    # Uniform class prior: P(c | e) ∝ u_0(c), already normalized (zeros for impossible evidence).
    marginals = [_to_public(messages[0], n, 0)]  # (N, 1, n_c)
    with _chunk_runner(device) as run:
        for level in range(rhm.L):
            table = rhm.rules[level]  # (n_parents, m, s)
            n_parents = table.shape[0]
            flat = _flat_rules(table).to(device)
            cols = n * s**level
            children = messages[level + 1]  # (s, v, cols)
            messages[level + 1] = None  # let the upward message go as soon as it is used: peak memory
            # Parent marginals as (n_parents, cols) -- a view of the public (N, s**level, n_parents) tensor.
            parent = marginals[level].view(cols, n_parents).t()
            out = torch.empty(n, s ** (level + 1), rhm.v, dtype=dtype, device=device)  # public marginals
            out_split = out.view(cols, s, rhm.v).permute(1, 2, 0)  # (s, v, cols) view of it

            def down_chunk(start: int, stop: int, children=children, flat=flat, parent=parent,
                           out_split=out_split, n_parents=n_parents) -> None:
                prod = _rule_products(children, flat, start, stop).view(n_parents, m, -1)  # (n_par, m, c)
                norm = prod.sum(1)  # (n_parents, c): sum_r' prod_i u_i(R[a, r', i])
                p_parent = parent[:, start:stop]
                ratio = torch.where(norm > 0, p_parent / torch.where(norm > 0, norm, 1.0), 0.0)
                joint = (prod * ratio.unsqueeze(1)).view(n_parents * m, -1)  # P(a, r | e): (n_par * m, c)
                chunk = torch.zeros(s, rhm.v, stop - start, dtype=dtype, device=device)
                for i in range(s):
                    chunk[i].index_add_(0, flat[i], joint)  # P(child_i = b | e) = sum_{a,r: R[a,r,i] = b}
                _normalize_(chunk, 1)  # sums are 1 up to round-off
                out_split[:, :, start:stop] = chunk

            run(down_chunk, _chunks(cols, n_parents * m, 1))
            del children
            marginals.append(out)
    if impossible.any():
        marginals = [torch.where(impossible.view(-1, 1, 1), torch.nan, p) for p in marginals]
    return BPResult(marginals=tuple(marginals), log_partition=log_z)


# --------------------------------------------------------------------------------------------- sampling
def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of nonnegative ``weights`` (..., k), given uniforms ``u`` (...): (...) long."""
    cdf = weights.cumsum(-1)  # (..., k)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=weights.shape[-1] - 1)


def _uniforms(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniforms from the CPU generator whatever the device, so a seed gives the same draws everywhere."""
    return torch.rand(shape, generator=generator, dtype=like.dtype).to(like.device)


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
    evidence : (N, d, v) nonnegative leaf likelihoods, on any device (the work and the result go there).
    seed : an int, a CPU ``torch.Generator`` (advanced in place) or None (fresh randomness). Uniforms are
        drawn on the CPU, so a seed gives the same draws on every device.
    dtype : floating dtype of the messages (default float64).

    Returns
    -------
    RHMSample -- labels (N,), the full tree and the rule choices of each sample.

    Raises
    ------
    ValueError if some row's evidence has probability zero under the RHM (no posterior exists).

    Example
    -------
    >>> from layerwise.hierarchy import RHM, make_noise_process, sample_posterior
    >>> rhm = RHM(v=8, n_c=8, m=2, s=2, L=3, seed=0)
    >>> x0 = rhm.sample(4, seed=1)
    >>> ev = make_noise_process("eps", rhm.v).leaf_evidence(x0.tokens, 0.0)
    >>> bool((sample_posterior(rhm, ev, seed=0).tokens == x0.tokens).all())  # no noise: the datum
    True
    """
    gen = make_generator(seed)
    evidence = _check_evidence(rhm, evidence, dtype)
    messages, log_z = _upward(rhm, evidence)
    return _draw(rhm, messages, log_z, gen)


def _draw(rhm: RHM, messages: list[torch.Tensor], log_z: torch.Tensor, gen: torch.Generator) -> RHMSample:
    """Top-down posterior sampling from :func:`_upward`'s output (``messages`` is only read)."""
    impossible = torch.isneginf(log_z)
    if impossible.any():
        rows = torch.nonzero(impossible).flatten()[:10].tolist()
        raise ParameterError(f"evidence has probability zero under the RHM for rows {rows} (first 10 shown)")
    n, s, m = log_z.shape[0], rhm.s, rhm.m
    device = messages[0].device
    labels = _inverse_cdf(messages[0].t(), _uniforms((n,), gen, messages[0]))  # (N,): P(c | e) ∝ u_0(c)
    tree, choices = [labels.view(n, 1)], []
    with _chunk_runner(device) as run:
        for level in range(rhm.L):
            table = rhm.rules[level].to(device)  # (n_parents, m, s)
            nodes = s**level
            u = _uniforms((n, nodes), gen, messages[0])  # drawn for the whole level: chunking-independent
            parents, child_up = tree[-1], messages[level + 1]  # (N, nodes), split (s, v, N * nodes)
            choice = torch.empty(n, nodes, dtype=torch.long, device=device)
            symbols = torch.empty(n, nodes * s, dtype=torch.long, device=device)

            def draw_rows(start: int, stop: int, table=table, nodes=nodes, u=u, parents=parents,
                          child_up=child_up, choice=choice, symbols=symbols) -> None:
                rows = stop - start
                kids = table[parents[start:stop]]  # (rows, nodes, m, s): children of every rule of a symbol
                # u_i(R[a, r, i]): gather the split messages of these rows' nodes along v.
                index = kids.permute(3, 2, 0, 1).reshape(s, m, rows * nodes)  # (s, m, rows * nodes)
                block = child_up[:, :, start * nodes : stop * nodes]  # (s, v, rows * nodes)
                picked = torch.gather(block, 1, index)  # (s, m, rows * nodes)
                weights = picked.prod(0).t().reshape(rows, nodes, m)  # (rows, nodes, m)
                chosen = _inverse_cdf(weights, u[start:stop])  # (rows, nodes)
                choice[start:stop] = chosen
                picked_kids = torch.gather(kids, 2, chosen.view(rows, nodes, 1, 1).expand(rows, nodes, 1, s))
                symbols[start:stop] = picked_kids.reshape(rows, nodes * s)  # (rows, s**(level+1))

            run(draw_rows, _chunks(n, nodes * m * s, 1))
            choices.append(choice)
            tree.append(symbols)
    return RHMSample(labels=labels, tree=tuple(tree), choices=tuple(choices))


def marginals_and_sample(
    rhm: RHM,
    evidence: torch.Tensor,
    seed: int | torch.Generator | None = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[BPResult, RHMSample]:
    """:func:`belief_propagation` and :func:`sample_posterior` on the same evidence with one upward pass.

    Same results as calling both (the sample uses ``seed`` exactly as :func:`sample_posterior` does), at
    about two thirds of the cost. Raises like :func:`sample_posterior` on impossible evidence.
    """
    gen = make_generator(seed)
    evidence = _check_evidence(rhm, evidence, dtype)
    messages, log_z = _upward(rhm, evidence)
    sample = _draw(rhm, messages, log_z, gen)  # reads the messages
    return _marginals(rhm, messages, log_z), sample  # consumes them
