"""Local and convolutional kernels on rings and tori: brute force over patches, translation averaging,
symmetry/PSD, options and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.errors import ParameterError
from layerwise.kernels import conv_kernel, local_kernel, patch_index


def _C(a: torch.Tensor, b: torch.Tensor, base: str) -> float:
    """The base kernel on two patch vectors, written out."""
    if base == "laplace":
        return math.exp(-float((a - b).norm()) / 1.5)
    na, nb = float(a.norm()), float(b.norm())
    ua, ub = a / na, b / nb
    theta = 2 * math.atan2(float((ua - ub).norm()), float((ua + ub).norm()))  # accurate angle, 0 for a = b
    t = math.cos(theta)
    k0, k1 = (math.pi - theta) / math.pi, (math.sin(theta) + (math.pi - theta) * t) / math.pi
    return na * nb * (t * k0 + k1 if base == "ntk_relu" else k1)


def _patches(x: torch.Tensor, s: int) -> list[torch.Tensor]:
    """All periodic patches, by explicit index arithmetic (ring: (d,), torus: (h, w))."""
    if x.ndim == 1:
        d = x.shape[0]
        return [torch.stack([x[(i + k) % d] for k in range(s)]) for i in range(d)]
    h, w = x.shape
    return [torch.stack([x[(i + a) % h, (j + b) % w] for a in range(s) for b in range(s)])
            for i in range(h) for j in range(w)]


def brute(X, Y, s, base, conv):
    out = torch.empty(len(X), len(Y), dtype=torch.float64)
    for a, x in enumerate(X):
        px = _patches(x, s)
        for b, y in enumerate(Y):
            py = _patches(y, s)
            if conv:
                out[a, b] = sum(_C(p, q, base) for p in px for q in py) / len(px) ** 2
            else:
                out[a, b] = sum(_C(p, q, base) for p, q in zip(px, py, strict=True)) / len(px)
    return out


def _kw(base):
    return {"sigma": 1.5} if base == "laplace" else {}


@pytest.mark.parametrize("dims,shape,s", [(1, (7,), 3), (2, (3, 4), 2)])
@pytest.mark.parametrize("base", ["laplace", "ntk_relu", "nngp_relu"])
@pytest.mark.parametrize("conv", [False, True])
def test_brute_force(dims, shape, s, base, conv):
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(4, *shape, generator=gen, dtype=torch.float64)
    Y = torch.rand(3, *shape, generator=gen, dtype=torch.float64)
    fn = conv_kernel if conv else local_kernel
    torch.testing.assert_close(fn(X, Y, s, base, dims, **_kw(base)), brute(X, Y, s, base, conv),
                               rtol=1e-12, atol=1e-13)
    K = fn(X, None, s, base, dims, **_kw(base))
    torch.testing.assert_close(K, brute(X, X, s, base, conv), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dims,shape", [(1, (8,)), (2, (4, 3))])
@pytest.mark.parametrize("base", ["laplace", "ntk_relu"])
def test_conv_is_local_averaged_over_translations(dims, shape, base):
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(12, *shape, generator=gen, dtype=torch.float64)
    Y = torch.rand(9, *shape, generator=gen, dtype=torch.float64)
    axes = tuple(range(1, 1 + dims))
    shifts = [(r,) for r in range(shape[0])] if dims == 1 else [(a, b) for a in range(shape[0])
                                                               for b in range(shape[1])]
    avg = sum(local_kernel(X, torch.roll(Y, sh, axes), 2, base, dims, **_kw(base)) for sh in shifts)
    avg = avg / len(shifts)
    torch.testing.assert_close(conv_kernel(X, Y, 2, base, dims, **_kw(base)), avg, rtol=1e-12, atol=1e-13)
    # and so it is translation-invariant, while the local kernel is not
    Yt = torch.roll(Y, (1,) * dims, axes)
    torch.testing.assert_close(conv_kernel(X, Yt, 2, base, dims, **_kw(base)),
                               conv_kernel(X, Y, 2, base, dims, **_kw(base)), rtol=1e-12, atol=1e-13)
    assert not torch.allclose(local_kernel(X, Yt, 2, base, dims, **_kw(base)),
                              local_kernel(X, Y, 2, base, dims, **_kw(base)))


@pytest.mark.parametrize("fn", [local_kernel, conv_kernel])
@pytest.mark.parametrize("base", ["laplace", "ntk_relu", "nngp_relu", "gaussian"])
@pytest.mark.parametrize("dims,shape", [(1, (8,)), (2, (4, 4))])
def test_symmetric_psd(fn, base, dims, shape):
    X = torch.rand(50, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    K = fn(X, None, 2, base, dims)
    assert torch.equal(K, K.T)
    ev = torch.linalg.eigvalsh(K)
    assert ev.min() >= -1e-10 * ev.max()


def test_patch_index_ring_and_torus():
    assert patch_index((5,), 2).tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 0]]
    idx = patch_index((2, 3), 2)  # row-major torus: patch at (1, 2) wraps both ways
    assert idx.shape == (6, 4)
    assert idx[5].tolist() == [1 * 3 + 2, 1 * 3 + 0, 0 * 3 + 2, 0 * 3 + 0]


def test_options_block_size_dtype_and_s():
    X = torch.rand(21, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for fn in (local_kernel, conv_kernel):
        ref = fn(X, None, 3, "ntk_relu")
        torch.testing.assert_close(fn(X, None, 3, "ntk_relu", block_size=4), ref, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(fn(X, X[:5], 3, "ntk_relu", block_size=2), ref[:, :5], rtol=1e-13,
                                   atol=1e-13)
        assert fn(X.float(), None, 3, dtype=torch.float32).dtype == torch.float32
        assert not torch.allclose(fn(X, None, 2), fn(X, None, 3))


def test_bad_input_names_the_parameter():
    X = torch.rand(4, 6, dtype=torch.float64)
    with pytest.raises(ParameterError, match="s must be in \\[1, 6\\], got 7"):
        local_kernel(X, None, 7)
    with pytest.raises(ParameterError, match="s must be"):
        conv_kernel(X, None, 0)
    with pytest.raises(ParameterError, match="dims must be one of"):
        local_kernel(X, None, 2, dims=3)
    with pytest.raises(ParameterError, match="X must have 3 dimensions"):
        local_kernel(X, None, 2, dims=2)
    with pytest.raises(ParameterError, match="Y must have the trailing shape"):
        conv_kernel(X, torch.rand(3, 5), 2)
    bad = X.clone()
    bad[2, 2] = float("inf")
    with pytest.raises(ParameterError, match="X must be finite"):
        conv_kernel(bad, None, 2)
    with pytest.raises(ParameterError, match="base must be one of"):
        local_kernel(X, None, 2, base="rbf")


def test_threaded_blocks_equal_sequential_blocks():
    # blocked_gram spreads blocks over Python threads when torch has > 1 thread: the blocks write disjoint
    # parts of the output (symmetric mirror included), so the result is bit-identical to one thread.
    from layerwise.kernels import hierarchical_kernel

    X = torch.rand(37, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        out = {}
        for n in (1, 3):
            torch.set_num_threads(n)
            out[n] = (conv_kernel(X, None, 3, "ntk_relu", block_size=4),
                      local_kernel(X, X[:11], 2, block_size=5),
                      hierarchical_kernel(X, None, (2, 2), block_size=3))
            assert torch.get_num_threads() == n  # restored after the call
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(out[1], out[3], strict=True):
        assert torch.equal(a, b)
