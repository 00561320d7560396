"""Exact BP against brute-force enumeration of every datum of small RHMs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from layerwise.hierarchy import RHM, belief_propagation, make_noise_process, sample_posterior, upward_pass

PROCESSES = ("eps", "uniform", "mask")
# (v, n_c, m, s, L): s = 2 and s = 3, L = 1..3, n_c != v included.
INSTANCES = [
    (4, 4, 2, 2, 2),
    (4, 3, 2, 2, 3),
    (3, 3, 2, 3, 2),
    (3, 2, 2, 3, 3),
    (5, 2, 3, 2, 1),
    (3, 4, 2, 3, 1),
]


# ------------------------------------------------------------------------------------------- brute force
def brute_log_weights(data, evidence: torch.Tensor) -> torch.Tensor:
    """log P(x) + sum_i log e_i(x_i) for every datum x of the enumeration: (N, P_max).

    Every datum has prior probability 1 / P_max (uniform class and rules, unambiguous grammar).
    """
    tokens = data.tokens  # (P, d)
    p_max, d = tokens.shape
    log_e = evidence.log()  # (N, d, v)
    idx = tokens.t().unsqueeze(0).expand(evidence.shape[0], d, p_max)  # (N, d, P)
    per_pos = torch.gather(log_e, 2, idx)  # (N, d, P)
    return per_pos.sum(1) - math.log(p_max)


def brute_marginals(rhm: RHM, data, evidence: torch.Tensor):
    log_w = brute_log_weights(data, evidence)  # (N, P)
    log_z = torch.logsumexp(log_w, dim=1)  # (N,)
    post = (log_w - log_z[:, None]).exp()  # (N, P)
    out = []
    for level, symbols in enumerate(data.tree):  # symbols: (P, s**level)
        n_sym = rhm.n_c if level == 0 else rhm.v
        onehot = torch.nn.functional.one_hot(symbols, n_sym).to(post.dtype)  # (P, nodes, n_sym)
        out.append(torch.einsum("np,pks->nks", post, onehot))
    return out, log_z, post


def make_evidence(rhm: RHM, process: str, level: float, n: int, seed: int):
    x0 = rhm.sample(n, seed=seed).tokens
    proc = make_noise_process(process, rhm.v)
    gen = torch.Generator().manual_seed(seed + 100)
    x_t = proc.corrupt(x0, level, gen)
    return proc.leaf_evidence(x_t, level)


# ------------------------------------------------------------------------------------------- marginals
@pytest.mark.parametrize("params", INSTANCES, ids=lambda p: "v{}-nc{}-m{}-s{}-L{}".format(*p))
@pytest.mark.parametrize("process", PROCESSES)
def test_marginals_and_log_partition_match_brute_force(params, process):
    v, n_c, m, s, L = params
    rhm = RHM(v, n_c, m, s, L, seed=3)
    data = rhm.enumerate()
    for level in (0.2, 0.6, 0.95):
        evidence = make_evidence(rhm, process, level, n=6, seed=int(level * 100))
        # Also a rescaled copy: evidence is defined up to a factor per position (log Z shifts by its log).
        scale = torch.rand(6, rhm.d, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
        want, want_log_z, _ = brute_marginals(rhm, data, evidence)
        res = belief_propagation(rhm, evidence * scale)
        assert len(res.marginals) == L + 1
        for lev, (got, exp) in enumerate(zip(res.marginals, want, strict=True)):
            assert got.shape == (6, s**lev, n_c if lev == 0 else v)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, exp, atol=1e-10, rtol=0)
            ones = torch.ones(6, s**lev, dtype=torch.float64)
            torch.testing.assert_close(got.sum(-1), ones, atol=1e-12, rtol=0)
        expected_log_z = want_log_z + scale.log().sum((1, 2))
        torch.testing.assert_close(res.log_partition, expected_log_z, atol=1e-10, rtol=0)


def test_arbitrary_positive_evidence_matches_brute_force():
    """Random (not process-shaped) evidence, s = 3, L = 3: all 2 * 2**13 data."""
    rhm = RHM(3, 2, 2, 3, 3, seed=5)
    data = rhm.enumerate()
    gen = torch.Generator().manual_seed(0)
    evidence = torch.rand(4, rhm.d, rhm.v, generator=gen, dtype=torch.float64) ** 3
    want, want_log_z, _ = brute_marginals(rhm, data, evidence)
    res = belief_propagation(rhm, evidence)
    for got, exp in zip(res.marginals, want, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=0)
    torch.testing.assert_close(res.log_partition, want_log_z, atol=1e-10, rtol=0)


@st.composite
def small_rhms(draw):
    s = draw(st.sampled_from([2, 3]))
    L = draw(st.integers(1, 2 if s == 3 else 3))
    v = draw(st.integers(2, 4))
    m = draw(st.integers(1, min(4, v ** (s - 1))))
    n_c = draw(st.integers(1, min(5, v**s // m)))
    return RHM(v, n_c, m, s, L, seed=draw(st.integers(0, 1000)))


@settings(max_examples=30, deadline=None)
@given(rhm=small_rhms(), seed=st.integers(0, 1000))
def test_property_random_rhm_and_evidence_match_brute_force(rhm, seed):
    """Random grammars (s, L, v, m, n_c) and random positive evidence with a wide dynamic range."""
    data = rhm.enumerate()
    gen = torch.Generator().manual_seed(seed)
    evidence = torch.rand(3, rhm.d, rhm.v, generator=gen, dtype=torch.float64) ** 4 + 1e-9
    want, want_log_z, _ = brute_marginals(rhm, data, evidence)
    res = belief_propagation(rhm, evidence)
    for got, exp in zip(res.marginals, want, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=0)
    torch.testing.assert_close(res.log_partition, want_log_z, atol=1e-10, rtol=0)


def test_upward_pass_messages():
    """Leaves: the normalized evidence; root: the class posterior (uniform prior); log Z as in BP; and at
    an inner node, with evidence only below it, the message is the brute-force posterior of its symbol
    divided by the prior frequency of that symbol."""
    rhm = RHM(4, 3, 2, 2, 3, seed=0)
    data = rhm.enumerate()
    evidence = make_evidence(rhm, "uniform", 0.5, n=5, seed=2)
    up = upward_pass(rhm, evidence)
    assert [tuple(u.shape) for u in up.messages] == [(5, 1, 3), (5, 2, 4), (5, 4, 4), (5, 8, 4)]
    torch.testing.assert_close(up.messages[3], evidence / evidence.sum(-1, keepdim=True))
    want, _, _ = brute_marginals(rhm, data, evidence)
    torch.testing.assert_close(up.messages[0], want[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(up.log_partition, belief_propagation(rhm, evidence).log_partition)
    below = evidence.clone()
    below[:, 2:] = 1.0  # evidence only below node 0 of level 2 (leaves 0 and 1)
    want, _, _ = brute_marginals(rhm, data, below)
    prior = torch.nn.functional.one_hot(data.tree[2][:, 0], rhm.v).double().mean(0)  # (v,)
    seen = prior > 0  # symbols that can occur there; the identity P(a | e) ∝ prior(a) u(a) says nothing else
    assert seen.sum() >= 2
    ratio = want[2][:, 0, seen] / prior[seen]
    msg = upward_pass(rhm, below).messages[2][:, 0, seen]
    torch.testing.assert_close(msg / msg.sum(-1, keepdim=True), ratio / ratio.sum(-1, keepdim=True))


def test_float32_close_to_float64():
    rhm = RHM(8, 8, 2, 2, 4, seed=0)
    evidence = make_evidence(rhm, "eps", 0.6, n=8, seed=1)
    r64 = belief_propagation(rhm, evidence)
    r32 = belief_propagation(rhm, evidence, dtype=torch.float32)
    assert r32.marginals[0].dtype == torch.float32
    for a, b in zip(r32.marginals, r64.marginals, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("params", [(6, 6, 3, 2, 4), (4, 3, 2, 3, 3)])
def test_chunking_does_not_change_results(monkeypatch, params):
    """The cache-sized chunking of nodes does not change the result (one node per chunk here)."""
    import layerwise.hierarchy.bp as bp

    rhm = RHM(*params, seed=1)
    evidence = make_evidence(rhm, "mask", 0.4, n=7, seed=3)
    full, drawn = belief_propagation(rhm, evidence), sample_posterior(rhm, evidence, seed=2)
    monkeypatch.setattr(bp, "_CHUNK_ELEMENTS", 1)
    small = belief_propagation(rhm, evidence)
    assert torch.equal(sample_posterior(rhm, evidence, seed=2).tokens, drawn.tokens)
    for a, b in zip(full.marginals, small.marginals, strict=True):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)
    torch.testing.assert_close(full.log_partition, small.log_partition, atol=1e-12, rtol=0)


@pytest.mark.parametrize("threads", [1, 3])
def test_worker_threads_give_identical_results(monkeypatch, threads):
    """The chunk loop runs on torch.get_num_threads() Python threads; results do not depend on it, and the
    torch thread setting is restored after the call."""
    import layerwise.hierarchy.bp as bp

    monkeypatch.setattr(bp, "_CHUNK_ELEMENTS", 64)  # many chunks, so the threads share the work
    rhm = RHM(6, 4, 3, 2, 4, seed=2)
    evidence = make_evidence(rhm, "uniform", 0.5, n=9, seed=5)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref, ref_s = belief_propagation(rhm, evidence), sample_posterior(rhm, evidence, seed=8)
        torch.set_num_threads(threads)
        got, got_s = belief_propagation(rhm, evidence), sample_posterior(rhm, evidence, seed=8)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for a, b in zip(ref.marginals, got.marginals, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(ref.log_partition, got.log_partition)
    assert torch.equal(ref_s.tokens, got_s.tokens) and torch.equal(ref_s.labels, got_s.labels)


def test_concurrent_calls_from_python_threads(monkeypatch):
    """BP called from several Python threads at once gives the serial results and leaves torch's thread
    setting as it found it."""
    from concurrent.futures import ThreadPoolExecutor

    import layerwise.hierarchy.bp as bp

    monkeypatch.setattr(bp, "_CHUNK_ELEMENTS", 64)
    rhm = RHM(6, 4, 3, 2, 4, seed=2)
    evidences = [make_evidence(rhm, "mask", 0.5, n=6, seed=k) for k in range(6)]
    want = [belief_propagation(rhm, e).marginals[-1] for e in evidences]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda e: belief_propagation(rhm, e).marginals[-1], evidences))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_deep_tree_is_numerically_stable():
    """L = 10 (1024 leaves) at strong evidence: per-leaf factors would underflow without normalization."""
    rhm = RHM(8, 8, 2, 2, 10, seed=0)
    x0 = rhm.sample(3, seed=0)
    evidence = make_noise_process("eps", 8).leaf_evidence(x0.tokens, 0.0) * 1e-300
    res = belief_propagation(rhm, evidence)
    assert torch.isfinite(res.log_partition).all()
    # Noise 0: the posterior is the datum and log Z = log(1e-300) * d + log P(x0) = ... - log P_max.
    expected = rhm.d * math.log(1e-300) - (math.log(rhm.n_c) + rhm.n_internal * math.log(rhm.m))
    torch.testing.assert_close(res.log_partition, torch.full((3,), expected, dtype=torch.float64))
    for lev, marg in enumerate(res.marginals):
        assert torch.equal(marg.argmax(-1), x0.tree[lev])


# ------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("params", [(4, 3, 2, 2, 2), (3, 3, 2, 3, 2), (5, 2, 3, 2, 1)])
def test_all_masked_gives_prior(params):
    """Every leaf masked: posterior = prior (uniform over all data), log Z = 0."""
    rhm = RHM(*params, seed=2)
    data = rhm.enumerate()
    proc = make_noise_process("mask", rhm.v)
    x_t = torch.full((3, rhm.d), rhm.v, dtype=torch.long)
    res = belief_propagation(rhm, proc.leaf_evidence(x_t, 1.0))
    for lev, symbols in enumerate(data.tree):
        n_sym = rhm.n_c if lev == 0 else rhm.v
        prior = torch.nn.functional.one_hot(symbols, n_sym).double().mean(0)  # (nodes, n_sym) over all data
        torch.testing.assert_close(res.marginals[lev], prior.expand(3, -1, -1), atol=1e-12, rtol=0)
    torch.testing.assert_close(res.log_partition, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("process", PROCESSES)
def test_noise_zero_posterior_is_the_datum(process):
    rhm = RHM(4, 3, 2, 2, 3, seed=4)
    x0 = rhm.sample(5, seed=7)
    proc = make_noise_process(process, rhm.v)
    x_t = proc.corrupt(x0.tokens, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(x_t, x0.tokens)
    evidence = proc.leaf_evidence(x_t, 0.0)
    res = belief_propagation(rhm, evidence)
    for lev, marg in enumerate(res.marginals):
        n_sym = rhm.n_c if lev == 0 else rhm.v
        torch.testing.assert_close(marg, torch.nn.functional.one_hot(x0.tree[lev], n_sym).double())
    torch.testing.assert_close(res.log_partition, torch.full((5,), -math.log(rhm.P_max), dtype=torch.float64))
    post = sample_posterior(rhm, evidence, seed=1)
    assert torch.equal(post.labels, x0.labels)
    for a, b in zip(post.choices, x0.choices, strict=True):
        assert torch.equal(a, b)


def test_impossible_evidence():
    """A leaf sequence no rule can produce: log Z = -inf, NaN marginals, sampling refuses."""
    rhm = RHM(4, 4, 2, 2, 2, seed=0)
    data = rhm.enumerate()
    seen = {tuple(t) for t in data.tokens.tolist()}
    bad = next(t for t in itertools.product(range(4), repeat=4) if t not in seen)
    good = data.tokens[:1]
    x_t = torch.cat([good, torch.tensor([bad])])
    evidence = make_noise_process("uniform", 4).leaf_evidence(x_t, 0.0)
    res = belief_propagation(rhm, evidence)
    assert res.log_partition[1] == -math.inf and torch.isfinite(res.log_partition[0])
    assert torch.isnan(res.marginals[2][1]).all() and not torch.isnan(res.marginals[2][0]).any()
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sample_posterior(rhm, evidence)


def test_empty_batch():
    rhm = RHM(4, 3, 2, 2, 2, seed=0)
    evidence = torch.ones(0, 4, 4, dtype=torch.float64)
    res = belief_propagation(rhm, evidence)
    assert [tuple(p.shape) for p in res.marginals] == [(0, 1, 3), (0, 2, 4), (0, 4, 4)]
    assert res.log_partition.shape == (0,)
    post = sample_posterior(rhm, evidence)
    assert len(post) == 0 and post.tokens.shape == (0, 4) and len(post.choices) == 2


def test_bad_evidence_raises():
    rhm = RHM(4, 4, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match="evidence must have shape"):
        belief_propagation(rhm, torch.ones(2, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="nonnegative"):
        belief_propagation(rhm, -torch.ones(2, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="evidence must be a floating tensor"):
        belief_propagation(rhm, torch.ones(2, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        belief_propagation(rhm, torch.ones(2, 4, 4), dtype=torch.long)
    with pytest.raises(TypeError, match="rhm"):
        belief_propagation("rhm", torch.ones(2, 4, 4))


# ------------------------------------------------------------------------------------------- sampling
def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square over outcomes with positive probability; counts outside the support fail hard."""
    support = probs > 0
    assert counts[~support].sum() == 0, "sample outside the posterior support"
    expected = probs[support] * counts.sum()
    return float(stats.chisquare(counts[support].double().numpy(), expected.numpy()).pvalue)


