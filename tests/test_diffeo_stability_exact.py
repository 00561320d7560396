"""relative_stability against hand computations from the model's own inputs: denominators over every
batch, fresh draws per batch and repeat, the two noise normalisations, in-support noise; bad input."""

from __future__ import annotations

import pytest
import torch

from layerwise.diffeo import principal_subspace, relative_stability, temperature_range
from layerwise.errors import InputDataError, ParameterError, ResourceError


def _images(n=40, c=1, size=12, seed=0, dtype=torch.float64):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Recording(torch.nn.Module):
    """Applies ``inner`` and records a copy of every input batch, in call order."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def _calls(inputs, n_batches, n_repeats):
    """Split the recorded calls: sweep 1 = per batch (clean, n_repeats diffeos), sweep 2 = (clean, noises)."""
    assert len(inputs) == 2 * n_batches * (1 + n_repeats)
    per = 1 + n_repeats
    sweep1, sweep2 = inputs[: n_batches * per], inputs[n_batches * per:]
    clean = [sweep1[b * per] for b in range(n_batches)]
    assert all(torch.equal(sweep2[b * per], clean[b]) for b in range(n_batches))
    deformed = [[sweep1[b * per + 1 + r] for r in range(n_repeats)] for b in range(n_batches)]
    noisy = [[sweep2[b * per + 1 + r] for r in range(n_repeats)] for b in range(n_batches)]
    return clean, deformed, noisy


def _pairs_mean(feats):
    n = len(feats)
    return torch.cdist(feats, feats).pow(2)[torch.triu(torch.ones(n, n, dtype=torch.bool), 1)].mean()


@pytest.mark.parametrize("noise_norm", ["mean", "per_image"])
@pytest.mark.parametrize("n_repeats", [1, 2])
def test_every_term_equals_a_hand_computation_from_the_model_inputs(noise_norm, n_repeats):
    """A nonlinear model records every batch it sees (batch_size 7 < N = 40: 6 batches). From those inputs
    D_f, G_f, R_f and the denominator are recomputed by hand (brute-force pairs over *all* images, so a
    denominator kept from the last batch only fails), and the noise norms are checked: the paper's
    normalisation gives every eta the norm mean ||tau x - x|| over all images and repeats; "per_image"
    gives each eta its own image's ||tau x - x||."""
    x = _images(40, c=2, size=10)
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(200, 6).double(), torch.nn.Tanh())
    model = Recording(inner)
    r = relative_stability(model, x, c=3, seed=3, batch_size=7, n_repeats=n_repeats, noise_norm=noise_norm,
                           progress=False)[""]
    clean, deformed, noisy = _calls(model.inputs, 6, n_repeats)
    assert torch.equal(torch.cat(clean), x)
    with torch.no_grad():
        f0 = [inner(c) for c in clean]
        d = torch.cat([((inner(xd) - f) ** 2).sum(1) for f, ds in zip(f0, deformed, strict=True)
                       for xd in ds])
        g = torch.cat([((inner(xn) - f) ** 2).sum(1) for f, ns in zip(f0, noisy, strict=True)
                       for xn in ns])
        pair = _pairs_mean(inner(x))
    assert r.pair_sq == pytest.approx(float(pair), rel=1e-9)
    assert r.diffeo_sq == pytest.approx(float(d.mean()), rel=1e-9)
    assert r.noise_sq == pytest.approx(float(g.mean()), rel=1e-9)
    assert r.D == pytest.approx(float(d.mean() / pair), rel=1e-9)
    assert r.G == pytest.approx(float(g.mean() / pair), rel=1e-9)
    assert r.R == pytest.approx(float(d.mean() / g.mean()), rel=1e-9)
    change = torch.cat([(xd - c).flatten(1).norm(dim=1) for c, ds in zip(clean, deformed, strict=True)
                        for xd in ds])
    eta = torch.cat([(xn - c).flatten(1).norm(dim=1) for c, ns in zip(clean, noisy, strict=True)
                     for xn in ns])
    if noise_norm == "mean":
        assert torch.allclose(eta, change.mean().expand_as(eta), rtol=1e-12, atol=0)
    else:
        assert torch.allclose(eta, change, rtol=1e-12, atol=0)
    assert float(change.std() / change.mean()) > 0.05  # the two normalisations really differ here


