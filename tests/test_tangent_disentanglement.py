"""Weight disentanglement error: brute force against explicit weight copies, its zeros and symmetries, a
disentangled-by-construction pair, the linearized closed form, and bad input."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn

from layerwise.errors import CheckpointError, InputDataError, ParameterError
from layerwise.tangent import disentanglement as dis_module
from layerwise.tangent.disentanglement import check_grid, disentanglement_error
from layerwise.tangent.linearize import LinearizedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = [-2.0, -0.5, 0.0, 1.0, 2.5]


def _setup(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    g = torch.Generator().manual_seed(seed + 1)
    taus = [
        {n: 0.7 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in net.named_parameters()}
        for _ in range(2)
    ]
    data = [torch.randn(40, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    heads = [nn.Linear(5, 3).double() for _ in range(2)]
    return net, taus, data, heads


def _moved(net, taus, a1, a2):
    m = copy.deepcopy(net).eval()  # buffers (if any) stay those of net, as at theta0
    moved = {k: v + a1 * taus[0][k] + a2 * taus[1][k] for k, v in net.state_dict().items() if k in taus[0]}
    m.load_state_dict(moved, strict=False)
    return m


def _brute(net, taus, data, heads, grid, linearized, kind="classification"):
    def out(a1, a2, t):
        with torch.no_grad():
            if linearized:
                tv = {k: a1 * taus[0][k] + a2 * taus[1][k] for k in taus[0]}
                return heads[t](LinearizedModel.posthoc(net, tv)(data[t]))
            return heads[t](_moved(net, taus, a1, a2)(data[t]))

    def dist(a, b):
        if kind == "classification":
            return (a.argmax(1) != b.argmax(1)).double().mean()
        return (a - b).norm(dim=1).mean()

    xi = torch.zeros(len(grid), len(grid), dtype=torch.float64)
    for i, a1 in enumerate(grid):
        for j, a2 in enumerate(grid):
            xi[i, j] = dist(out(a1, 0, 0), out(a1, a2, 0)) + dist(out(0, a2, 1), out(a1, a2, 1))
    return xi


def test_docstring_examples():
    result = doctest.testmod(dis_module)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("linearized", [False, True])
@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_matches_brute_force(linearized, kind):
    net, taus, data, heads = _setup()
    r = disentanglement_error(
        net,
        None,
        taus[0],
        taus[1],
        data[0],
        data[1],
        GRID,
        linearized=linearized,
        heads=tuple(heads),
        kind=kind,
    )
    ref = _brute(net, taus, data, heads, GRID, linearized, kind)
    torch.testing.assert_close(r.xi, ref, rtol=1e-9, atol=1e-12)
    assert r.xi.shape == (5, 5) and r.linearized is linearized and r.kind == kind
    assert float(r.xi.max()) > 0.05  # a random pair of vectors is entangled somewhere on this grid


def test_zero_on_the_axes_for_each_task_term_and_at_the_origin():
    net, taus, data, heads = _setup(1)
    for linearized in (False, True):
        r = disentanglement_error(
            net, None, taus[0], taus[1], data[0], data[1], GRID, linearized=linearized, heads=tuple(heads)
        )
        j0 = GRID.index(0.0)
        assert torch.all(r.per_task[0, :, j0] == 0)  # task 1 at (a1, 0), any a1
        assert torch.all(r.per_task[1, j0, :] == 0)  # task 2 at (0, a2), any a2
        assert r.xi[j0, j0] == 0


def test_identical_tasks_are_symmetric_about_the_diagonal():
    net, taus, data, heads = _setup(2)
    r = disentanglement_error(net, None, taus[0], taus[0], data[0], data[0], GRID, heads=(heads[0],) * 2)
    torch.testing.assert_close(r.per_task[0], r.per_task[1].T, rtol=0, atol=0)
    torch.testing.assert_close(r.xi, r.xi.T, rtol=0, atol=0)


def test_disentangled_by_construction_gives_zero_and_entangled_does_not():
    """Linear model, task t's inputs live on coordinates S_t, tau_t only changes the columns S_t."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(3)
    s1 = torch.tensor([1.0, 1, 0, 0], dtype=torch.float64)
    s2 = 1 - s1
    x1 = torch.randn(50, 4, generator=g, dtype=torch.float64) * s1
    x2 = torch.randn(50, 4, generator=g, dtype=torch.float64) * s2
    w1 = torch.randn(3, 4, generator=g, dtype=torch.float64) * s1
    w2 = torch.randn(3, 4, generator=g, dtype=torch.float64) * s2
    zero_b = torch.zeros(3, dtype=torch.float64)
    tau1, tau2 = {"weight": w1, "bias": zero_b}, {"weight": w2, "bias": zero_b}
    for linearized in (False, True):
        r = disentanglement_error(net, None, tau1, tau2, x1, x2, GRID, linearized=linearized)
        assert torch.all(r.xi == 0)
    entangled = {"weight": w1 + w2.roll(2, dims=1), "bias": zero_b}
    r = disentanglement_error(net, None, tau1, entangled, x1, x2, GRID)
    assert float(r.xi.max()) > 0.1
    # a model linear in its weights: the linearized error is the error
    r_lin = disentanglement_error(net, None, tau1, entangled, x1, x2, GRID, linearized=True)
    torch.testing.assert_close(r_lin.xi, r.xi)