@pytest.mark.parametrize(
    ("params", "process", "level", "seed"),
    [
        ((3, 2, 2, 2, 2), "uniform", 0.5, 5),
        ((3, 2, 2, 3, 2), "mask", 0.8, 4),
        ((4, 3, 2, 2, 2), "eps", 0.7, 3),
    ],
)
def test_posterior_samples_follow_exact_posterior(params, process, level, seed):
    """Chi-square of 40 000 joint samples over all P_max data against the brute-force posterior.

    The same test against the prior (a wrong sampler that ignores the evidence) must reject, so the test
    has power.
    """
    rhm = RHM(*params, seed=1)
    data = rhm.enumerate()
    evidence = make_evidence(rhm, process, level, n=1, seed=seed)
    _, _, post = brute_marginals(rhm, data, evidence)
    post = post[0]  # (P,)
    assert (post > 1e-3).sum() >= 8  # a spread-out posterior, so the test discriminates
    n = 40_000
    sample = sample_posterior(rhm, evidence.expand(n, -1, -1), seed=11)
    # Consistency of the returned tree with the rules and choices.
    rebuilt = rhm.from_choices(sample.labels, sample.choices)
    for a, b in zip(rebuilt.tree, sample.tree, strict=True):
        assert torch.equal(a, b)
    idx = torch.tensor(rhm.index_of(sample))
    counts = torch.bincount(idx, minlength=rhm.P_max)
    assert _chi2_pvalue(counts, post) > 1e-3
    prior = torch.full((rhm.P_max,), 1.0 / rhm.P_max, dtype=torch.float64)
    assert float(stats.chisquare(counts.double().numpy(), (prior * n).numpy()).pvalue) < 1e-6