@pytest.mark.parametrize("estimator", ["mean", "median"])
def test_denominator_over_all_batches(estimator):
    """batch_size 7 < N = 40: the pairwise denominator is over all 780 pairs (mean or median)."""
    x = _images()
    res = relative_stability(torch.nn.Flatten(), x, c=3, seed=0, batch_size=7, estimator=estimator,
                             progress=False)[""]
    flat = x.flatten(1)
    pairs = torch.cdist(flat, flat).pow(2)[torch.triu(torch.ones(40, 40, dtype=torch.bool), 1)]
    expected = float(pairs.mean()) if estimator == "mean" else float(pairs.float().median())
    assert res.pair_sq == pytest.approx(expected, rel=1e-5)


def test_paper_normalisation_of_G_on_the_identity_is_E_n2_over_E_n_squared():
    """For f = identity, G_f(per_image) / G_f(paper) = E[n^2] / E[n]^2 exactly (n = ||tau x - x||, the same
    diffeo draws in both runs) and D_f is the same, so R_f(paper) = E[n^2] / E[n]^2 and R_f(per_image) = 1."""
    x = _images(40)
    model = Recording(torch.nn.Flatten())
    paper = relative_stability(model, x, c=3, seed=5, batch_size=16, progress=False)[""]
    clean, deformed, _ = _calls(model.inputs, 3, 1)
    n = torch.cat([(ds[0] - c).flatten(1).norm(dim=1) for c, ds in zip(clean, deformed, strict=True)])
    ratio = float((n**2).mean() / n.mean() ** 2)
    per = relative_stability(torch.nn.Flatten(), x, c=3, seed=5, batch_size=16, noise_norm="per_image",
                             progress=False)[""]
    assert paper.noise_norm == "mean" and per.noise_norm == "per_image"  # the default is the paper's
    assert paper.D == per.D
    assert per.G / paper.G == pytest.approx(ratio, rel=1e-10)
    assert paper.R == pytest.approx(ratio, rel=1e-10) and ratio > 1.001
    assert per.R == pytest.approx(1.0, abs=1e-12)


def test_draws_differ_between_batches_and_repeats():
    """Two batches hold the same 8 images: their diffeos and their noises must still be fresh draws (a
    generator re-seeded per batch or per repeat would deform both copies alike)."""
    a = _images(8, size=12, seed=1)
    x = torch.cat([a, a])
    model = Recording(torch.nn.Flatten())
    relative_stability(model, x, c=3, seed=0, batch_size=8, n_repeats=2, progress=False)
    clean, deformed, noisy = _calls(model.inputs, 2, 2)
    changes = [xd - c for c, ds in zip(clean, deformed, strict=True) for xd in ds]  # 4 x (8, 1, 12, 12)
    etas = [xn - c for c, ns in zip(clean, noisy, strict=True) for xn in ns]
    for group in (changes, etas):
        for i in range(4):
            for j in range(i + 1, 4):
                assert float((group[i] - group[j]).abs().max()) > 1e-3, (i, j)


def test_in_support_noise_lies_in_the_basis_span():
    """noise_basis: every eta lies in the span of the basis rows, with the paper's norm; D_f unchanged."""
    x = _images(30, size=8)
    basis = principal_subspace(x, k=5)
    assert basis.shape == (5, 64)
    model = Recording(torch.nn.Flatten())
    r = relative_stability(model, x, c=3, seed=0, batch_size=30, noise_basis=basis, progress=False)[""]
    assert r.noise_rank == 5
    clean, deformed, noisy = _calls(model.inputs, 1, 1)
    eta = (noisy[0][0] - clean[0]).flatten(1)
    residual = eta - (eta @ basis.T) @ basis
    assert float(residual.abs().max()) < 1e-10 * float(eta.abs().max())
    change = (deformed[0][0] - clean[0]).flatten(1).norm(dim=1)
    assert torch.allclose(eta.norm(dim=1), change.mean().expand(30), rtol=1e-12)
    iso = relative_stability(torch.nn.Flatten(), x, c=3, seed=0, batch_size=30, progress=False)[""]
    assert iso.noise_rank is None and iso.D == r.D
    with pytest.raises(ParameterError, match="noise_basis"):
        relative_stability(torch.nn.Flatten(), x, c=3, noise_basis=torch.ones(2, 64), progress=False)
    with pytest.raises(ParameterError, match="noise_basis"):
        relative_stability(torch.nn.Flatten(), x, c=3, noise_basis=basis[:, :10], progress=False)


