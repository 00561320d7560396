"""mergekit parity of the merge methods (issue 22): TIES' tie convention, ``lambda`` over the task-arithmetic
family, DELLA's density/epsilon refusal, and the methods of newer mergekit releases (``sce``,
``multislerp``, ``karcher``, ``nearswap``, ``passthrough``), each against a dense float64 reference written
here from the method's definition (the paper or mergekit's documentation), whole and in small chunks."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.editing.merge import merge_models
from layerwise.editing.merge.slerp import slerp_coefficients
from layerwise.errors import ParameterError


def _data(seed=0, t=3, shape=(37, 23)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    models = [base + 0.3 * torch.randn(*shape, generator=g) for _ in range(t)]
    return {"w": base}, [{"w": m} for m in models]


def _run(method, models, base, chunk=None, **kw):
    outs = [merge_models(method, models, base, **kw).tensors["w"]]
    if chunk:
        outs.append(merge_models(method, models, base, chunk_elements=chunk, **kw).tensors["w"])
    return outs


# -- TIES: a weighted sum of exactly 0 elects "+" ------------------------------------------------------
def test_ties_exact_zero_sum_elects_plus_and_keeps_the_positive_entries():
    base = {"w": torch.zeros(6)}
    a = {"w": torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0, 3.0])}
    b = {"w": torch.tensor([-1.0, 1.0, -1.0, -0.5, 0.0, -3.0])}
    out = merge_models("ties", [a, b], base, params={"density": 1.0}).tensors["w"]
    # entries 0, 1, 3, 5 sum to exactly 0: "+" wins, the mean of the positive contributions is kept
    # (mergekit 0.1.5 gives the same; sign(0) = 0 would give 0 there); entry 2 sums to +1 -> 2
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 2.0, 0.5, 0.0, 3.0]), atol=0, rtol=0)
    # with weights: 2 * 1 + 1 * (-2) = 0 -> "+": the weighted mean of the agreeing (positive) entry is 1
    w = merge_models(
        "ties",
        [{"w": torch.tensor([1.0])}, {"w": torch.tensor([-2.0])}],
        {"w": torch.zeros(1)},
        params={"density": 1.0},
        model_params=[{"weight": 2.0}, {"weight": 1.0}],
    ).tensors["w"]
    torch.testing.assert_close(w, torch.tensor([1.0]), atol=0, rtol=0)
    # the same convention in dare_ties / breadcrumbs_ties / della (one shared sign election)
    for method, params in [
        ("dare", {"drop_rate": 0.0, "combine": "ties", "normalize": True}),
        ("breadcrumbs", {"density": 1.0, "combine": "ties", "normalize": True}),
        ("della", {"density": 1.0, "combine": "ties"}),
    ]:
        got = merge_models(method, [a, b], base, params=params).tensors["w"]
        torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 2.0, 0.5, 0.0, 3.0]), atol=0, rtol=0)


# -- lambda over the task-arithmetic family ------------------------------------------------------------
@pytest.mark.parametrize(
    "method, params",
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.4}),
        ("dare", {"drop_rate": 0.5, "combine": "ties"}),
        ("dare", {"drop_rate": 0.5}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "combine": "ties"}),
        ("della", {"density": 0.5, "epsilon": 0.1}),
        ("della", {"density": 0.5, "epsilon": 0.1, "combine": "sum"}),
    ],
)
def test_lambda_multiplies_the_merged_task_vector(method, params):
    base, models = _data(1)
    mp = [{"weight": w} for w in (1.0, 0.5, 0.7)]
    plain = merge_models(method, models, base, params=params, model_params=mp, seed=3).tensors["w"]
    scaled = merge_models(
        method, models, base, params={**params, "lambda": 0.6}, model_params=mp, seed=3
    ).tensors["w"]
    torch.testing.assert_close(scaled - base["w"], 0.6 * (plain - base["w"]), atol=2e-6, rtol=0)
    assert not torch.allclose(scaled, plain)


# -- DELLA: density +- epsilon must stay inside (0, 1) -------------------------------------------------
@pytest.mark.parametrize("density, epsilon", [(0.5, 0.5), (0.3, 0.3), (0.9, 0.1), (0.2, 0.25)])
def test_della_refuses_keep_probabilities_reaching_0_or_1(density, epsilon):
    base, models = _data(2, t=1)
    with pytest.raises(ParameterError, match="density - epsilon > 0 and density \\+ epsilon < 1") as err:
        merge_models("della", models, base, params={"density": density, "epsilon": epsilon})
    assert "\n" not in str(err.value)


def test_della_accepts_the_open_interval_and_the_ends_of_density():
    base, models = _data(2, t=1)
    merge_models("della", models, base, params={"density": 0.5, "epsilon": 0.49})
    full = merge_models("della", models, base, params={"density": 1.0, "epsilon": 0.5}).tensors["w"]
    torch.testing.assert_close(full, models[0]["w"], atol=1e-6, rtol=0)  # density 1 keeps everything
    none = merge_models("della", models, base, params={"density": 0.0, "epsilon": 0.3}).tensors["w"]
    torch.testing.assert_close(none, base["w"], atol=0, rtol=0)  # density 0 keeps nothing


# -- SLERP: exactly opposite tensors -------------------------------------------------------------------
def test_slerp_exactly_opposite_tensors_fall_back_to_lerp():
    v = torch.tensor([1.0, -2.0, 0.5, 3.0])
    base, other = {"w": v}, {"w": -v}
    # cos = -1: |cos| > dot_threshold -> lerp (1 - t) v0 + t v1 = (1 - 2t) v (mergekit's np.abs(dot) test);
    # the spherical formula would divide by sin(pi) ~ 1e-16
    for t in (0.25, 0.5, 0.9):
        out = merge_models("slerp", [other], base, params={"t": t}).tensors["w"]
        torch.testing.assert_close(out, (1 - 2 * t) * v, atol=1e-6, rtol=0)
    g = torch.tensor([[float(v @ v), float(v @ (-2 * v))], [float(v @ (-2 * v)), float(4 * v @ v)]])
    assert slerp_coefficients(g, 0.3) == pytest.approx((0.7, 0.3))


# -- SCE -----------------------------------------------------------------------------------------------
def _sce_reference(base, models, select_topk):
    """FuseChat's SCE as mergekit documents it, dense float64: select top-k variance, coefficients from
    the mean squares, erase minority signs."""
    tv = torch.stack([m.double() - base.double() for m in models]).reshape(len(models), -1)
    if select_topk < 1:
        var = tv.var(dim=0, unbiased=False)
        k = int(int((var != 0).sum()) * select_topk)
        mask = torch.zeros_like(var)
        if k > 0:
            mask[torch.topk(var, k).indices] = 1
        tv = tv * mask
    w = tv.square().mean(dim=1)
    w = torch.full_like(w, 1 / len(w)) if abs(float(w.sum())) < 1e-6 else w / w.sum()
    sign = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(tv) == sign
    ew = w[:, None] * agree
    merged = (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)
    return (base.double().reshape(-1) + merged).reshape(base.shape)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_reference_whole_and_chunked(select_topk):
    base, models = _data(3)
    ref = _sce_reference(base["w"], [m["w"] for m in models], select_topk)
    for out in _run("sce", models, base, chunk=50, params={"select_topk": select_topk}):
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    # the coefficients matter: a model scaled up gets more say (erased entries aside)
    if select_topk == 1.0:
        big = [models[0], models[1], {"w": base["w"] + 5 * (models[2]["w"] - base["w"])}]
        out = merge_models("sce", big, base).tensors["w"]
        torch.testing.assert_close(
            out.double(), _sce_reference(base["w"], [m["w"] for m in big], 1.0), atol=1e-5, rtol=0
        )


# -- Multi-SLERP ---------------------------------------------------------------------------------------
def _multislerp_reference(points, weights, eps=1e-8, normalize=True):
    """Barycentric interpolation on the hypersphere as mergekit's documentation describes it, float64."""
    x = torch.stack([p.double().reshape(-1) for p in points])
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = x.norm(dim=1, keepdim=True)
    u = x / (norms + eps)
    m = (w[:, None] * u).sum(0)
    m = m / m.norm()
    tangent = u - (u @ m)[:, None] * m
    v = (w[:, None] * tangent).sum(0)
    tau = v.norm() + eps
    r = m * torch.cos(tau) + v * torch.sin(tau) / tau
    return (r * (norms[:, 0] * w).sum()).reshape(points[0].shape)


