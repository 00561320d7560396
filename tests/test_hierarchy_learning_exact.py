"""Exact checks of `layerwise.hierarchy.learning` that planted bugs must not survive (issue 20, item 5): the
shallow network against an explicit computation, the cosine schedule against its closed form over every
optimizer step, the log-log interpolation of the correlation estimate against a hand computation, the
readout normalisations, the per-epoch reshuffling and the sample-weighted epoch loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import layerwise.hierarchy.learning.sensitivity as sensitivity
from layerwise.hierarchy import RHM
from layerwise.hierarchy.learning import (
    SCALINGS,
    FullyConnected,
    HierarchicalCNN,
    TrainConfig,
    correlation_sample_complexity,
    train,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------- models
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_fully_connected_matches_explicit_formula(depth, scaling):
    """relu(x W_1 / sqrt(v d)) -> relu(. W_2 / sqrt(h)) ... -> . W_out / norm, with norm = sqrt(h) or h."""
    v, d, n_c, h = 5, 6, 3, 7
    net = FullyConnected(v, d, n_c, width=h, depth=depth, scaling=scaling, seed=2)
    x = torch.rand(4, v, d, dtype=torch.float64)
    a = x.flatten(1)
    fan_in = v * d
    for layer in net.layers:
        a = torch.relu(a @ layer.weight.double() / math.sqrt(fan_in))
        fan_in = h
    norm = math.sqrt(h) if scaling == "standard" else float(h)
    expected = a @ net.readout.weight.double() / norm
    torch.testing.assert_close(net.double()(x), expected, rtol=1e-12, atol=1e-12)


def test_readout_normalisations_are_sqrt_h_and_h():
    """The option is used: standard = x W / sqrt(h), meanfield (the authors' code) = x W / h, exactly."""
    h = 9
    x = torch.rand(3, 4, 4, dtype=torch.float64)
    out = {}
    for scaling in SCALINGS:
        net = HierarchicalCNN(4, 2, 2, 2, width=h, scaling=scaling, seed=0).double()
        feats = net.layers[1](net.layers[0](x)).flatten(1)
        out[scaling] = (net(x), feats @ net.readout.weight)
    torch.testing.assert_close(out["standard"][0], out["standard"][1] / 3.0, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["meanfield"][0], out["meanfield"][1] / 9.0, rtol=1e-12, atol=0)
    assert SCALINGS == ("standard", "meanfield")


# ----------------------------------------------------------------------------------- trainer
def _toy(n=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, 4, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    return x, y


def test_cosine_schedule_decays_over_every_optimizer_step():
    """The learning rate used at step k (k = 0 .. T-1, T = epochs * batches per epoch) is the closed form
    lr (1 + cos(pi k / T)) / 2: it decreases monotonically to ~0 at the last step instead of restarting
    (which it would if T_max were counted in epochs while the scheduler steps per batch)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    x, y = _toy(10)
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    try:
        res = train(HierarchicalCNN(4, 2, 2, 2, 4, seed=0), x, y,
                    TrainConfig(optimizer="sgd", lr=0.3, momentum=0.0, schedule="cosine", epochs=4,
                                batch_size=4, loss_threshold=None), seed=0)
    finally:
        handle.remove()
    T = 4 * 3  # ceil(10 / 4) = 3 batches per epoch
    assert res.steps == T and len(seen) == T
    expected = [0.3 * (1 + math.cos(math.pi * k / T)) / 2 for k in range(T)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_constant_schedule_keeps_the_learning_rate():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    x, y = _toy(10)
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    try:
        train(HierarchicalCNN(4, 2, 2, 2, 4, seed=0), x, y,
              TrainConfig(lr=0.3, schedule="constant", epochs=2, batch_size=4, loss_threshold=None), seed=0)
    finally:
        handle.remove()
    assert seen == [0.3] * 6


class _Recorder(nn.Module):
    """A linear model that records the row ids (stored in input channel 0) of every batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.batches: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append([int(i) for i in x[:, 0]])
        return self.lin(x)


def test_batches_are_reshuffled_every_epoch_and_cover_the_data():
    n, batch = 12, 4
    x = torch.stack([torch.arange(n, dtype=torch.float32), torch.zeros(n)], 1)  # (n, 2): row id, 0
    y = torch.zeros(n, dtype=torch.long)
    model = _Recorder()
    train(model, x, y, TrainConfig(lr=1e-3, epochs=3, batch_size=batch, loss_threshold=None), seed=5)
    epochs = [sum(model.batches[k * 3:(k + 1) * 3], []) for k in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch visits every datum once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # a new order every epoch


def test_epoch_loss_is_the_sample_weighted_mean():
    """With a vanishing learning rate the weights do not move, so the first epoch's mean loss must equal the
    cross-entropy of the initial model over all data, also when the last batch is smaller (10 = 4+4+2)."""
    x, y = _toy(10, seed=3)
    net = HierarchicalCNN(4, 2, 2, 2, 4, seed=1)
    with torch.no_grad():
        exact = float(nn.functional.cross_entropy(net(x).double(), y))
    res = train(net, x, y, TrainConfig(optimizer="sgd", lr=1e-30, momentum=0.0, schedule="constant",
                                       epochs=1, batch_size=4, loss_threshold=None), seed=0)
    assert res.history[0] == pytest.approx(exact, rel=1e-6)


# ----------------------------------------------------------------------------------- correlations
def test_correlation_p_star_is_log_log_interpolated(monkeypatch):
    """Measured / noise = 1, 1.5, 8 at P = 50, 100, 400 and threshold 2: the crossing lies between 100 and
    400 at log P = log 100 + t log 4 with t = (log 2 - log 1.5) / (log 8 - log 1.5). Interpolating linearly
    in P or in the ratio gives other values (151.6, 111.3 or 123.1 instead of 126.9)."""
    P = [50, 100, 400]

    def fake_curve(rhm, P_values, *, patch=0, n_repeats=4, seed=0):
        assert list(P_values) == P
        return [1.0, 1.5, 8.0], [1.0, 1.0, 1.0]

    monkeypatch.setattr(sensitivity, "correlation_curve", fake_curve)
    est = correlation_sample_complexity(RHM(4, 4, 2, 2, 2, seed=0), P, threshold=2.0)
    t = (math.log(2.0) - math.log(1.5)) / (math.log(8.0) - math.log(1.5))
    expected = math.exp(math.log(100) + t * math.log(4.0))
    assert est.bracketed and est.P_star == pytest.approx(expected, rel=1e-12)
    assert est.ratio == (1.0, 1.5, 8.0)
    # The alternatives differ by more than the tolerance (so a linear interpolation is caught).
    for other in (100 + t * 300, 100 * 4 ** ((2 - 1.5) / 6.5), 100 + 300 * (2 - 1.5) / 6.5):
        assert abs(other - expected) > 1.0