def test_in_support_noise_makes_a_projection_sensitive():
    """A model that keeps only the data's support (projection on the basis) sees all of in-support noise but
    only k/D of isotropic noise: G_f(in-support) / G_f(isotropic) ~ D/k (64/4 = 16; within 30%)."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(4, 64, generator=g, dtype=torch.float64)
    x = (torch.randn(200, 4, generator=g, dtype=torch.float64) @ patterns).reshape(200, 1, 8, 8)
    basis = principal_subspace(x, variance=1.0)
    assert basis.shape[0] == 4

    class Project(torch.nn.Module):
        def forward(self, z):
            return z.flatten(1) @ basis.T

    iso = relative_stability(Project(), x, c=3, seed=1, n_repeats=4, progress=False)[""]
    sup = relative_stability(Project(), x, c=3, seed=1, n_repeats=4, noise_basis=basis, progress=False)[""]
    assert sup.G / iso.G == pytest.approx(16.0, rel=0.3)


def test_principal_subspace_recovers_a_planted_subspace():
    """Images built from 3 fixed patterns: the basis spans exactly those patterns (to 1e-10)."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(3, 64, generator=g, dtype=torch.float64)
    x = (torch.randn(50, 3, generator=g, dtype=torch.float64) @ patterns).reshape(50, 1, 8, 8)
    basis = principal_subspace(x, variance=1.0)
    assert basis.shape == (3, 64)
    q, _ = torch.linalg.qr(patterns.T)  # orthonormal basis of the planted span
    assert torch.allclose(basis @ q @ q.T, basis, atol=1e-10)
    assert torch.allclose(basis @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert principal_subspace(x, k=2).shape == (2, 64)
    with pytest.raises(ParameterError, match="k"):
        principal_subspace(x, k=4)  # only 3 directions exist


# ---- silent garbage refused (issue 21) --------------------------------------------------------------------
def _lin(nan=False, constant=False):
    torch.manual_seed(0)
    lin = torch.nn.Linear(144, 5).double()
    with torch.no_grad():
        if nan:
            lin.weight[0, 0] = float("nan")
        if constant:
            lin.weight.zero_()
    return torch.nn.Sequential(torch.nn.Flatten(), lin)


def test_non_finite_images_weights_and_outputs_are_named():
    x = _images(20)
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(InputDataError, match="NaN or inf"):
        relative_stability(_lin(), bad, c=3, progress=False)
    bad[3, 0, 0, 0] = float("inf")
    with pytest.raises(InputDataError, match="1 of 20 images"):
        relative_stability(_lin(), bad, c=3, progress=False)
    with pytest.raises(ParameterError, match="parameter '1.weight'"):
        relative_stability(_lin(nan=True), x, c=3, progress=False)

    class Blowup(torch.nn.Module):  # finite weights, non-finite outputs
        def forward(self, z):
            return (z.flatten(1) * 1e308) * 1e308

    with pytest.raises(ParameterError, match="NaN or inf"):
        relative_stability(Blowup(), x, c=3, progress=False)


def test_constant_model_and_constant_or_identical_images_are_refused():
    x = _images(20)
    with pytest.raises(ParameterError, match="constant"):
        relative_stability(_lin(constant=True), x, c=3, progress=False)
    with pytest.raises(ParameterError, match="layer '1' is constant"):
        _constant_inner_layer(x)
    flat = torch.ones(20, 1, 12, 12, dtype=torch.float64) * torch.rand(20, 1, 1, 1, dtype=torch.float64)
    with pytest.raises(InputDataError, match="constant"):
        relative_stability(_lin(), flat, c=3, progress=False)
    same = x[:1].expand(5, -1, -1, -1).contiguous()
    with pytest.raises(InputDataError, match="identical"):
        relative_stability(_lin(), same, c=3, progress=False)


def _constant_inner_layer(x):
    zero = torch.nn.Linear(144, 3).double()
    with torch.no_grad():
        zero.weight.zero_()
    model = torch.nn.Sequential(torch.nn.Flatten(), zero, torch.nn.Identity())
    relative_stability(model, x, layers=["1"], c=3, progress=False)


def test_temperature_zero_tiny_and_below_T_min():
    x = _images(20)
    t_min, _ = temperature_range(12, 3)
    with pytest.raises(ParameterError, match="T must be > 0"):
        relative_stability(_lin(), x, c=3, T=0.0, progress=False)
    with pytest.raises(ParameterError, match="T_min"):
        relative_stability(_lin(), x, c=3, T=1e-300, progress=False)
    with pytest.raises(ParameterError, match="T_min"):
        relative_stability(_lin(), x, c=3, T=t_min / 2, progress=False)
    # Allowed when asked, and then a sane measurement...
    r = relative_stability(_lin(), x, c=3, T=t_min / 2, allow_below_T_min=True, progress=False)[""]
    assert r.T == t_min / 2 and r.D > 0
    # ...but round-off is refused even then.
    with pytest.raises(ParameterError, match="round-off"):
        relative_stability(_lin(), x, c=3, T=1e-300, allow_below_T_min=True, progress=False)
    with pytest.raises(ParameterError, match="round-off"):
        relative_stability(_lin().float(), x.float(), c=3, T=1e-20, allow_below_T_min=True, progress=False)


def test_memory_and_time_estimates_refuse_before_the_work():
    x = _images(20)
    model = Recording(torch.nn.Flatten())
    with pytest.raises(ResourceError, match="would need about"):
        relative_stability(model, x, c=3, n_repeats=10**9, progress=False)
    assert model.inputs == []  # refused before any forward pass
    with pytest.raises(ResourceError, match="would take about"):
        relative_stability(model, x, c=3, n_repeats=10**6, batch_size=5, max_seconds=1.0, progress=False)
    assert len(model.inputs) == 2  # one clean and one deformed batch were timed, nothing more
    relative_stability(torch.nn.Flatten(), x, c=3, max_seconds=600.0, progress=False)  # fits: runs


def test_a_layer_blind_to_the_noise_is_refused():
    """A model that keeps only directions orthogonal to the noise subspace: its response to the noise is
    round-off (G_f ~ 1e-30), so R_f would be garbage; refused, naming the layer."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    noise_dirs, kept = q[:, :8].T.contiguous(), q[:, 8:].T.contiguous()
    x = _images(30, size=8)

    class Blind(torch.nn.Module):
        def forward(self, z):
            return z.flatten(1) @ kept.T

    with pytest.raises(ParameterError, match="does not respond to the noise"):
        relative_stability(Blind(), x, c=3, noise_basis=noise_dirs, progress=False)
    r = relative_stability(Blind(), x, c=3, progress=False)[""]  # isotropic noise: it does respond
    assert r.G > 0.5 * r.D


@pytest.mark.parametrize("estimator", ["mean", "median"])
def test_identity_layer_with_per_image_noise_has_R_exactly_one(estimator):
    """noise_norm="per_image": for f = identity ||f(x + eta) - f(x)|| = ||eta|| = ||tau x - x|| image by
    image, so D = G and R = 1 exactly, at the output and at a hooked inner module."""
    x = _images()
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Flatten())
    res = relative_stability(model, x, layers=["", "0"], c=3, estimator=estimator, noise_norm="per_image",
                             seed=0, batch_size=7, progress=False)
    for layer in ("", "0"):
        assert res[layer].R == pytest.approx(1.0, abs=1e-12)
        assert res[layer].D == pytest.approx(res[layer].G, rel=1e-12)