def test_multislerp_with_and_without_base_matches_reference():
    base, models = _data(4)
    weights = (0.2, 0.5, 0.3)
    mp = [{"weight": w} for w in weights]
    taus = [m["w"] - base["w"] for m in models]
    ref = base["w"].double() + _multislerp_reference(taus, weights)
    for out in _run("multislerp", models, base, chunk=50, model_params=mp):
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    ref = _multislerp_reference([m["w"] for m in models], weights)  # no base: the models themselves
    for out in _run("multislerp", models, None, chunk=50, model_params=mp):
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    raw = (0.2, 0.5, 0.6)
    ref = _multislerp_reference([m["w"] for m in models], raw, normalize=False)
    out = merge_models(
        "multislerp",
        models,
        None,
        model_params=[{"weight": w} for w in raw],
        params={"normalize_weights": False},
    ).tensors["w"]
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)


def test_multislerp_two_orthogonal_points_is_slerp_and_antipodal_points():
    # two unit vectors at 90 degrees, equal weights: the midpoint of the arc, norm 1
    base = {"w": torch.zeros(2)}
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    out = merge_models("multislerp", [a, b], base).tensors["w"]
    s = math.sqrt(0.5)
    torch.testing.assert_close(out, torch.tensor([s, s]), atol=1e-6, rtol=0)
    # antipodal with equal weights: two models fall back to the weighted sum, three raise
    c = {"w": torch.tensor([-1.0, 0.0])}
    out = merge_models("multislerp", [a, c], base).tensors["w"]
    torch.testing.assert_close(out, torch.zeros(2), atol=1e-7, rtol=0)
    with pytest.raises(ParameterError, match="weighted mean of the unit tensors is zero"):
        merge_models("multislerp", [a, c, a, c], base)