def test_sampling_is_seeded():
    rhm = RHM(4, 4, 2, 2, 3, seed=0)
    evidence = make_evidence(rhm, "uniform", 0.6, n=20, seed=0)
    a = sample_posterior(rhm, evidence, seed=5)
    b = sample_posterior(rhm, evidence, seed=5)
    c = sample_posterior(rhm, evidence, seed=6)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    assert not torch.equal(torch.cat(a.choices, 1), torch.cat(c.choices, 1))
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(sample_posterior(rhm, evidence, seed=gen).tokens, a.tokens)


def test_sample_marginals_match_bp_on_larger_instance():
    """Where enumeration is too big (P_max = 8 * 2**31): empirical leaf and class frequencies of posterior
    samples agree with BP marginals within 5 standard errors."""
    rhm = RHM(8, 8, 2, 2, 5, seed=0)
    evidence = make_evidence(rhm, "eps", 0.7, n=1, seed=4)
    marg = belief_propagation(rhm, evidence).marginals
    n = 20_000
    sample = sample_posterior(rhm, evidence.expand(n, -1, -1), seed=3)
    for lev in (0, 2, 5):
        n_sym = rhm.n_c if lev == 0 else rhm.v
        freq = torch.nn.functional.one_hot(sample.tree[lev], n_sym).double().mean(0)  # (nodes, n_sym)
        p = marg[lev][0]
        se = (p * (1 - p) / n).sqrt() + 1e-12
        assert ((freq - p).abs() <= 5 * se + 1e-9).all()


