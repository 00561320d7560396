"""hierarchical_kernel against a direct per-pair recursion, the one-layer closed forms, and the empirical NTK
of a wide finite tree CNN (autograd, independent of the recursion)."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.errors import ParameterError, ParameterTypeError
from layerwise.kernels import hierarchical_kernel, nngp_relu, ntk_relu, patch_spheres


def _k0(t: float) -> float:
    return (math.pi - math.acos(max(-1.0, min(1.0, t)))) / math.pi


def _k1(t: float) -> float:
    t = max(-1.0, min(1.0, t))
    return (math.sqrt(max(0.0, 1 - t * t)) + (math.pi - math.acos(t)) * t) / math.pi


def direct(x: list[float], y: list[float], filters: tuple[int, ...], kind: str) -> float:
    """The design note's recursion for one pair, with plain floats and explicit norms (no normalisation
    tricks): Sigma_{l+1} = mean_children sqrt(Dx Dy) k1(cos), Theta_{l+1} = mean_children[k0(cos) Theta_l]
    + Sigma_{l+1}; the readout averages over the remaining positions."""
    s1 = filters[0]
    n0 = len(x) // s1
    patches_x = [x[p * s1:(p + 1) * s1] for p in range(n0)]
    patches_y = [y[p * s1:(p + 1) * s1] for p in range(n0)]
    S = [sum(a * b for a, b in zip(px, py, strict=True)) for px, py in zip(patches_x, patches_y, strict=True)]
    Dx = [sum(a * a for a in px) for px in patches_x]
    Dy = [sum(b * b for b in py) for py in patches_y]
    T = list(S)
    groups = list(filters[1:]) + [len(x) // math.prod(filters)]
    for g in groups:
        S2, T2, Dx2, Dy2 = [], [], [], []
        for p in range(len(S) // g):
            kids = range(p * g, (p + 1) * g)
            sig = th = 0.0
            for c in kids:
                norm = math.sqrt(Dx[c] * Dy[c])
                cos = S[c] / norm
                sig += norm * _k1(cos) / g
                th += _k0(cos) * T[c] / g
            S2.append(sig)
            T2.append(th + sig)
            Dx2.append(sum(Dx[c] for c in kids) / g)
            Dy2.append(sum(Dy[c] for c in kids) / g)
        S, T, Dx, Dy = S2, T2, Dx2, Dy2
    assert len(S) == 1
    return T[0] if kind == "ntk" else S[0]


@pytest.mark.parametrize("filters,d", [((2, 2), 4), ((3, 2), 12), ((2, 2, 2), 8), ((4,), 8)])
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_equals_direct_recursion(filters, d, kind):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(6, d, generator=gen, dtype=torch.float64)  # general norms (not on spheres)
    Y = torch.randn(4, d, generator=gen, dtype=torch.float64)
    K = hierarchical_kernel(X, Y, filters, kind)
    ref = torch.tensor([[direct(x.tolist(), y.tolist(), filters, kind) for y in Y] for x in X],
                       dtype=torch.float64)
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-12)
    # Symmetric path (one triangle + mirror) agrees with the rectangular one, and with small blocks.
    Ks = hierarchical_kernel(X, None, filters, kind, block_size=2)
    ref_s = torch.tensor([[direct(a.tolist(), b.tolist(), filters, kind) for b in X] for a in X],
                         dtype=torch.float64)
    torch.testing.assert_close(Ks, ref_s, rtol=1e-12, atol=1e-12)
    assert torch.equal(Ks, Ks.T)


def test_unit_patch_inputs_use_the_fast_path_and_agree():
    X = patch_spheres(16, 4)(7, torch.Generator().manual_seed(0))
    K = hierarchical_kernel(X, None, (4, 4))
    ref = torch.tensor([[direct(a.tolist(), b.tolist(), (4, 4), "ntk") for b in X] for a in X],
                       dtype=torch.float64)
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-12)


def test_one_layer_is_the_relu_ntk_and_nngp():
    X = torch.randn(9, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(hierarchical_kernel(X, None, (5,), "ntk"), ntk_relu(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hierarchical_kernel(X, None, (5,), "nngp"), nngp_relu(X), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_symmetric_psd(kind):
    X = patch_spheres(8, 2)(60, torch.Generator().manual_seed(3))
    K = hierarchical_kernel(X, None, (2, 2, 2), kind)
    assert torch.equal(K, K.T)
    ev = torch.linalg.eigvalsh(K)
    assert ev.min() >= -1e-10 * ev.max()


def test_kind_option_changes_the_kernel():
    X = torch.randn(4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ntk, nngp = hierarchical_kernel(X, None, (2, 4), "ntk"), hierarchical_kernel(X, None, (2, 4), "nngp")
    assert not torch.allclose(ntk, nngp)


def test_dtype_option():
    X = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    assert hierarchical_kernel(X, None, (2, 4)).dtype == torch.float64
    assert hierarchical_kernel(X, None, (2, 4), dtype=torch.float32).dtype == torch.float32


def test_bad_input_names_the_parameter():
    X = torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(ParameterError, match="filters"):
        hierarchical_kernel(X, None, (5,))  # 5 does not divide 12
    with pytest.raises(ParameterError, match="filters"):
        hierarchical_kernel(X, None, (4, 2))  # product 8 does not divide 12
    with pytest.raises(ParameterTypeError, match="filters"):
        hierarchical_kernel(X, None, 4)
    with pytest.raises(ParameterError, match="filters\\[0\\]"):
        hierarchical_kernel(X, None, (0, 2))
    with pytest.raises(ParameterError, match="kind"):
        hierarchical_kernel(X, None, (2, 2), kind="rfk")
    bad = X.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ParameterError, match="X must be finite"):
        hierarchical_kernel(bad, None, (2, 2))
    with pytest.raises(ParameterError, match="Y must have the trailing shape"):
        hierarchical_kernel(X, torch.randn(2, 8, dtype=torch.float64), (2, 2))
    with pytest.raises(ParameterError, match="X must have 2 dimensions"):
        hierarchical_kernel(X[None], None, (2, 2))
    with pytest.raises(ParameterError, match="block_size"):
        hierarchical_kernel(X, None, (2, 2), block_size=0)


# ------------------------------------------------------------------------------- empirical NTK of a tree CNN
def _tree_cnn_ntk(X: torch.Tensor, filters: tuple[int, ...], width: int, seed: int) -> torch.Tensor:
    """Empirical NTK J J^T of a finite tree CNN in NTK parametrisation (standard normal weights, explicit
    1/sqrt(fan-in) factors): first conv (filter = stride = s_1) with factor 1 (so the pre-activation
    covariance is <x_p, y_p>), later convs and the readout with sqrt(2 / fan-in); shared filters."""
    gen = torch.Generator().manual_seed(seed)
    n, d = X.shape
    s1 = filters[0]
    weights = [torch.randn(width, s1, generator=gen)]
    for s in filters[1:]:
        weights.append(torch.randn(width, width * s, generator=gen))
    n_top = d // math.prod(filters)
    weights.append(torch.randn(width * n_top, generator=gen))
    for w in weights:
        w.requires_grad_(True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x.view(d // s1, s1) @ weights[0].T  # (positions, width) pre-activations of layer 1
        for w, s in zip(weights[1:-1], filters[1:], strict=True):
            a = torch.relu(h).reshape(-1, s * width)  # (positions / s, s * width): children stacked
            h = a @ w.T * math.sqrt(2.0 / (s * width))
        return torch.relu(h).reshape(-1) @ weights[-1] * math.sqrt(2.0 / (width * n_top))

    grads = []
    for x in X.float():
        g = torch.autograd.grad(forward(x), weights)
        grads.append(torch.cat([t.reshape(-1) for t in g]).double())
    J = torch.stack(grads)  # (n, params)
    return J @ J.T


def test_matches_empirical_ntk_of_a_wide_tree_cnn():
    # Width 2048, filters (2, 2), 4 inputs with unit-norm patches, 4 independent networks. Each entry of the
    # average must lie within 4 standard errors (estimated from the 4 networks) of the kernel, with the
    # standard error itself small (< 3% of the largest entry) so that the check has teeth: the NNGP (the
    # same recursion without the tangent terms) lies > 40% away.
    X = patch_spheres(4, 2)(4, torch.Generator().manual_seed(5))
    emp = torch.stack([_tree_cnn_ntk(X, (2, 2), 2048, seed) for seed in range(4)])  # (nets, 4, 4)
    mean, se = emp.mean(0), emp.std(0) / math.sqrt(emp.shape[0])
    ntk = hierarchical_kernel(X, None, (2, 2), "ntk")
    scale = float(ntk.abs().max())
    assert float(se.max()) < 0.03 * scale
    assert bool(((mean - ntk).abs() <= 4 * se + 1e-3 * scale).all()), ((mean - ntk) / se)
    nngp = hierarchical_kernel(X, None, (2, 2), "nngp")
    assert float((mean - nngp).abs().max()) > 0.4 * scale
