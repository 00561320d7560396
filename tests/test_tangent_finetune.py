"""Fine-tuning under a frozen head: schedule, determinism, every option, the linearized mode (exact for a
model linear in its weights), and bad input."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
from torch import nn

from layerwise.errors import InputDataError, ParameterError, ParameterTypeError
from layerwise.tangent.finetune import FinetuneConfig, finetune, predict, warmup_cosine
from layerwise.tangent.linearize import LinearizedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _enc(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def _head():
    torch.manual_seed(123)
    return nn.Linear(4, 3)


HEAD = _head()
CFG = FinetuneConfig(steps=30, batch_size=16, lr=2e-2, warmup_steps=3, weight_decay=0.0, seed=0)


def _run(cfg=CFG, enc=None, data=None, head=HEAD, **kw):
    return finetune(_enc() if enc is None else enc, head, _data() if data is None else data, cfg, **kw)


def _dist(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_docstring_examples():
    result = doctest.testmod(importlib.import_module("layerwise.tangent.finetune"))
    assert result.failed == 0 and result.attempted > 0


def test_warmup_cosine_schedule():
    assert [warmup_cosine(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 10, 4) == 1.0
    assert warmup_cosine(7, 10, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert warmup_cosine(10, 10, 4) == pytest.approx(0.0)
    assert warmup_cosine(0, 5, 0) == 1.0


def test_learns_deterministically_and_leaves_inputs_untouched():
    enc = _enc()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    head_before = {k: v.clone() for k, v in HEAD.state_dict().items()}
    r1 = _run(enc=enc)
    x, y = _data()
    tuned = _enc()
    tuned.load_state_dict(r1.state)
    with torch.no_grad():
        loss0 = float(nn.functional.cross_entropy(HEAD(enc(x)), y))
        loss1 = float(nn.functional.cross_entropy(HEAD(tuned(x)), y))
    assert loss1 < 0.8 * loss0
    r2 = _run()
    assert _dist(r1.state, r2.state) == 0
    assert _dist(enc.state_dict(), before) == 0 and _dist(HEAD.state_dict(), head_before) == 0
    assert set(r1.state) == set(before)
    tau = r1.task_vector()
    torch.testing.assert_close(tau["0.weight"], r1.state["0.weight"] - before["0.weight"])


def mean_of(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"lr": 1e-3},
        {"weight_decay": 0.5},
        {"warmup_steps": 20},
        {"grad_clip": 0.01},
        {"batch_size": 8},
        {"steps": 10},
    ],
)
def test_every_option_changes_the_result(change):
    base = _run(FinetuneConfig(**{**CFG.to_dict(), "grad_clip": None}))
    other = _run(FinetuneConfig(**{**CFG.to_dict(), "grad_clip": None, **change}))
    assert _dist(base.state, other.state) > 1e-6
    assert len(other.losses) == other_steps(change)


def other_steps(change):
    return change.get("steps", CFG.steps)


def test_batch_size_is_the_number_of_images_per_step_and_callback_sees_every_step():
    seen, steps = [], []
    enc = _enc()
    enc.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))  # deep copies keep hooks
    cfg = FinetuneConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=0)
    finetune(enc, HEAD, _data(), cfg, callback=lambda step, loss: steps.append(step))
    assert seen == [8, 8, 8] and steps == [0, 1, 2]


def test_linearized_equals_plain_for_a_model_linear_in_its_weights_and_differs_otherwise():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    lin_cfg = FinetuneConfig(**{**CFG.to_dict(), "linearized": True})
    a = _run(CFG, enc=linear)
    b = _run(lin_cfg, enc=linear)
    assert _dist(a.state, b.state) < 1e-5
    c, d = _run(CFG), _run(lin_cfg)
    assert _dist(c.state, d.state) > 1e-3
    # the linearized result is a tangent-space model: evaluate it with LinearizedModel
    x = _data()[0]
    lin = LinearizedModel.posthoc(_enc(), d.task_vector())
    out = predict(lin, HEAD, x)
    assert out.shape == (64, 3) and torch.isfinite(out).all()


def test_dataset_input_and_no_grad_context():
    x, y = _data()
    ds = torch.utils.data.TensorDataset(x, y)
    with torch.no_grad():
        r = _run(FinetuneConfig(steps=4, batch_size=16, lr=1e-2, warmup_steps=0), data=ds)
    assert len(r.losses) == 4 and _dist(r.state, _enc().state_dict()) > 0


def test_bad_input_names_the_parameter():
    with pytest.raises(ParameterError, match="steps"):
        FinetuneConfig(steps=0)
    with pytest.raises(ParameterError, match="lr"):
        FinetuneConfig(lr=0.0)
    with pytest.raises(ParameterTypeError, match="linearized"):
        FinetuneConfig(linearized="yes")
    x, y = _data()
    with pytest.raises(InputDataError, match="data"):
        _run(data=(x, y[:10]))
    with pytest.raises(InputDataError, match="data"):
        _run(data=(torch.randn(64, 5), y))
    with pytest.raises(ParameterTypeError, match="data"):
        _run(data=[1, 2, 3])
    with pytest.raises(ParameterTypeError, match="config"):
        finetune(_enc(), HEAD, _data(), {"steps": 3})
    frozen = _enc().requires_grad_(False)
    with pytest.raises(ParameterError, match="trainable"):
        _run(enc=frozen)