def test_reproduces_paper_example_v32_m8_s2():
    """PNAS 2025 (exact BP, eps-process, v=32, m=8, s=2): at L=7 and eps=0.75 the class is kept with
    probability ≈ 0.14 and the leaves with ≈ 0.67 (the leaves change smoothly, the class sharply)."""
    rhm = RHM(32, 32, 8, 2, 7, seed=0)
    x0 = rhm.sample(400, seed=10)
    evidence = make_noise_process("eps", 32).leaf_evidence(x0.tokens, 0.75)
    marg = belief_propagation(rhm, evidence).marginals
    p_class = marg[0][:, 0].gather(1, x0.labels[:, None]).mean().item()
    p_leaf = marg[7].gather(2, x0.tokens.unsqueeze(-1)).mean().item()
    assert p_class == pytest.approx(0.14, abs=0.04)
    assert p_leaf == pytest.approx(0.67, abs=0.02)


@pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py)
def test_cuda_matches_cpu():
    """The computation follows the evidence's device; a seed gives the same samples on CPU and GPU."""
    rhm = RHM(8, 5, 3, 2, 5, seed=0)
    evidence = make_evidence(rhm, "uniform", 0.6, n=64, seed=1)
    cpu = belief_propagation(rhm, evidence)
    gpu = belief_propagation(rhm, evidence.cuda())
    assert gpu.marginals[0].device.type == "cuda"
    for a, b in zip(cpu.marginals, gpu.marginals, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-12, rtol=0)
    torch.testing.assert_close(gpu.log_partition.cpu(), cpu.log_partition, atol=1e-10, rtol=0)
    s_cpu, s_gpu = sample_posterior(rhm, evidence, seed=4), sample_posterior(rhm, evidence.cuda(), seed=4)
    assert s_gpu.tokens.device.type == "cuda"
    # Identical uniforms; a draw could only differ where a uniform falls within round-off of a CDF step.
    assert (s_gpu.tokens.cpu() == s_cpu.tokens).double().mean() > 0.99
    rebuilt = rhm.from_choices(s_gpu.labels.cpu(), [c.cpu() for c in s_gpu.choices])
    assert torch.equal(rebuilt.tokens, s_gpu.tokens.cpu())
