"""Fixes in the hierarchy package (issue 13): exact F'(1) = 1 in the mean-field theory, a device for the
exact denoisers with the leaf evidence built there, one upward pass per batch in denoise, and the standard
error of P(class kept) checked against an independent computation."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from layerwise.hierarchy import RHM, BPDenoiser, denoise, make_noise_process, theory
from layerwise.hierarchy import bp as bp_module
from layerwise.hierarchy.bp import belief_propagation, marginals_and_sample, sample_posterior
from layerwise.hierarchy.forward_backward import forward_backward

CUDA = pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py)


# ----------------------------------------------------------------------------------- exact F'(1)
def test_degenerate_slope_one_reports_no_transition():
    # v=13, m=61, s=3: s m (v - 1) = 2196 = v**s - 1, so F'(1) = 1 exactly (floats give 0.9999999999999998).
    assert 3 * 61 * 12 == 13**3 - 1
    assert theory.has_transition(13, 61, 3) is False
    info = theory.mean_field(13, 61, 3)  # used to raise from critical_point
    assert info.has_transition is False and info.eps_star is None
    with pytest.raises(ValueError, match="no phase transition"):
        theory.critical_point(13, 61, 3)


def test_has_transition_agrees_with_integer_criterion_for_F_prime_at_one():
    """F'(1) < 1 iff s m (v-1) < v**s - 1 (integers); where F'(1/v) < 1 clearly holds, has_transition
    must equal that integer test."""
    checked = 0
    for s in (2, 3):
        for v in range(2, 20):
            for m in range(1, v ** (s - 1) + 1):
                if m * v > v**s or float(theory.mean_field_slope(1 / v, v, m, s)) > 0.99:
                    continue
                assert theory.has_transition(v, m, s) == (s * m * (v - 1) < v**s - 1), (v, m, s)
                checked += 1
    assert checked > 2000


# ----------------------------------------------------------------------------------- devices
def test_smoothed_evidence_is_built_on_the_tokens_device():
    """The meta device stands in for a GPU: before the fix the evidence was always allocated on the CPU and
    the scatter with meta indices failed."""
    tokens = torch.randint(0, 8, (3, 4)).to("meta")
    for name in ("eps", "uniform", "mask"):
        ev = make_noise_process(name, 8)._evidence(tokens, 0.3, torch.float64)
        assert ev.device.type == "meta" and ev.shape == (3, 4, 8)


def test_device_arguments_accepted_validated_and_neutral_on_cpu():
    rhm = RHM(8, 8, 2, 2, 3, seed=0)
    data = rhm.sample(12, seed=1)
    proc = make_noise_process("uniform", 8)
    x_t = proc.corrupt(data.tokens, 0.4, 3)
    a = BPDenoiser(rhm).sample_x0(x_t, proc, 0.4, torch.Generator().manual_seed(5))
    b = BPDenoiser(rhm, device="cpu").sample_x0(x_t, proc, 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    assert "device='cpu'" in repr(BPDenoiser(rhm, device="cpu"))
    with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
        BPDenoiser(rhm, device="tpu:7")
    r1 = denoise(rhm, data, "mask", 0.5, seed=2)
    r2 = denoise(rhm, data, "mask", 0.5, seed=2, device="cpu")
    assert torch.equal(r1.posterior.tokens, r2.posterior.tokens)
    assert all(torch.equal(p, q) for p, q in zip(r1.marginals, r2.marginals, strict=True))
    with pytest.raises(ValueError, match="device"):
        denoise(rhm, data, "mask", 0.5, device="nope")
    f1 = forward_backward(data, "eps", [0.6], 3, BPDenoiser(rhm), seed=4)
    f2 = forward_backward(data, "eps", [0.6], 3, BPDenoiser(rhm), seed=4, device="cpu")
    assert torch.equal(f1.levels[0].x_hat, f2.levels[0].x_hat)


@CUDA
def test_exact_denoisers_run_on_cuda(monkeypatch):
    rhm = RHM(8, 8, 2, 2, 3, seed=0)
    data = rhm.sample(64, seed=1)
    proc = make_noise_process("uniform", 8)
    seen = []
    original = type(proc).leaf_evidence

    def spy(self, x_t, level, dtype=torch.float64):
        out = original(self, x_t, level, dtype)
        seen.append(out.device.type)
        return out

    monkeypatch.setattr(type(proc), "leaf_evidence", spy)
    cpu = denoise(rhm, data, proc, 0.3, seed=2)
    gpu = denoise(rhm, data, proc, 0.3, seed=2, device="cuda")
    assert seen == ["cpu", "cuda"] and gpu.posterior.tokens.device.type == "cpu"
    for p, q in zip(cpu.marginals, gpu.marginals, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    res = forward_backward(data, proc, [0.3], 2, BPDenoiser(rhm, device="cuda"), seed=0)
    assert res.levels[0].x_hat.device.type == "cpu" and seen[-1] == "cuda"


# ----------------------------------------------------------------------------------- one upward pass
def test_denoise_runs_one_upward_pass_per_batch_with_unchanged_results(monkeypatch):
    rhm = RHM(8, 8, 2, 2, 3, seed=0)
    data = rhm.sample(20, seed=1)
    calls = []
    original = bp_module._upward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(bp_module, "_upward", counting)
    res = denoise(rhm, data, "uniform", 0.5, seed=3, batch_size=8)  # 3 batches
    assert len(calls) == 3
    # Same numbers as the two separate passes on the same noise and generator stream.
    proc = make_noise_process("uniform", 8)
    gen = torch.Generator().manual_seed(3)
    noisy = proc.corrupt(data.tokens, 0.5, gen)
    tokens, margs = [], []
    for start in range(0, 20, 8):
        ev = proc.leaf_evidence(noisy[start : start + 8], 0.5)
        margs.append(belief_propagation(rhm, ev).marginals[0])
        tokens.append(sample_posterior(rhm, ev, seed=gen).tokens)
    assert torch.equal(res.noisy, noisy) and torch.equal(res.posterior.tokens, torch.cat(tokens))
    torch.testing.assert_close(res.marginals[0], torch.cat(margs), rtol=0, atol=0)
    both, sample = marginals_and_sample(rhm, proc.leaf_evidence(noisy, 0.5), seed=9)
    alone = sample_posterior(rhm, proc.leaf_evidence(noisy, 0.5), seed=9)
    assert torch.equal(sample.tokens, alone.tokens) and both.marginals[2].shape == (20, 4, 8)


# ----------------------------------------------------------------------------------- class_kept_se
@pytest.mark.parametrize("batch_size", [4096, 9])
def test_class_kept_se_matches_an_independent_computation(batch_size):
    rhm = RHM(8, 8, 2, 2, 3, seed=0)
    data = rhm.sample(40, seed=2)
    n_traj = 6
    res = forward_backward(data, "eps", [0.85], n_traj, BPDenoiser(rhm), seed=1, batch_size=batch_size)
    lev = res.levels[0]
    roots = lev.tree_hat[0][:, :, 0].tolist()  # (N, T) classes of the reconstructions
    labels = data.labels.tolist()
    per_x0 = [sum(r == y for r in row) / n_traj for row, y in zip(roots, labels, strict=True)]
    assert 0 < statistics.mean(per_x0) < 1  # a level where the class sometimes flips: a real test
    expected = statistics.stdev(per_x0) / math.sqrt(len(per_x0))
    assert lev.class_kept_se == pytest.approx(expected, rel=1e-12)
    assert lev.class_kept == pytest.approx(statistics.mean(per_x0), rel=1e-12)