def test_theta0_and_grid_pair_and_batch_size_options():
    net, taus, data, heads = _setup(3)
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    r_other = disentanglement_error(other, net.state_dict(), taus[0], taus[1], data[0], data[1], GRID)
    r_self = disentanglement_error(net, None, taus[0], taus[1], data[0], data[1], GRID)
    torch.testing.assert_close(r_other.xi, r_self.xi)
    r_own = disentanglement_error(other, None, taus[0], taus[1], data[0], data[1], GRID)
    assert not torch.equal(r_own.xi, r_self.xi)
    r2 = disentanglement_error(net, None, taus[0], taus[1], data[0], data[1], ([-0.5, 1.0], [0.0, 1.0, 2.5]))
    assert r2.xi.shape == (2, 3)
    torch.testing.assert_close(r2.xi, r_self.xi[[1, 3]][:, [2, 3, 4]])
    calls = []
    hook = net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    disentanglement_error(net, None, taus[0], taus[1], data[0], data[1], [0.0], batch_size=16)
    hook.remove()
    assert max(calls) == 16 and len(calls) == 4 * 3  # 40 = 16 + 16 + 8; 2 references + 2 joint evaluations


def test_bad_input_names_the_parameter():
    net, taus, data, _ = _setup()
    run = lambda **kw: disentanglement_error(  # noqa: E731
        **{
            "model": net,
            "theta0": None,
            "tau1": taus[0],
            "tau2": taus[1],
            "data1": data[0],
            "data2": data[1],
            "grid": GRID,
            **kw,
        }
    )
    for bad in ([], [0.0, float("nan")], [1.0, 0.0], [[0.0, 1.0]], "abc"):
        with pytest.raises((ParameterError, TypeError), match="grid"):
            run(grid=bad)
    with pytest.raises(ParameterError, match=r"grid\[1\]"):
        run(grid=([0.0, 1.0], [2.0, 1.0]))
    with pytest.raises(InputDataError, match="data1"):
        run(data1=torch.randn(5, 7, dtype=torch.float64))
    with pytest.raises(InputDataError, match="data2"):
        run(data2=torch.randn(5, 7, dtype=torch.float64), linearized=True)
    with pytest.raises(InputDataError, match="data1"):
        run(data1=torch.zeros(0, 4, dtype=torch.float64))
    wide = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 5)).double()
    with pytest.raises(CheckpointError, match="tau2"):
        run(tau2={n: torch.zeros_like(p) for n, p in wide.named_parameters()})
    with pytest.raises(ParameterError, match="kind"):
        run(kind="ranking")
    with pytest.raises(ParameterError, match="batch_size"):
        run(batch_size=0)
    assert check_grid([-3, 0, 3]).dtype == torch.float64


def test_heat_map_helper(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerwise.tangent.plotting import plot_disentanglement

    net, taus, data, heads = _setup()
    r = disentanglement_error(net, None, taus[0], taus[1], data[0], data[1], GRID, heads=tuple(heads))
    ax = plot_disentanglement(r, title="xi")
    mesh = ax.collections[0]
    assert mesh.get_array().reshape(5, 5).tolist() == r.xi.T.tolist()  # a1 horizontal, a2 vertical
    assert ax.get_title() == "xi" and ax.get_xlim() == (-2.75, 3.25)
    plt.close(ax.figure)
    with pytest.raises(ParameterError, match="a1 and a2"):
        plot_disentanglement(r.xi)
    with pytest.raises(ParameterError, match="shape"):
        plot_disentanglement(r.xi, r.a1[:3], r.a2)


def _bn_net():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5)).double()


@pytest.mark.parametrize("linearized", [False, True])
def test_uses_theta0_buffers_in_eval_mode(linearized):
    """BatchNorm: xi must use theta0's running statistics (not the model's own) and eval-mode normalisation
    (not the batch's statistics), whatever mode the model is in; brute force on a model loaded with theta0."""
    torch.manual_seed(4)
    ref_net = _bn_net()
    g = torch.Generator().manual_seed(5)
    bn = ref_net[1]
    with torch.no_grad():
        bn.running_mean.copy_(2.0 * torch.randn(6, generator=g, dtype=torch.float64))
        bn.running_var.copy_(0.2 + 3.0 * torch.rand(6, generator=g, dtype=torch.float64))
    theta0 = {k: v.clone() for k, v in ref_net.state_dict().items()}
    taus = [
        {n: 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in ref_net.named_parameters()}
        for _ in range(2)
    ]
    data = [torch.randn(30, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    heads = [nn.Linear(5, 3).double() for _ in range(2)]
    grid = [-1.0, 0.0, 1.5]
    ref_net.eval()
    ref = _brute(ref_net, taus, data, heads, grid, linearized, kind="regression")
    # the model given has the same parameters but other running statistics, and is in train mode
    model = _bn_net()
    model.load_state_dict({k: v for k, v in theta0.items() if "running" not in k}, strict=False)
    model.train()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    r = disentanglement_error(
        model, theta0, taus[0], taus[1], data[0], data[1], grid, linearized=linearized,
        heads=tuple(heads), kind="regression",
    )
    torch.testing.assert_close(r.xi, ref, rtol=1e-9, atol=1e-12)
    assert float(ref.max()) > 0.1
    assert model.training  # the caller's mode comes back
    for k, v in model.state_dict().items():  # and neither the model's buffers nor theta0 moved
        assert torch.equal(v, own[k]), k
    for k, v in ref_net.state_dict().items():
        assert torch.equal(v, theta0[k]), k
