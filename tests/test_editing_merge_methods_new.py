"""SLERP, Model Stock, Breadcrumbs, DELLA, DARE's normalize/rescale and per-layer parameter gradients:
hand computations, independent reference implementations, and chunking independence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerwise.editing.merge import merge_models
from layerwise.editing.merge.della import magprune_probabilities
from layerwise.editing.merge.gradients import interpolate, parse_schedule
from layerwise.errors import CheckpointError, ParameterError


def _slerp_reference(t, v0, v1, thr=0.9995, eps=1e-8):
    """The textbook / mergekit formula on whole tensors, in float64 numpy (independent of the driver)."""
    a, b = v0.double().numpy().ravel(), v1.double().numpy().ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float(np.sum(ua * ub))
    if abs(dot) > thr:
        res = (1 - t) * a + t * b
    else:
        th = np.arccos(dot)
        res = np.sin((1 - t) * th) / np.sin(th) * a + np.sin(t * th) / np.sin(th) * b
    return torch.from_numpy(res.reshape(v0.shape))


# -- SLERP -------------------------------------------------------------------------------------------------
def test_slerp_hand_computed_quarter_turn():
    base = {"w": torch.tensor([1.0, 0.0])}
    other = {"w": torch.tensor([0.0, 1.0])}
    out = merge_models("slerp", [other], base, params={"t": 0.5}).tensors["w"]
    # theta = pi/2: s0 = s1 = sin(pi/4) / 1
    s = math.sin(math.pi / 4)
    torch.testing.assert_close(out, torch.tensor([s, s]), atol=1e-7, rtol=0)
    out = merge_models("slerp", [other], base, params={"t": 1 / 3}).tensors["w"]
    torch.testing.assert_close(
        out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-7, rtol=0
    )


def test_slerp_colinear_falls_back_to_lerp():
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    other = {"w": torch.tensor([2.0, 4.0, 6.0])}  # cos = 1: lerp
    out = merge_models("slerp", [other], base, params={"t": 0.25}).tensors["w"]
    torch.testing.assert_close(out, torch.tensor([1.25, 2.5, 3.75]), atol=1e-6, rtol=0)
    # a threshold above the cosine switches the fallback off: sin(theta) ~ 0 would then be used,
    # so check with nearly colinear vectors that the two branches differ as the formulas say
    other = {"w": torch.tensor([1.0, 2.0, 3.1])}
    lerp = merge_models("slerp", [other], base, params={"t": 0.5}).tensors["w"]
    sl = merge_models("slerp", [other], base, params={"t": 0.5, "dot_threshold": 1.0}).tensors["w"]
    torch.testing.assert_close(lerp, torch.tensor([1.0, 2.0, 3.05]), atol=1e-6, rtol=0)
    ref = _slerp_reference(0.5, base["w"], other["w"], thr=1.0).float()
    torch.testing.assert_close(sl, ref, atol=1e-6, rtol=0)
    assert not torch.equal(sl, lerp)


def test_slerp_random_tensors_match_reference_and_chunking():
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(40, 30, generator=g) for i in range(3)}
    other = {k: 0.5 * v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    whole = merge_models("slerp", [other], base, params={"t": 0.3}).tensors
    chunked = merge_models("slerp", [other], base, params={"t": 0.3}, chunk_elements=97).tensors
    for k in base:
        ref = _slerp_reference(0.3, base[k], other[k]).float()
        torch.testing.assert_close(whole[k], ref, atol=2e-6, rtol=0)
        torch.testing.assert_close(chunked[k], whole[k], atol=2e-6, rtol=0)


def test_slerp_needs_exactly_one_model():
    base = {"w": torch.ones(3)}
    with pytest.raises(ParameterError, match="exactly one other model"):
        merge_models("slerp", [base, base], base, params={"t": 0.5})
    with pytest.raises(ParameterError, match="needs parameter 't'"):
        merge_models("slerp", [base], base)


# -- Model Stock -------------------------------------------------------------------------------------------
def test_model_stock_hand_computed_ratio():
    base = {"w": torch.tensor([1.0, 1.0, 0.0])}
    # task vectors [1, 0, 0] and [cos 60°, sin 60°, 0]: cos = 0.5, N = 2 -> t = 2 * 0.5 / 1.5 = 2/3
    d1, d2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    fts = [{"w": base["w"] + d1}, {"w": base["w"] + d2}]
    out = merge_models("model_stock", fts, base).tensors["w"]
    torch.testing.assert_close(out, base["w"] + (2 / 3) * (d1 + d2) / 2, atol=1e-6, rtol=0)


def test_model_stock_three_models_mean_pairwise_cosine_and_chunking():
    g = torch.Generator().manual_seed(1)
    base = {"a.w": torch.randn(50, generator=g), "b.w": torch.randn(7, 9, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    whole = merge_models("model_stock", fts, base).tensors
    chunked = merge_models("model_stock", fts, base, chunk_elements=8).tensors
    for k in base:
        ds = [(ft[k] - base[k]).double().ravel() for ft in fts]
        cos = [
            float(ds[i] @ ds[j] / (ds[i].norm() * ds[j].norm())) for i in range(3) for j in range(i + 1, 3)
        ]
        c = sum(cos) / 3
        t = 3 * c / (1 + 2 * c)
        ref = base[k].double() + t * sum(ds).reshape(base[k].shape) / 3
        torch.testing.assert_close(whole[k].double(), ref, atol=2e-6, rtol=0)
        torch.testing.assert_close(chunked[k], whole[k], atol=2e-6, rtol=0)
    with pytest.raises(ParameterError, match="at least two"):
        merge_models("model_stock", fts[:1], base)


# -- Breadcrumbs -------------------------------------------------------------------------------------------
def test_breadcrumbs_hand_computed_mask():
    delta = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, 5.0, -4.0, 3.0, 2.0, 1.0])
    base = {"w": torch.zeros(10)}
    # n = 10, gamma 0.1 -> n_top = 1 (drop 10), density 0.4 -> keep the next 4: -9, 8, -7, 6
    out = merge_models("breadcrumbs", [{"w": delta}], base, params={"density": 0.4, "gamma": 0.1}).tensors[
        "w"
    ]
    torch.testing.assert_close(out, torch.tensor([0, -9.0, 8, -7, 6, 0, 0, 0, 0, 0]))
    # gamma 0.25 -> n_top = 2; density 0.5 -> 5 kept: 8, -7, 6, 5, -4
    out = merge_models("breadcrumbs", [{"w": delta}], base, params={"density": 0.5, "gamma": 0.25}).tensors[
        "w"
    ]
    torch.testing.assert_close(out, torch.tensor([0, 0, 8.0, -7, 6, 5, -4, 0, 0, 0]))
    # density >= 1 keeps the task vector whole; n_top shrinks when n_top + n_keep > n
    out = merge_models("breadcrumbs", [{"w": delta}], base, params={"density": 1.0}).tensors["w"]
    torch.testing.assert_close(out, delta)
    out = merge_models("breadcrumbs", [{"w": delta}], base, params={"density": 0.9, "gamma": 0.3}).tensors[
        "w"
    ]
    torch.testing.assert_close(out, torch.where(delta.abs() < 10, delta, 0))


def _breadcrumbs_reference(delta, density, gamma):
    n = delta.numel()
    n_keep, n_top = int(density * n), int(gamma * n)
    n_top = min(n_top, n - n_keep)
    order = torch.argsort(delta.abs().ravel(), descending=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_top : n_top + n_keep]] = True
    return torch.where(mask.reshape(delta.shape), delta, 0)


@pytest.mark.parametrize("chunk", [1 << 20, 64])  # one chunk / the two-pass streaming thresholds
def test_breadcrumbs_sum_and_ties_match_reference(chunk):
    g = torch.Generator().manual_seed(2)
    base = {"layers.0.w": torch.randn(30, 20, generator=g), "layers.1.b": torch.randn(300, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    mp = [{"weight": w[i], "density": 0.3 + 0.1 * i, "gamma": 0.05} for i in range(3)]
    s = merge_models("breadcrumbs", fts, base, model_params=mp, chunk_elements=chunk).tensors
    t = merge_models(
        "breadcrumbs", fts, base, model_params=mp, params={"combine": "ties"}, chunk_elements=chunk
    ).tensors
    for k in base:
        kept = torch.stack(
            [
                _breadcrumbs_reference(ft[k] - base[k], m["density"], 0.05)
                for ft, m in zip(fts, mp, strict=True)
            ]
        )
        wt = torch.tensor(w)[:, None, None] if kept.ndim == 3 else torch.tensor(w)[:, None]
        ref_sum = (wt * kept).sum(0)
        torch.testing.assert_close(s[k], base[k] + ref_sum, atol=1e-5, rtol=0)
        weighted = wt * kept
        elected = torch.sign(weighted.sum(0))
        agree = (weighted * elected) > 0
        ref_ties = torch.where(agree, weighted, 0).sum(0)  # normalize: false (mergekit's default)
        torch.testing.assert_close(t[k], base[k] + ref_ties, atol=1e-5, rtol=0)


# -- DELLA -------------------------------------------------------------------------------------------------
def test_della_probabilities_by_hand():
    deltas = torch.tensor([[3.0, -1.0, 2.0, 0.5, -4.0, 1.5]])  # two rows of 3
    p = magprune_probabilities(
        deltas, torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64), 3
    )
    # row 1 ranks (ascending |x|): -1 -> 0, 2 -> 1, 3 -> 2: p = 0.3 + 0.4 * r / 2
    # row 2: 0.5 -> 0, 1.5 -> 1, -4 -> 2
    torch.testing.assert_close(
        p, torch.tensor([[0.7, 0.3, 0.5, 0.3, 0.7, 0.5]], dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_della_unbiased_rescaling_and_keep_rates():
    g = torch.Generator().manual_seed(3)
    n_rows, row = 400, 50
    base = {"layers.0.w": torch.zeros(n_rows, row)}
    delta = torch.randn(n_rows, row, generator=g)
    ft = {"layers.0.w": delta}
    params = {"density": 0.5, "epsilon": 0.3, "combine": "sum", "rescale_mode": "probability"}
    out = merge_models("della", [ft], base, params=params, seed=7).tensors["layers.0.w"]
    kept = out != 0
    # a kept entry is delta / p with p = 0.2 + 0.6 r / 49; the smallest-magnitude entry of each row has p 0.2
    ranks = delta.abs().argsort(-1).argsort(-1).double()
    p = 0.2 + 0.6 * ranks / (row - 1)
    torch.testing.assert_close(out[kept].double(), (delta.double() / p)[kept], atol=1e-5, rtol=1e-5)
    # keep rate per rank: lowest fifth of ranks ~0.26, top fifth ~0.74 (20000 draws: sd ~ 0.007)
    low, high = ranks < 10, ranks >= 40
    assert abs(kept[low].float().mean() - p[low].mean()) < 0.03
    assert abs(kept[high].float().mean() - p[high].mean()) < 0.03
    # unbiased: the mean over many entries of out - delta is ~0 relative to the spread
    assert abs(float((out - delta).mean())) < 4 * float((out - delta).std()) / math.sqrt(out.numel())
    # independent of chunking (chunks hold whole rows), and of the seed only through the draws
    again = merge_models("della", [ft], base, params=params, seed=7, chunk_elements=333).tensors
    torch.testing.assert_close(again["layers.0.w"], out)
    other = merge_models("della", [ft], base, params=params, seed=8).tensors["layers.0.w"]
    assert not torch.equal(other, out)
    # the default rescale_mode l1 (mergekit): the same kept entries, all multiplied by one factor that
    # gives the pruned tensor the L1 norm of the task vector
    l1 = merge_models("della", [ft], base, params={**params, "rescale_mode": "l1"}, seed=7).tensors
    l1 = l1["layers.0.w"].double()
    assert torch.equal(l1 != 0, kept)
    factor = float(delta.double().abs().sum() / delta.double()[kept].abs().sum())
    torch.testing.assert_close(l1[kept], factor * delta.double()[kept], atol=1e-5, rtol=1e-5)
    assert float(l1.abs().sum()) == pytest.approx(float(delta.double().abs().sum()), rel=1e-5)


def test_della_lambda_rescale_and_validation():
    base = {"w": torch.zeros(4)}
    ft = {"w": torch.tensor([1.0, -2.0, 3.0, -4.0])}
    full = {"density": 1.0, "combine": "sum"}
    out = merge_models("della", [ft], base, params={**full, "lambda": 0.5}).tensors["w"]
    torch.testing.assert_close(out, 0.5 * ft["w"])  # density 1 keeps all, p = 1
    a = merge_models("della", [ft], base, params={"density": 0.5, "epsilon": 0.1, "rescale": False}).tensors
    assert set(a["w"].tolist()) <= {0.0, 1.0, -2.0, 3.0, -4.0}  # kept entries are not rescaled
    with pytest.raises(ParameterError, match="density - epsilon"):
        merge_models("della", [ft], base, params={"density": 0.1, "epsilon": 0.2})


# -- DARE options ------------------------------------------------------------------------------------------
def test_dare_normalize_and_rescale_options():
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.zeros(200)}
    fts = [{"w": torch.randn(200, generator=g)} for _ in range(2)]
    mp = [{"weight": 1.0}, {"weight": 3.0}]
    p = {"drop_rate": 0.5, "rescale_mode": "probability"}
    s = merge_models("dare", fts, base, params=p, model_params=mp).tensors["w"]
    sn = merge_models("dare", fts, base, params={**p, "normalize": True}, model_params=mp).tensors["w"]
    torch.testing.assert_close(sn, s / 4)
    nr = merge_models("dare", fts, base, params={**p, "rescale": False}, model_params=mp).tensors["w"]
    torch.testing.assert_close(nr, s * 0.5)
    t = merge_models("dare", fts, base, params={**p, "combine": "ties"}, model_params=mp).tensors["w"]
    tn = merge_models(
        "dare", fts, base, params={**p, "combine": "ties", "normalize": False}, model_params=mp
    ).tensors["w"]
    # unnormalised ties: the sum of agreeing weighted entries; normalised divides by the agreeing weights
    assert not torch.allclose(t, tn)
    assert torch.all((tn.abs() >= t.abs() - 1e-6) | (t == 0))


# -- per-layer gradients and filters -----------------------------------------------------------------------
def test_interpolation_by_hand():
    assert interpolate([0.0, 1.0], 1, 3) == 0.5
    assert interpolate([0.0, 0.5, 1.0], 1, 5) == 0.25  # x = 0.25 * 2 = 0.5
    assert interpolate([1.0, 0.7, 0.1], 3, 4) == pytest.approx(0.1)
    assert interpolate([2.0, 4.0], 0, 1) == 4.0  # a single block is the last
    s = parse_schedule("t", [{"filter": "attn", "value": [0, 1]}, {"value": 0.5}])
    assert s.value("x", None) == 0.5
    assert parse_schedule("t", [{"filter": "*", "value": 2}, {"value": 0.5}]).value("x", None) == 2.0


def test_weight_gradient_and_filters_in_task_arithmetic():
    keys = [
        "embed.w",
        "layers.0.attn.w",
        "layers.0.mlp.w",
        "layers.1.attn.w",
        "layers.1.mlp.w",
        "layers.2.attn.w",
        "layers.2.mlp.w",
        "head.w",
    ]
    base = {k: torch.zeros(3) for k in keys}
    ft = {k: torch.ones(3) for k in keys}
    res = merge_models("task_arithmetic", [ft], base, params={"weight": [0.0, 1.0]}).tensors
    depth = {"embed.w": None, "head.w": None, "layers.0": 0, "layers.1": 1, "layers.2": 2}
    for k in keys:
        d = next((v for p, v in depth.items() if k.startswith(p)), None)
        expect = 0.0 if d is None else d / 2
        torch.testing.assert_close(res[k], torch.full((3,), expect))
    sched = [{"filter": "attn", "value": [1.0, 0.0]}, {"filter": "mlp", "value": 0.25}, {"value": 2.0}]
    res = merge_models("task_arithmetic", [ft], base, model_params=[{"weight": sched}]).tensors
    assert res["layers.0.attn.w"][0] == 1.0 and res["layers.1.attn.w"][0] == 0.5
    assert res["layers.2.attn.w"][0] == 0.0 and res["layers.1.mlp.w"][0] == 0.25
    assert res["embed.w"][0] == 2.0 and res["head.w"][0] == 2.0


def test_density_gradient_matches_per_key_scalar_merges():
    g = torch.Generator().manual_seed(5)
    base = {f"model.layers.{i}.w": torch.randn(10, 10, generator=g) for i in range(4)}
    base["model.embed.w"] = torch.randn(20, generator=g)
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    mp = [{"density": [1.0, 0.7, 0.1], "weight": 1.0}, {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}]
    res = merge_models("ties", fts, base, model_params=mp).tensors
    for k in base:
        i = int(k.split(".")[2]) if "layers" in k else None
        d0 = 1.0 if i is None else interpolate([1.0, 0.7, 0.1], i, 4)
        w1 = 0.0 if i is None else interpolate([0, 0.3, 0.7, 1], i, 4)
        one = merge_models(
            "ties",
            [{k: ft[k]} for ft in fts],
            {k: base[k]},
            model_params=[{"density": d0, "weight": 1.0}, {"density": 0.5, "weight": w1}],
        ).tensors[k]
        torch.testing.assert_close(res[k], one, atol=0, rtol=0)


def test_gradient_errors_name_the_parameter():
    base = {"layers.0.w": torch.zeros(2), "layers.1.w": torch.zeros(2)}
    with pytest.raises(ParameterError, match=r"parameters.density"):
        merge_models("ties", [base], base, params={"density": [0.5, 1.5]})
    with pytest.raises(ParameterError, match="numeric"):
        merge_models("ties", [base], base, params={"topk": ["tensor"]})
    with pytest.raises(ParameterError, match="topk: tensor"):
        merge_models("ties", [base], base, params={"density": [0.5, 1.0], "topk": "global"})
    with pytest.raises(ParameterError, match="fallback"):
        merge_models("task_arithmetic", [base], base, params={"weight": [{"filter": "x", "value": 1}]})


def test_finiteness_check_fast_path_does_not_refuse_large_finite_values():
    """The driver's one-sum finiteness check: a sum that overflows falls back to the exact check."""
    base = {"w": torch.zeros(4)}
    big = {"w": torch.tensor([3e38, 3e38, -1.0, 2.0])}  # finite float32, but their sum overflows
    out = merge_models("task_arithmetic", [big], base).tensors["w"]
    torch.testing.assert_close(out, big["w"])
    with pytest.raises(ParameterError, match="inf/NaN"):
        merge_models("task_arithmetic", [big, big], base)  # 6e38 overflows float32 itself


def test_finiteness_check_blames_a_non_finite_base():
    """inf/NaN already in the base's tensor is a CheckpointError (a broken input), not a ParameterError."""
    base = {"w": torch.tensor([0.0, float("inf"), 1.0])}
    ft = {"w": torch.ones(3)}
    with pytest.raises(CheckpointError, match=r"'w'.*flat index 1.*base model"):
        merge_models("task_arithmetic", [ft], base)
