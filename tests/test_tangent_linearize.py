"""LinearizedModel: f(x; theta0) + J (theta - theta0), checked against the model, finite differences, a
vector-Jacobian reference for its gradient, and tangent-space task arithmetic."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn
from torch.func import functional_call

from layerwise.editing import TaskVector, save_checkpoint
from layerwise.errors import CheckpointError, ParameterTypeError
from layerwise.tangent import linearize as linearize_module
from layerwise.tangent.linearize import LinearizedModel, check_task_vector

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Net(nn.Module):
    """Conv + LayerNorm + MLP: non-linear in its weights, no batch statistics."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.LayerNorm(3 * 4 * 4)
        self.blocks = nn.Sequential(nn.Linear(48, width), nn.GELU(), nn.Linear(width, 3))

    def forward(self, x):
        return self.blocks(self.norm(torch.tanh(self.conv(x)).flatten(1)))


def _net(seed=0, dtype=torch.float64, width=6):
    torch.manual_seed(seed)
    return Net(width).to(dtype)


def _x(n=5, seed=1, dtype=torch.float64):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _random_delta(model, seed=2, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


def _f(model, delta, x, eps):
    params = {n: p.detach() + eps * delta[n] for n, p in model.named_parameters()}
    return functional_call(model, params, (x,))


def test_docstring_examples():
    result = doctest.testmod(linearize_module)
    assert result.failed == 0 and result.attempted > 0


def test_equals_model_at_theta0_and_does_not_touch_the_callers_model():
    net = _net(dtype=torch.float32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lin = LinearizedModel(net)
    x = _x(dtype=torch.float32)
    torch.testing.assert_close(lin(x), net(x), rtol=0, atol=0)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_jvp_matches_central_finite_differences():
    net, x = _net(), _x()
    delta = _random_delta(net)
    h = 1e-5
    fd = (_f(net, delta, x, h) - _f(net, delta, x, -h)) / (2 * h)
    lin = LinearizedModel.posthoc(net, delta, scale=1.0)
    jd = lin(x) - net(x)  # f_lin(theta0 + delta) - f0 = J delta
    torch.testing.assert_close(jd, fd, rtol=1e-7, atol=1e-8)


def test_first_order_taylor_error_is_quadratic_in_the_step():
    """|f(theta0 + eps d) - f_lin(theta0 + eps d)| ~ C eps^2: halving eps divides it by ~4 (float64)."""
    net, x = _net(), _x()
    delta = _random_delta(net, scale=0.3)
    errors = []
    for eps in (1e-2, 5e-3, 2.5e-3):
        lin = LinearizedModel.posthoc(net, delta, scale=eps)
        errors.append(float((_f(net, delta, x, eps) - lin(x)).detach().abs().max()))
    assert errors[0] > 1e-9  # the model is genuinely non-linear
    for big, small in zip(errors, errors[1:], strict=False):
        assert 3.6 < big / small < 4.4


def test_float32_agreement_with_finite_differences():
    """The design note's ~1e-5: the float32 jvp against a float64 central difference of the same net."""
    net32 = _net(dtype=torch.float32)
    net64 = _net(dtype=torch.float64)
    x64 = _x()
    delta64 = _random_delta(net64, scale=0.1)
    h = 1e-6
    fd = (_f(net64, delta64, x64, h) - _f(net64, delta64, x64, -h)) / (2 * h)
    lin = LinearizedModel.posthoc(net32, {k: v.float() for k, v in delta64.items()})
    jd = (lin(x64.float()) - net32(x64.float())).detach().double()
    assert float((jd - fd).abs().max()) < 1e-5 * max(1.0, float(fd.abs().max()))


def test_gradient_is_the_vector_jacobian_product_at_theta0():
    """d/dtheta sum(g * f_lin(x; theta)) = J(theta0)^T g, whatever theta is (f_lin is linear in theta)."""
    net, x = _net(), _x()
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lin = LinearizedModel.posthoc(net, _random_delta(net, scale=0.5))
    (lin(x) * g).sum().backward()
    ref = torch.autograd.grad((net(x) * g).sum(), list(net.parameters()))
    for (name, p), r in zip(lin.model.named_parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12, msg=name)


def test_learned_task_vector_applied_in_tangent_space_reproduces_the_fine_tuned_linear_model():
    net, x = _net(dtype=torch.float32), _x(16, dtype=torch.float32)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(3))
    lin = LinearizedModel(net)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(lin(x), y).backward()
        opt.step()
    tau = lin.task_vector()
    assert tau.norm() > 1e-3
    assert set(tau.keys()) == {n for n, _ in net.named_parameters()}
    rebuilt = LinearizedModel.posthoc(net, tau)
    torch.testing.assert_close(rebuilt(x), lin(x), rtol=1e-5, atol=1e-6)
    # and it is not the non-linear model at theta0 + tau
    nonlin = dict(net.named_parameters())
    moved = functional_call(net, {k: v.detach() + tau[k] for k, v in nonlin.items()}, (x,))
    assert float((moved - lin(x)).detach().abs().max()) > 1e-4


def test_task_vectors_add_exactly_in_the_tangent_space_but_not_outside_it():
    net, x = _net(), _x()
    t1, t2 = _random_delta(net, 3, 0.5), _random_delta(net, 4, 0.5)
    tau1, tau2 = TaskVector.from_tensors(t1), TaskVector.from_tensors(t2)
    f0 = net(x)
    lin = lambda tv: LinearizedModel.posthoc(net, tv)(x)  # noqa: E731
    torch.testing.assert_close(lin(tau1 + tau2) - f0, (lin(tau1) - f0) + (lin(tau2) - f0))
    nl = lambda d: _f(net, d, x, 1.0)  # noqa: E731
    both = {k: t1[k] + t2[k] for k in t1}
    assert float(((nl(both) - f0) - (nl(t1) - f0) - (nl(t2) - f0)).detach().abs().max()) > 1e-3


def test_frozen_parameters_get_no_tangent_and_no_gradient():
    net = _net()
    net.conv.weight.requires_grad_(False)
    lin = LinearizedModel(net)
    (lin(_x()) ** 2).sum().backward()
    assert lin.model.conv.weight.grad is None
    assert lin.model.norm.weight.grad is not None
    delta = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    delta["conv.weight"] = torch.ones_like(net.conv.weight)
    with pytest.raises(CheckpointError, match="frozen parameter.*conv.weight"):
        lin.set_task_vector(delta)


def test_stays_in_eval_mode_when_trained():
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    lin = LinearizedModel(net).train()
    x = torch.randn(6, 4, dtype=torch.float64)
    out1, out2 = lin(x), lin(x)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    torch.testing.assert_close(out1, net.eval()(x))
    assert lin.training and not lin.base.training and not lin.model.training


def test_checkpoint_round_trip(tmp_path):
    net = _net(dtype=torch.float32)
    pre = {k: v.clone() for k, v in net.state_dict().items()}
    lin = LinearizedModel.posthoc(net, _random_delta(net, scale=0.1))
    save_checkpoint(pre, tmp_path / "pre")
    save_checkpoint(lin.theta(), tmp_path / "ft")
    other = _net(seed=9, dtype=torch.float32)  # weights replaced by the pretrained checkpoint
    back = LinearizedModel.from_checkpoints(other, tmp_path / "pre", tmp_path / "ft")
    x = _x(dtype=torch.float32)
    torch.testing.assert_close(back(x), lin(x))


def test_bad_inputs_name_the_parameter():
    net = _net()
    with pytest.raises(ParameterTypeError, match="model"):
        LinearizedModel(lambda x: x)
    other_arch = {n: torch.zeros_like(p) for n, p in _net(width=7).named_parameters()}
    with pytest.raises(CheckpointError, match=r"task_vector.*shape.*blocks\.0\.weight"):
        LinearizedModel(net).set_task_vector(other_arch)
    renamed = {"encoder." + n: torch.zeros_like(p) for n, p in net.named_parameters()}
    with pytest.raises(CheckpointError, match="task_vector.*not parameters.*encoder.conv.weight"):
        LinearizedModel(net).set_task_vector(renamed)
    partial = {"conv.weight": torch.zeros_like(net.conv.weight)}
    with pytest.raises(CheckpointError, match="task_vector lacks"):
        LinearizedModel(net).set_task_vector(partial)
    assert set(check_task_vector(partial, net, allow_missing=True)) == {"conv.weight"}
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    moved = {**{n: torch.zeros_like(p) for n, p in bn.named_parameters()}, "1.running_mean": torch.ones(3)}
    with pytest.raises(CheckpointError, match="buffer.*1.running_mean"):
        LinearizedModel(bn).set_task_vector(moved)
    with pytest.raises(CheckpointError, match="pretrained does not fit"):
        LinearizedModel.from_checkpoints(net, other_arch, other_arch)
