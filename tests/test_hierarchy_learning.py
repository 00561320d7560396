"""Learning the RHM: models (architecture, scalings, seeds), trainer options, synonymic sensitivity (exact
and invariant cases), the correlation estimate of P*."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layerwise.hierarchy import RHM, one_hot
from layerwise.hierarchy.learning import (
    FullyConnected,
    HierarchicalCNN,
    TrainConfig,
    TransformerClassifier,
    correlation_curve,
    correlation_sample_complexity,
    default_layers,
    evaluate,
    synonymic_sensitivity,
    train,
)
from layerwise.hierarchy.statistics import relative_fluctuation, tuple_class_frequencies

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------- models
def _manual_cnn(net: HierarchicalCNN, x: torch.Tensor) -> torch.Tensor:
    """The hierarchical CNN written with explicit patches: each output position sees s inputs only."""
    h = x.double()
    for layer in net.layers:
        w = layer.weight.double()  # (h, C, s)
        n_out = h.shape[2] // net.s
        patches = h.reshape(h.shape[0], h.shape[1], n_out, net.s)  # (N, C, n_out, s)
        h = torch.relu(torch.einsum("ncjs,hcs->nhj", patches, w) / math.sqrt(w.shape[1] * net.s))
    return h.flatten(1) @ net.readout.weight.double() / net.readout.norm


def test_hierarchical_cnn_matches_explicit_patches_and_scalings():
    rhm = RHM(8, 4, 2, 2, 3, seed=0)
    x = one_hot(rhm.sample(5, seed=1).tokens, 8)
    std = HierarchicalCNN(8, 4, 2, 3, width=16, scaling="standard", seed=3)
    mf = HierarchicalCNN(8, 4, 2, 3, width=16, scaling="meanfield", seed=3)
    torch.testing.assert_close(std(x).double(), _manual_cnn(std, x), rtol=1e-5, atol=1e-6)
    assert std(x).shape == (5, 4)
    # Same weights; the mean-field readout divides by h instead of sqrt(h).
    torch.testing.assert_close(std(x), mf(x) * math.sqrt(16), rtol=1e-5, atol=1e-6)
    assert [n for n, _ in std.named_children()] == ["layers", "readout"]
    assert default_layers(std) == ["input", "layers.0", "layers.1", "layers.2", "output"]


def test_cnn_first_layer_is_local_with_stride_s():
    net = HierarchicalCNN(4, 2, 3, 2, width=8, seed=0)  # s = 3, d = 9
    x = torch.rand(1, 4, 9)
    out = net.layers[0](x)  # (1, 8, 3)
    x2 = x.clone()
    x2[0, :, 4] += 1.0  # position 4 belongs to the second patch [3, 6)
    diff = (net.layers[0](x2) - out).abs().sum(1)[0]  # (3,)
    assert diff[1] > 0 and diff[0] == 0 and diff[2] == 0


def test_models_seeded_and_bad_input():
    a, b = HierarchicalCNN(8, 8, 2, 2, 8, seed=1), HierarchicalCNN(8, 8, 2, 2, 8, seed=1)
    c = HierarchicalCNN(8, 8, 2, 2, 8, seed=2)
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)
    t1, t2 = TransformerClassifier(8, 4, 3, dim=16, seed=5), TransformerClassifier(8, 4, 3, dim=16, seed=5)
    x = torch.rand(2, 8, 4)
    assert torch.equal(t1(x), t2(x)) and t1(x).shape == (2, 3)
    fc = FullyConnected(8, 4, 3, width=10, seed=0)
    assert fc(x).shape == (2, 3)
    with pytest.raises(ValueError, match=r"one-hot \(N, 8, 4\)"):
        a(torch.rand(2, 8, 5))
    with pytest.raises(ValueError, match="scaling must be one of"):
        HierarchicalCNN(8, 8, 2, 2, 8, scaling="ntk")
    with pytest.raises(ValueError, match="divisible"):
        TransformerClassifier(8, 4, 3, dim=10, heads=3)


# ----------------------------------------------------------------------------------- trainer
def _data(P=128, seed=0):
    rhm = RHM(8, 8, 2, 2, 2, seed=0)
    s = rhm.sample(P, seed=seed)
    return rhm, one_hot(s.tokens, 8), s.labels


def test_train_stops_at_threshold_and_is_deterministic():
    rhm, x, y = _data()
    cfg = TrainConfig(optimizer="adam", lr=0.02, epochs=200, batch_size=32, loss_threshold=0.05)
    nets = [HierarchicalCNN(8, 8, 2, 2, 32, seed=0) for _ in range(2)]
    r1, r2 = (train(n, x, y, cfg, seed=4) for n in nets)
    assert r1.converged and r1.epochs < 200 and r1.train_loss < 0.05 and r1.history[-1] == r1.train_loss
    assert r1.steps == r1.epochs * 4  # ceil(128 / 32) steps per epoch
    assert r1.history == r2.history and torch.equal(nets[0].layers[0].weight, nets[1].layers[0].weight)
    assert evaluate(nets[0], x, y)["error"] == 0.0
    # No threshold: the whole budget runs.
    r3 = train(HierarchicalCNN(8, 8, 2, 2, 32, seed=0), x, y,
               TrainConfig(optimizer="adam", lr=0.02, epochs=3, loss_threshold=None), seed=4)
    assert r3.epochs == 3 and not r3.converged


@pytest.mark.parametrize("change", [{"optimizer": "adam"}, {"schedule": "constant"}, {"momentum": 0.0},
                                    {"weight_decay": 0.1}, {"lr": 0.05}, {"batch_size": 16}])
def test_every_train_option_changes_the_result(change):
    _, x, y = _data(64)
    base = dict(optimizer="sgd", lr=0.2, momentum=0.9, schedule="cosine", epochs=3, batch_size=32,
                loss_threshold=None)
    a, b = HierarchicalCNN(8, 8, 2, 2, 16, seed=0), HierarchicalCNN(8, 8, 2, 2, 16, seed=0)
    train(a, x, y, TrainConfig(**base), seed=0)
    train(b, x, y, TrainConfig(**{**base, **change}), seed=0)
    assert not torch.allclose(a.layers[0].weight, b.layers[0].weight)


def test_train_seed_changes_batch_order_and_bad_config():
    _, x, y = _data(64)
    a, b = HierarchicalCNN(8, 8, 2, 2, 16, seed=0), HierarchicalCNN(8, 8, 2, 2, 16, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=16, loss_threshold=None)
    train(a, x, y, cfg, seed=0)
    train(b, x, y, cfg, seed=1)
    assert not torch.allclose(a.layers[0].weight, b.layers[0].weight)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="momentum"):
        TrainConfig(momentum=1.0)
    with pytest.raises(ValueError, match="long labels"):
        train(a, x, y.float(), cfg)


def test_evaluate_matches_manual():
    _, x, y = _data(50)
    net = HierarchicalCNN(8, 8, 2, 2, 16, seed=0)
    with torch.no_grad():
        logits = net(x)
    ev = evaluate(net, x, y, batch_size=7)
    assert ev["error"] == pytest.approx(float((logits.argmax(1) != y).double().mean()))
    assert ev["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)


@pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py)
def test_train_on_cuda_matches_cpu_batch_order():
    _, x, y = _data(64)
    net = HierarchicalCNN(8, 8, 2, 2, 16, seed=0)
    res = train(net, x, y, TrainConfig(epochs=2, loss_threshold=None), seed=0, device="cuda")
    assert next(net.parameters()).is_cuda and res.epochs == 2
    rhm = RHM(8, 8, 2, 2, 2, seed=0)
    assert set(synonymic_sensitivity(net, rhm, 1, n=64)) == set(default_layers(net))


# ----------------------------------------------------------------------------------- sensitivity
class _ParentLookup(nn.Module):
    """Maps each input s-tuple to the one-hot of its parent symbol (exact, via the rules): invariant to
    input-level synonyms by construction."""

    def __init__(self, rhm: RHM) -> None:
        super().__init__()
        table = rhm.rules[rhm.L - 1]  # (v, m, s)
        self.s, self.v = rhm.s, rhm.v
        ids = (table * rhm.v ** torch.arange(rhm.s - 1, -1, -1)).sum(-1)  # (v, m)
        parent = torch.full((rhm.v**rhm.s,), -1, dtype=torch.long)
        parent[ids.reshape(-1)] = torch.arange(rhm.v).repeat_interleave(rhm.m)
        self.register_buffer("parent", parent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.argmax(1)  # (N, d)
        tuples = tokens.reshape(tokens.shape[0], -1, self.s)
        ids = (tuples * self.v ** torch.arange(self.s - 1, -1, -1)).sum(-1)  # (N, d/s)
        return nn.functional.one_hot(self.parent[ids], self.v).float()


class _Lookup(nn.Module):
    def __init__(self, rhm: RHM) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.parent = _ParentLookup(rhm)

    def forward(self, x):
        return self.parent(x).flatten(1) * self.scale


def test_sensitivity_zero_for_an_invariant_layer_and_exact_for_the_input():
    rhm = RHM(8, 8, 2, 2, 3, seed=0)
    model = _Lookup(rhm)
    low = synonymic_sensitivity(model, rhm, level=2, layers=["input", "parent"], n=300, seed=7)
    assert low["parent"] == 0.0 and low["input"] > 0.2
    high = synonymic_sensitivity(model, rhm, level=1, layers=["parent"], n=300, seed=7)
    assert high["parent"] > 0.2
    # The input's S equals the formula computed directly on the same draws.
    gen = torch.Generator().manual_seed(7)
    x = rhm.sample(300, seed=gen)
    px = rhm.resample_level(x, 2, seed=gen)
    y = rhm.sample(300, seed=gen)
    enc = lambda s: one_hot(s.tokens, 8).double()  # noqa: E731
    direct = float(((enc(x) - enc(px)) ** 2).sum() / ((enc(x) - enc(y)) ** 2).sum())
    assert low["input"] == pytest.approx(direct, rel=1e-12)


def test_sensitivity_batches_whiten_and_errors():
    rhm = RHM(8, 8, 2, 2, 2, seed=0)
    net = HierarchicalCNN(8, 8, 2, 2, 16, seed=0)
    a = synonymic_sensitivity(net, rhm, 1, n=100, batch_size=100, seed=1)
    b = synonymic_sensitivity(net, rhm, 1, n=100, batch_size=13, seed=1)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    w = synonymic_sensitivity(net, rhm, 1, layers=["layers.0"], n=100, seed=1, whiten=True)
    assert w["layers.0"] != pytest.approx(a["layers.0"], rel=1e-3)
    tr = TransformerClassifier(8, 4, 8, dim=16, seed=0)
    assert set(synonymic_sensitivity(tr, rhm, 0, n=32)) == {"input", "blocks.0", "blocks.1", "output"}
    with pytest.raises(ValueError, match="not modules of the model"):
        synonymic_sensitivity(net, rhm, 1, layers=["layers.7"])
    with pytest.raises(ValueError, match="level must be in"):
        synonymic_sensitivity(net, rhm, 2)


# ----------------------------------------------------------------------------------- correlations
@pytest.mark.parametrize("vml", [(8, 2, 3), (16, 2, 3)])
def test_correlation_signal_and_noise_match_exact_values(vml):
    """At P >> n_c m^L: measured^2 - noise^2 = exact^2 (within 5%) and noise ~ sqrt(v m n_c / P)."""
    v, m, L = vml
    rhm = RHM(v, v, m, 2, L, seed=1)
    exact = relative_fluctuation(tuple_class_frequencies(rhm))
    P = 32 * v * m**L
    measured, noise = correlation_curve(rhm, [P], n_repeats=4, seed=0)
    assert math.sqrt(measured[0] ** 2 - noise[0] ** 2) == pytest.approx(exact, rel=0.05)
    assert noise[0] == pytest.approx(math.sqrt(v * m * v / P), rel=0.2)


def test_correlation_p_star_scales_with_nc_mL():
    ratios = []
    for v, m, L in [(8, 2, 3), (16, 2, 3), (8, 2, 4)]:
        est = correlation_sample_complexity(RHM(v, v, m, 2, L, seed=0), n_repeats=4, seed=0)
        assert est.bracketed and est.P[0] < est.P_star < est.P[-1]
        ratios.append(est.P_star / (v * m**L))
    assert all(0.4 < r < 4.0 for r in ratios), ratios
    # A grid entirely above P*: the first point already crosses, and the estimate says so.
    rhm = RHM(8, 8, 2, 2, 3, seed=0)
    high = correlation_sample_complexity(rhm, [4096, 8192], n_repeats=2)
    assert not high.bracketed and high.P_star == 4096.0
    low = correlation_sample_complexity(rhm, [2, 3], n_repeats=2)
    assert not low.bracketed and low.P_star == math.inf


def test_docstring_examples_run():
    import doctest

    import layerwise.hierarchy.learning as learning
    import layerwise.hierarchy.learning.models as models

    for module in (learning, models):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_progress_bar_option(capsys):
    _, x, y = _data(32)
    cfg = TrainConfig(epochs=2, loss_threshold=None)
    train(HierarchicalCNN(8, 8, 2, 2, 8, seed=0), x, y, cfg, progress=False)
    assert "train" not in capsys.readouterr().err
    train(HierarchicalCNN(8, 8, 2, 2, 8, seed=0), x, y, cfg, progress=True)
    assert "train" in capsys.readouterr().err


def test_remaining_model_and_measurement_options():
    rhm = RHM(8, 8, 2, 2, 2, seed=0)
    x = one_hot(rhm.sample(6, seed=0).tokens, 8)
    with_bias = HierarchicalCNN(8, 8, 2, 2, 8, bias=True, seed=0)
    plain = HierarchicalCNN(8, 8, 2, 2, 8, seed=0)
    assert sum(p.numel() for p in with_bias.parameters()) == sum(p.numel() for p in plain.parameters()) + 16
    with torch.no_grad():
        with_bias.layers[0].bias.fill_(0.5)
    assert not torch.allclose(with_bias(x), plain(x))
    deep_fc = FullyConnected(8, 4, 8, width=10, depth=3, seed=0)
    assert default_layers(deep_fc) == ["input", "layers.0", "layers.1", "layers.2", "output"]
    assert len(TransformerClassifier(8, 4, 8, dim=16, heads=4, depth=3).blocks) == 3
    assert TransformerClassifier(8, 4, 8, dim=16, heads=4).blocks[0].self_attn.num_heads == 4
    # Sensitivity: the seed and n change the estimate.
    a = synonymic_sensitivity(plain, rhm, 1, layers=["output"], n=64, seed=0)["output"]
    b = synonymic_sensitivity(plain, rhm, 1, layers=["output"], n=64, seed=1)["output"]
    c = synonymic_sensitivity(plain, rhm, 1, layers=["output"], n=65, seed=0)["output"]
    assert a != b and a != c
    # Correlations: the patch, the repeats and the threshold are used.
    rhm3 = RHM(8, 8, 2, 2, 3, seed=0)
    m0, _ = correlation_curve(rhm3, [200], patch=0, n_repeats=2, seed=0)
    m1, _ = correlation_curve(rhm3, [200], patch=3, n_repeats=2, seed=0)
    m2, _ = correlation_curve(rhm3, [200], patch=0, n_repeats=3, seed=0)
    assert m0 != m1 and m0 != m2
    grid = [32, 64, 128, 256, 512, 1024, 2048]
    low = correlation_sample_complexity(rhm3, grid, threshold=1.2, seed=0)
    high = correlation_sample_complexity(rhm3, grid, threshold=2.0, seed=0)
    assert low.P_star < high.P_star and low.threshold == 1.2
