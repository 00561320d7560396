"""Base kernels: closed forms, Monte Carlo over random ReLU features, arc-cosine accuracy near +-1, the
registry, and the checks at the public boundary."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from layerwise.errors import ParameterError, ParameterTypeError
from layerwise.kernels import (
    BASE_KERNELS,
    arccos_k0,
    arccos_k1,
    full_kernel,
    get_base_kernel,
    laplace,
    local_kernel,
    nngp_relu,
    ntk_relu,
    register_base_kernel,
)

mpmath.mp.dps = 50


def _mp_k1(t: float) -> float:
    t = mpmath.mpf(t)
    return float((mpmath.sqrt((1 - t) * (1 + t)) + (mpmath.pi - mpmath.acos(t)) * t) / mpmath.pi)


def _mp_ntk_unit(t: float) -> float:
    """t k0(t) + k1(t) in 50-digit arithmetic."""
    t = mpmath.mpf(t)
    k0 = (mpmath.pi - mpmath.acos(t)) / mpmath.pi
    return float(t * k0 + (mpmath.sqrt((1 - t) * (1 + t)) + (mpmath.pi - mpmath.acos(t)) * t) / mpmath.pi)


NEAR_ONE = [1 - 1e-6, 1 - 1e-10, 1 - 2**-50, -1 + 1e-10, -1 + 2**-50, 0.3]


@pytest.mark.parametrize("t", NEAR_ONE)
def test_arccos_k1_is_accurate_near_plus_minus_one(t):
    got = float(arccos_k1(torch.tensor([t], dtype=torch.float64)))
    ref = _mp_k1(t)
    assert abs(got - ref) <= 4e-16 * max(1.0, abs(ref)) + 1e-300
    # The sqrt(1 - t^2) term on its own, relative accuracy (the naive 1 - t*t loses half the digits).
    tt = torch.tensor([t], dtype=torch.float64)
    stable = float(((1 - tt) * (1 + tt)).sqrt())
    exact = float(mpmath.sqrt((1 - mpmath.mpf(t)) * (1 + mpmath.mpf(t))))
    assert abs(stable - exact) <= 1e-15 * exact


def test_naive_sqrt_term_would_fail_the_accuracy_check():
    # Guard: the check above distinguishes the stable form from the naive one.
    t = torch.tensor([1 - 1e-10], dtype=torch.float64)
    naive = float((1 - t * t).sqrt())
    exact = float(mpmath.sqrt(1 - mpmath.mpf(float(t)) ** 2))
    assert abs(naive - exact) > 1e-12 * exact


@pytest.mark.parametrize("t", NEAR_ONE)
def test_registered_ntk_function_is_accurate_near_plus_minus_one(t):
    fn = get_base_kernel("ntk_relu").fn
    got = float(fn(torch.tensor([t], dtype=torch.float64)))
    assert abs(got - _mp_ntk_unit(t)) <= 2e-15


def test_no_nan_outside_minus_one_one():
    t = torch.tensor([1 + 1e-15, -1 - 1e-15, 1 + 1e-3], dtype=torch.float64)
    for f in (arccos_k0, arccos_k1):
        assert bool(torch.isfinite(f(t)).all())
    torch.testing.assert_close(arccos_k1(t), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))


def test_identical_points_give_exact_diagonal():
    X = torch.rand(30, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    n2 = (X * X).sum(1)
    assert torch.equal(laplace(X, sigma=2.0).diagonal(), torch.ones(30, dtype=torch.float64))
    # NTK(x, x) = 2 |x|^2, NNGP(x, x) = |x|^2, to round-off (the cosine is snapped to exactly 1).
    torch.testing.assert_close(ntk_relu(X).diagonal(), 2 * n2, rtol=1e-14, atol=0)
    torch.testing.assert_close(nngp_relu(X).diagonal(), n2, rtol=1e-14, atol=0)


def test_closed_forms_against_explicit_formulas():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    Y = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    dist = (X[:, None, :] - Y[None, :, :]).norm(dim=-1)
    torch.testing.assert_close(laplace(X, Y, sigma=1.7), torch.exp(-dist / 1.7), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(full_kernel(X, Y, "gaussian", sigma=0.8), torch.exp(-dist**2 / (2 * 0.64)),
                               rtol=1e-12, atol=1e-14)
    nx, ny = X.norm(dim=1)[:, None], Y.norm(dim=1)[None, :]
    t = (X @ Y.T) / (nx * ny)
    theta = torch.arccos(t)
    k0 = (math.pi - theta) / math.pi
    k1 = (torch.sin(theta) + (math.pi - theta) * t) / math.pi
    torch.testing.assert_close(nngp_relu(X, Y), nx * ny * k1, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ntk_relu(X, Y), nx * ny * (t * k0 + k1), rtol=1e-12, atol=1e-13)


def test_relu_kernels_match_monte_carlo_over_random_features():
    # One hidden layer f(x) = sqrt(2/h) sum_i a_i relu(w_i . x): NNGP = 2 E[relu(w.x) relu(w.y)],
    # NTK = NNGP + <x, y> 2 E[relu'(w.x) relu'(w.y)]. 400k features: standard error ~0.3% of the entries.
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    W = torch.randn(400_000, 3, generator=gen, dtype=torch.float64)
    H = W @ X.T  # (features, points)
    relu, step = H.clamp_min(0), (H > 0).double()
    nngp_mc = 2 * relu.T @ relu / W.shape[0]
    ntk_mc = nngp_mc + (X @ X.T) * (2 * step.T @ step / W.shape[0])
    assert (nngp_mc - nngp_relu(X)).abs().max() < 0.02 * nngp_relu(X).abs().max()
    assert (ntk_mc - ntk_relu(X)).abs().max() < 0.02 * ntk_relu(X).abs().max()
    # ... and the NNGP alone is not the NTK (the check separates them).
    assert (ntk_mc - nngp_relu(X)).abs().max() > 0.2 * ntk_relu(X).abs().max()


@pytest.mark.parametrize("name", sorted(BASE_KERNELS.names()))
def test_every_registered_base_kernel_is_symmetric_psd(name):
    # The shared check over the registry: full-input, local and conv Gram matrices.
    X = torch.rand(40, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for K in (full_kernel(X, None, name), local_kernel(X, None, 3, name)):
        assert torch.equal(K, K.T)
        ev = torch.linalg.eigvalsh(K)
        assert ev.min() >= -1e-10 * ev.max()


def test_user_registered_kernel_is_usable_and_checked():
    @register_base_kernel("test-cauchy", kind="radial", params={"sigma": 1.0})
    def _cauchy(r2, sigma):
        return 1.0 / (1.0 + r2 / sigma**2)

    try:
        X = torch.rand(5, 4, dtype=torch.float64)
        K = full_kernel(X, None, "test-cauchy", sigma=2.0)
        ref = 1.0 / (1.0 + ((X[:, None] - X[None]) ** 2).sum(-1) / 4.0)
        torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-13)
        with pytest.raises(ParameterError, match="takes parameters \\['sigma'\\]"):
            full_kernel(X, None, "test-cauchy", width=1.0)
        with pytest.raises(ValueError, match="already registered"):
            register_base_kernel("test-cauchy", kind="radial")(_cauchy)
    finally:
        BASE_KERNELS.unregister("test-cauchy")
    with pytest.raises(ParameterError, match="kind must be one of"):
        register_base_kernel("test-bad", kind="polar")


def test_sigma_option_changes_laplace():
    X = torch.rand(5, 4, dtype=torch.float64)
    assert not torch.allclose(laplace(X, sigma=1.0), laplace(X, sigma=3.0))


def test_options_dtype_block_size_and_y():
    X = torch.rand(23, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = ntk_relu(X)
    assert ref.dtype == torch.float64
    assert ntk_relu(X.float(), dtype=torch.float32).dtype == torch.float32
    assert ntk_relu(X.float()).dtype == torch.float64  # float64 by default, whatever the input
    torch.testing.assert_close(ntk_relu(X, block_size=4), ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ntk_relu(X, X), ref, rtol=1e-14, atol=1e-14)


def test_bad_input_names_the_parameter():
    X = torch.rand(5, 4, dtype=torch.float64)
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ParameterError, match="X must be finite"):
        laplace(bad)
    with pytest.raises(ParameterError, match="Y must be finite"):
        laplace(X, bad)
    with pytest.raises(ParameterError, match="sigma"):
        laplace(X, sigma=-1.0)
    with pytest.raises(ParameterError, match="base must be one of"):
        full_kernel(X, None, "no-such-kernel")
    with pytest.raises(ParameterError, match="X must have 2 dimensions"):
        laplace(X[0])
    with pytest.raises(ParameterTypeError, match="X must hold real numbers"):
        laplace(X > 0.5)
    with pytest.raises(ParameterError, match="block_size"):
        laplace(X, block_size=0)


@pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py)
def test_cuda_matches_cpu():
    X = torch.rand(50, 8, dtype=torch.float64)
    K = local_kernel(X.cuda(), None, 2, "ntk_relu")
    assert K.device.type == "cuda"
    torch.testing.assert_close(K.cpu(), local_kernel(X, None, 2, "ntk_relu"))