def test_multislerp_eps_zero_takes_the_limit_or_refuses_a_zero_tensor():
    # equal directions and eps 0: tau = 0, the result is the sinc limit (the common direction), not a crash
    a = {"w": torch.tensor([3.0, 4.0])}
    b = {"w": torch.tensor([6.0, 8.0])}
    out = merge_models("multislerp", [a, b], None, params={"eps": 0.0}).tensors["w"]
    torch.testing.assert_close(out, torch.tensor([4.5, 6.0]), atol=1e-6, rtol=0)
    # a zero tensor has no direction: eps 0 would write NaN, so it is refused, naming eps
    z = {"w": torch.zeros(2)}
    with pytest.raises(ParameterError, match="eps"):
        merge_models("multislerp", [a, z], None, params={"eps": 0.0})


# -- Karcher mean --------------------------------------------------------------------------------------
def _karcher_reference(points, max_iter=10, tol=1e-5):
    """The Karcher mean on the sphere by Riemannian gradient descent, dense float64 (equal weights)."""
    x = [p.double().reshape(-1) for p in points]
    alphas = [1 / len(x)] * len(x)
    norms = [float(v.norm()) for v in x]
    units = [v / n if n > 0 else torch.zeros_like(v) for v, n in zip(x, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = {i: alphas[i] / sum(alphas[j] for j in valid) for i in valid}
    mu = sum(a[i] * units[i] for i in valid)
    mu = units[valid[0]] if float(mu.norm()) < tol else mu / mu.norm()
    for _ in range(max_iter):
        grad = torch.zeros_like(mu)
        for i in valid:
            dot = float(torch.clamp(mu @ units[i], -1, 1))
            th = math.acos(dot)
            if th >= tol:
                grad = grad + a[i] * th / math.sin(th) * (units[i] - dot * mu)
        gn = float(grad.norm())
        if gn < tol:
            break
        mu = math.cos(gn) * mu + math.sin(gn) * grad / gn
        mu = mu / mu.norm()
    return (sum(al * n for al, n in zip(alphas, norms, strict=True)) * mu).reshape(points[0].shape)


def test_karcher_matches_reference_and_is_the_fixed_point():
    base, models = _data(5)
    ref = _karcher_reference([m["w"] for m in models])
    for out in _run("karcher", models, None, chunk=50):
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    # with a base model, mergekit averages the base too
    ref = _karcher_reference([base["w"]] + [m["w"] for m in models])
    for out in _run("karcher", models, base, chunk=50):
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    # the converged mean is a critical point: the weighted log maps of the units sum to ~0
    out = merge_models("karcher", models, None, params={"max_iter": 200, "tol": 1e-12}).tensors["w"]
    mu = out.double().reshape(-1) / out.double().norm()
    grad = torch.zeros_like(mu)
    for m in models:
        u = m["w"].double().reshape(-1) / m["w"].double().norm()
        th = math.acos(float(torch.clamp(mu @ u, -1, 1)))
        grad += th / math.sin(th) * (u - float(mu @ u) * mu)
    assert float(grad.norm()) < 1e-5
    # two unit vectors at 90 degrees: the midpoint of the arc
    two = merge_models("karcher", [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]).tensors
    s = math.sqrt(0.5)
    torch.testing.assert_close(two["w"], torch.tensor([s, s]), atol=1e-6, rtol=0)
    with pytest.raises(ParameterError, match="max_iter must be an integer"):
        merge_models("karcher", models, None, params={"max_iter": 2.5})


# -- NearSwap ------------------------------------------------------------------------------------------
def test_nearswap_by_hand_and_reference():
    base = {"w": torch.tensor([0.0, 0.0, 0.0, 1.0])}
    other = {"w": torch.tensor([0.05, -0.1, 0.4, 1.0])}
    out = merge_models("nearswap", [other], base, params={"t": 0.1}).tensors["w"]
    # |diff| <= t: the other's value; 0.4 away: moved by t / 0.4 = 1/4 of the way; equal: unchanged
    torch.testing.assert_close(out, torch.tensor([0.05, -0.1, 0.1, 1.0]), atol=1e-7, rtol=0)
    base, models = _data(6, t=1)
    v0, v1 = base["w"].double(), models[0]["w"].double()
    w = (0.2 / (v1 - v0).abs().clamp(min=1e-6)).clamp(0, 1)
    for got in _run("nearswap", models, base, chunk=50, params={"t": 0.2}):
        torch.testing.assert_close(got.double(), w * v1 + (1 - w) * v0, atol=1e-6, rtol=0)
    with pytest.raises(ParameterError, match="t must be > 0"):
        merge_models("nearswap", models, base, params={"t": 0.0})
    with pytest.raises(ParameterError, match="exactly one other model"):
        merge_models("nearswap", models + models, base, params={"t": 0.1})


# -- passthrough ---------------------------------------------------------------------------------------
def test_passthrough_copies_one_model_scaled():
    base, models = _data(7, t=1)
    out = merge_models("passthrough", models).tensors["w"]
    assert torch.equal(out, models[0]["w"])
    out = merge_models("passthrough", models, model_params=[{"scale": 0.5}]).tensors["w"]
    torch.testing.assert_close(out, 0.5 * models[0]["w"], atol=1e-7, rtol=0)
    with pytest.raises(ParameterError, match="exactly one model"):
        merge_models("passthrough", models + models)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_disjoint_mean_is_bit_identical_to_the_masked_sum(normalize):
    """The disjoint mean computed without torch.where equals the masked-sum form entry for entry, bit for
    bit (signed zeros too), with negative weights, all-zero columns and weighted sums of about 0."""
    from layerwise.editing.merge._common import disjoint_mean

    g = torch.Generator().manual_seed(5)
    d = torch.randn(4, 5000, generator=g)
    d[:, :100] = 0.0  # nothing to merge
    d[0, 100:200] = 1.0
    d[1, 100:200] = 0.7 / 1.3  # 0.7 * 1 - 1.3 * (0.7 / 1.3): a weighted sum of (about) 0, either sign
    d[2:, 100:200] = 0.0
    d[:, 200:300] *= 1e-30  # tiny magnitudes
    w = torch.tensor([0.7, 1.3, 1.0, 2.5]) * torch.tensor([1.0, -1.0, 1.0, -1.0])
    got = disjoint_mean(d, w, normalize)
    weighted = d * w[:, None]
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (weighted * elected) > 0
    want = torch.where(agree, weighted, 0.0).sum(dim=0)
    if normalize:
        divisor = w @ agree.float()
        want = want / torch.where(divisor == 0, 1.0, divisor)
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    assert bool((want[:100] == 0).all()) and bool((want[100:200] != 0).any())
