"""Merge methods against straightforward dense reference formulas, a common suite run over every registered
method (streaming == in memory, chunking invariance, determinism), the exact streaming top-k threshold,
LiNeS inside the driver, atomic output and the registry's errors."""

from __future__ import annotations

import pytest
import torch

from layerwise.editing import (
    MERGE_METHODS,
    LinesSpec,
    Param,
    load_state_dict,
    merge_models,
    register_merge_method,
)
from layerwise.editing.checkpoints import StateDictCheckpoint
from layerwise.editing.merge import TwoPassThreshold, kth_largest_abs, plan_merge, uniform_draws

T = 3


def _setup(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (13, 6),
        "layers.0.attn.w": (6, 6),
        "layers.0.mlp.0.weight": (12, 6),
        "layers.1.attn.w": (6, 6),
        "layers.1.norm.b": (6,),
        "layers.2.attn.w": (6, 6),
        "head.w": (3, 6),
        "scalar": (),
        "empty": (0, 6),
    }
    base = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
    base["pos_ids"] = torch.arange(5)
    fts = []
    for _ in range(T):
        ft = {
            k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=dtype)
            for k, v in base.items()
            if k != "pos_ids"
        }
        ft["pos_ids"] = base["pos_ids"].clone()
        fts.append(ft)
    return base, fts


FKEYS = lambda sd: [k for k, v in sd.items() if v.is_floating_point()]  # noqa: E731


def _taus(base, fts):
    return [{k: ft[k].double() - base[k].double() for k in FKEYS(base)} for ft in fts]


def _topk_mask_tensor(x: torch.Tensor, density: float) -> torch.Tensor:
    """Exactly the max(1, int(density * n)) largest |x| (reference: argsort, as mergekit does)."""
    flat = x.reshape(-1)
    k = max(1, int(density * flat.numel())) if density > 0 else 0
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.argsort(flat.abs().float(), descending=True)[:k]] = True
    return mask.reshape(x.shape)


def _topk_mask_global(tau: dict, density: float) -> dict:
    keys = list(tau)
    flat = torch.cat([tau[k].reshape(-1) for k in keys])
    mask = _topk_mask_tensor(flat, density)
    out, pos = {}, 0
    for k in keys:
        n = tau[k].numel()
        out[k] = mask[pos : pos + n].reshape(tau[k].shape)
        pos += n
    return out


def _ties_ref(taus, keep, weights):
    out = {}
    for k in taus[0]:
        trimmed = torch.stack([torch.where(keep[t][k], taus[t][k], 0) for t in range(len(taus))])
        w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * trimmed[0].dim())
        elected = torch.sign((w * trimmed).sum(0))
        agree = (torch.sign(w * trimmed) == elected) & (trimmed != 0)
        num = (w * trimmed * agree).sum(0)
        den = (w * agree).sum(0)
        out[k] = torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1, den))
    return out


def _reference(method, base, fts, params, weights):
    """Merged task vectors by the papers' formulas, dense, float64."""
    taus = _taus(base, fts)
    keys = FKEYS(base)
    if method == "task_arithmetic":
        return {k: sum(w * tau[k] for w, tau in zip(weights, taus, strict=False)) for k in keys}
    if method == "average":
        thetas = [{k: ft[k].double() for k in keys} for ft in fts]
        return {
            k: sum(w * th[k] for w, th in zip(weights, thetas, strict=False)) / sum(weights)
            - base[k].double()
            for k in keys
        }
    if method in ("ties", "magnitude_prune"):
        d = params.get("density", 0.2)
        if params.get("topk", "tensor") == "global":
            keep = [_topk_mask_global(tau, d) for tau in taus]
        else:
            keep = [{k: _topk_mask_tensor(tau[k], d) for k in keys} for tau in taus]
        if method == "magnitude_prune":
            return {
                k: sum(
                    w * torch.where(kp[k], tau[k], 0) for w, kp, tau in zip(weights, keep, taus, strict=False)
                )
                for k in keys
            }
        return _ties_ref(taus, keep, weights)
    if method in ("consensus", "tall_masks"):
        lam = params.get("mask_lambda", 0.6)
        out = {}
        for k in keys:
            theta0 = base[k].double()
            theta_mtl = theta0 + sum(w * tau[k] for w, tau in zip(weights, taus, strict=False))
            masks = [(theta0 - ft[k].double()).abs() > lam * (theta_mtl - ft[k].double()).abs() for ft in fts]
            mtl = theta_mtl - theta0
            if method == "consensus":
                out[k] = torch.where(sum(m.int() for m in masks) >= params.get("k", 2), mtl, 0)
            else:
                out[k] = torch.where(masks[int(params["target"])], mtl, 0)
        return out
    raise KeyError(method)


CASES = [
    ("task_arithmetic", {}),
    ("average", {}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "topk": "global"}),
    ("magnitude_prune", {"density": 0.25}),
    ("magnitude_prune", {"density": 0.4, "topk": "global"}),
    ("consensus", {"k": 2, "mask_lambda": 0.5}),
    ("tall_masks", {"target": 1, "mask_lambda": 0.4}),
]


@pytest.mark.parametrize("method,params", CASES)
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.7, 1.3, 0.4), (0.7, -1.3, 0.4)])
def test_methods_match_dense_reference(method, params, weights):
    base, fts = _setup(1)
    scale = 0.8
    res = merge_models(
        method,
        fts,
        base,
        params=params,
        model_params=[{"weight": w} for w in weights],
        scale=scale,
        chunk_elements=17,
    )  # small chunks: tensors span several, top-k goes two-pass
    ref = _reference(method, base, fts, params, weights)
    for k in FKEYS(base):
        expected = base[k].double() + scale * ref[k]
        torch.testing.assert_close(res.tensors[k].double(), expected, atol=2e-6, rtol=0, msg=k)
        assert res.tensors[k].dtype == base[k].dtype
    assert torch.equal(res.tensors["pos_ids"], base["pos_ids"])


def test_average_without_base_is_the_mean_of_models():
    _, fts = _setup(2)
    res = merge_models("average", fts)
    for k in FKEYS(fts[0]):
        torch.testing.assert_close(res.tensors[k], sum(ft[k] for ft in fts) / T, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="needs a base model"):
        merge_models("ties", fts)


def test_dare_given_its_draws_matches_formula_and_statistics():
    base, fts = _setup(3)
    p = 0.6
    res = merge_models("dare", fts, base, params={"drop_rate": p}, seed=5, chunk_elements=10)
    prob = merge_models(
        "dare", fts, base, params={"drop_rate": p, "rescale_mode": "probability"}, seed=5, chunk_elements=10
    )
    taus = _taus(base, fts)
    for k in FKEYS(base):
        n = base[k].numel()
        masks = [uniform_draws(5, k, t, 0, n, n).reshape(base[k].shape) >= p for t in range(T)]
        kept = [torch.where(m, tau[k], 0) for m, tau in zip(masks, taus, strict=False)]
        # default (mergekit): each kept tensor scaled back to the L1 norm of its task vector
        l1 = [
            tau[k].abs().sum() / kp.abs().sum() if kp.abs().sum() >= 1e-7 else 1.0
            for kp, tau in zip(kept, taus, strict=False)
        ]
        expected = base[k].double() + sum(f * kp for f, kp in zip(l1, kept, strict=False))
        torch.testing.assert_close(res.tensors[k].double(), expected, atol=2e-6, rtol=0)
        # rescale_mode probability (the paper): kept entries divided by 1 - p
        expected = base[k].double() + sum(kp / (1 - p) for kp in kept)
        torch.testing.assert_close(prob.tensors[k].double(), expected, atol=2e-6, rtol=0)
    # the property mergekit keeps: one sparsified task vector has its tensor's L1 norm (ratio 1), while
    # dividing by 1 - p gives ratios that scatter around 1
    one = merge_models("dare", fts[:1], base, params={"drop_rate": p}, seed=5, chunk_elements=10).tensors
    one_p = merge_models(
        "dare", fts[:1], base, params={"drop_rate": p, "rescale_mode": "probability"}, seed=5
    ).tensors
    ratios = []
    for k in FKEYS(base):
        tau_l1 = float((fts[0][k] - base[k]).double().abs().sum())
        if tau_l1 == 0:
            continue
        assert float((one[k] - base[k]).double().abs().sum()) == pytest.approx(tau_l1, rel=1e-5)
        ratios.append(float((one_p[k] - base[k]).double().abs().sum()) / tau_l1)
    assert max(abs(r - 1) for r in ratios) > 0.02
    # same seed -> same result; another seed -> another result
    again = merge_models("dare", fts, base, params={"drop_rate": p}, seed=5)
    other = merge_models("dare", fts, base, params={"drop_rate": p}, seed=6)
    assert all(torch.equal(again.tensors[k], res.tensors[k]) for k in base)
    assert not torch.equal(other.tensors["embed.weight"], res.tensors["embed.weight"])


def test_dare_draws_are_uniform_unbiased_and_chunking_invariant():
    n = 3 * (1 << 20) + 123  # spans several RNG blocks
    u = uniform_draws(0, "w", 2, 0, n, n)
    assert u.shape == (n,) and 0 <= float(u.min()) and float(u.max()) < 1
    # fraction below p: binomial, std sqrt(p(1-p)/n) ~ 2.8e-4 -> 5 sigma
    assert abs(float((u < 0.3).float().mean()) - 0.3) < 5 * (0.21 / n) ** 0.5
    pieces = torch.cat([uniform_draws(0, "w", 2, s, min(n, s + 777_777), n) for s in range(0, n, 777_777)])
    assert torch.equal(pieces, u)
    assert not torch.equal(uniform_draws(0, "w", 1, 0, 1000, n), u[:1000])
    # DARE is unbiased: averaging over seeds recovers the task vector (rescaling by 1/(1-p))
    base = {"w": torch.zeros(2000)}
    ft = {"w": torch.linspace(-1, 1, 2000)}
    mean = sum(
        merge_models(
            "dare", [ft], base, params={"drop_rate": 0.5, "rescale_mode": "probability"}, seed=s
        ).tensors["w"]
        for s in range(400)
    )
    mean = mean / 400
    # per-entry std of the mean: |x| * 1/sqrt(400) (Bernoulli(0.5) times 2x) <= 0.05; check the average error
    assert float((mean - ft["w"]).abs().mean()) < 0.05 and float((mean - ft["w"]).mean().abs()) < 0.01


@pytest.mark.parametrize("method", sorted(MERGE_METHODS.names()))
def test_common_streaming_equals_in_memory_and_chunking_invariant(method, tmp_path):
    base, fts = _setup(4)
    params = {"tall_masks": {"target": 2}, "slerp": {"t": 0.3}, "nearswap": {"t": 0.05}}.get(method, {})
    params = {**params, **({"select_topk": 0.5} if method == "sce" else {})}
    one = ("slerp", "nearswap", "passthrough")
    fts = fts[:1] if method in one else fts  # SLERP, NearSwap: the base and one model
    whole = merge_models(method, fts, base, params=params, seed=1)
    chunked = merge_models(method, fts, base, params=params, seed=1, chunk_elements=5)
    out = merge_models(
        method, fts, base, params=params, seed=1, chunk_elements=5, out=tmp_path / "m", max_shard_bytes=300
    ).out
    assert len(list(out.glob("*.safetensors"))) > 1
    disk = load_state_dict(out)
    for k in base:
        torch.testing.assert_close(chunked.tensors[k], whole.tensors[k], atol=1e-6, rtol=0)
        assert torch.equal(disk[k], chunked.tensors[k]), k
    # determinism, and zero task vectors leave the base unchanged for every method
    again = merge_models(method, fts, base, params=params, seed=1)
    assert all(torch.equal(again.tensors[k], whole.tensors[k]) for k in base)
    zero = merge_models(method, [dict(base) for _ in fts], base, params=params, seed=1)
    assert all(torch.equal(zero.tensors[k], base[k]) for k in base)


def test_output_dtype_and_float64_inputs():
    base, fts = _setup(5, dtype=torch.float64)
    res = merge_models("task_arithmetic", fts, base, dtype="bfloat16")
    ref = _reference("task_arithmetic", base, fts, {}, (1, 1, 1))
    for k in FKEYS(base):
        assert res.tensors[k].dtype == torch.bfloat16
        torch.testing.assert_close(res.tensors[k], (base[k] + ref[k]).to(torch.bfloat16), atol=0, rtol=0)
    exact = merge_models("task_arithmetic", fts, base)
    for k in FKEYS(base):
        torch.testing.assert_close(exact.tensors[k], base[k] + ref[k], atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_two_pass_threshold_is_exact_kth_largest(seed):
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randn(5000, generator=g) * 10 ** float(torch.randint(-6, 3, (1,), generator=g)),
        torch.randint(-3, 4, (5000,), generator=g).float(),  # many ties and zeros
        torch.cat([torch.zeros(4000), torch.randn(1000, generator=g)]),
        torch.randn(5000, generator=g).half().float(),
    ]
    x = torch.stack(rows)
    for ks in ([1, 1, 1, 1], [2500, 17, 999, 4321], [5000, 5000, 5000, 5000], [0, 4999, 1000, 3]):
        expected = torch.tensor(
            [
                float(x[i].abs().sort(descending=True).values[k - 1]) if k > 0 else float("inf")
                for i, k in enumerate(ks)
            ]
        )
        assert torch.equal(kth_largest_abs(x, ks), expected)
        sel = TwoPassThreshold(ks)
        for _ in range(2):
            for s in range(0, 5000, 777):
                sel.update(x[:, s : s + 777])
            if sel.pass_ == 1:
                sel.next_pass()
        assert torch.equal(sel.result(), expected)


def test_lines_in_driver_explicit_and_auto_alpha(tmp_path):
    base, fts = _setup(6)
    depth = {
        "layers.0.attn.w": 0,
        "layers.0.mlp.0.weight": 0,
        "layers.1.attn.w": 1,
        "layers.1.norm.b": 1,
        "layers.2.attn.w": 2,
    }
    alpha, beta = 0.3, 0.5
    res = merge_models("task_arithmetic", fts, base, lines=LinesSpec(alpha=alpha, beta=beta))
    ref = _reference("task_arithmetic", base, fts, {}, (1, 1, 1))
    for k in FKEYS(base):
        lam = alpha + beta * depth[k] / 2 if k in depth else alpha
        torch.testing.assert_close(
            res.tensors[k].double(), base[k].double() + lam * ref[k], atol=2e-6, rtol=0
        )
    assert [r["scale"] for r in res.lines_table] == pytest.approx(
        [alpha, alpha, alpha + beta / 2, alpha + beta]
    )
    # automatic alpha: 1/T for task arithmetic, the L1 norm ratio / T for TIES
    ta = merge_models("task_arithmetic", fts, base, lines=LinesSpec(beta=0.5))
    assert ta.lines_alpha == pytest.approx(1 / T, rel=1e-9)
    params = {"density": 0.3}
    ties = merge_models("ties", fts, base, params=params, lines=LinesSpec(beta=0.5), chunk_elements=11)
    tref = _reference("ties", base, fts, params, (1, 1, 1))
    taus = _taus(base, fts)
    sum_l1 = sum(float(sum(tau[k] for tau in taus).abs().sum()) for k in FKEYS(base))
    alpha_ref = sum_l1 / sum(float(v.abs().sum()) for v in tref.values()) / T
    assert ties.lines_alpha == pytest.approx(alpha_ref, rel=1e-6)
    k = "layers.2.attn.w"
    torch.testing.assert_close(
        ties.tensors[k].double(), base[k].double() + (alpha_ref + 0.5) * tref[k], atol=2e-6, rtol=0
    )
    # on disk (the alpha pass stashes the merged vector in the temporary folder): same tensors, no stash
    disk = merge_models(
        "ties", fts, base, params=params, lines=LinesSpec(beta=0.5), chunk_elements=11, out=tmp_path / "o"
    )
    assert disk.lines_alpha == ties.lines_alpha
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        ".layerwise-output",
        "README.md",  # the model card
        "layerwise_merge.json",
        "model.safetensors",
    ]
    on_disk = load_state_dict(tmp_path / "o")
    assert all(torch.equal(on_disk[k], ties.tensors[k]) for k in base)


class _Exploding(StateDictCheckpoint):
    def __init__(self, tensors, after: int, exc: type[BaseException]):
        super().__init__(tensors, source="exploding")
        self.reads, self.after, self.exc = 0, after, exc

    def read(self, key, start=0, stop=None):
        self.reads += 1
        if self.reads > self.after:
            raise self.exc("interrupted")
        return super().read(key, start, stop)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_merge_leaves_previous_output_or_nothing(tmp_path, exc):
    base, fts = _setup(7)
    target = tmp_path / "merged"
    with pytest.raises(exc):
        merge_models(
            "task_arithmetic", [*fts[:2], _Exploding(fts[2], 4, exc)], base, out=target, max_shard_bytes=200
        )
    assert list(tmp_path.iterdir()) == []
    merge_models("task_arithmetic", fts, base, out=target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(exc):
        merge_models("ties", [*fts[:2], _Exploding(fts[2], 6, exc)], base, out=target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_registry_errors_and_custom_method():
    base, fts = _setup(8)
    with pytest.raises(ValueError, match="unknown merge method 'tie'.*task_arithmetic"):
        merge_models("tie", fts, base)
    with pytest.raises(ValueError, match=r"models\[1\].parameters.density must be in \[0.0, 1.0\], got 1.5"):
        merge_models("ties", fts, base, model_params=[{}, {"density": 1.5}, {}])
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['densty'\].*valid"):
        merge_models("ties", fts, base, params={"densty": 0.1})
    with pytest.raises(ValueError, match="topk must be one of"):
        merge_models("ties", fts, base, params={"topk": "layer"})
    with pytest.raises(ValueError, match="per-model 'density'"):
        register_merge_method("needs_thresholds", inputs=("thresholds",))
    with pytest.raises(ValueError, match="inputs must be among"):
        register_merge_method("needs_magic", inputs=("magic",))
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method("ties")(lambda d: d[0])
    with pytest.raises(ValueError, match="lacks 1 key"):
        merge_models("task_arithmetic", [fts[0], {k: v for k, v in fts[1].items() if k != "head.w"}], base)

    @register_merge_method("test_max_abs", params=[Param("scale2", 1.0, low=0.0)], description="test only")
    def test_max_abs(deltas, *, scale2):
        idx = deltas.abs().argmax(dim=0, keepdim=True)  # (1, n)
        return scale2 * deltas.gather(0, idx)[0]

    try:
        res = merge_models("test_max_abs", fts, base, params={"scale2": 2.0}, chunk_elements=4)
        taus = _taus(base, fts)
        k = "embed.weight"
        stacked = torch.stack([tau[k] for tau in taus])
        ref = stacked.gather(0, stacked.abs().argmax(0, keepdim=True))[0]
        torch.testing.assert_close(res.tensors[k].double(), base[k].double() + 2 * ref, atol=2e-6, rtol=0)
    finally:
        MERGE_METHODS.unregister("test_max_abs")


def test_plan_reads_no_tensor_data():
    base, fts = _setup(9)
    spy = _Exploding(fts[0], 0, RuntimeError)
    plan = plan_merge("ties", [spy, *fts[1:]], base, lines=LinesSpec(alpha=0.5))
    text = plan.describe()
    assert spy.reads == 0
    for needle in ("ties", "model 0: exploding", "LiNeS", "layers.", "merged"):
        assert needle in text


@pytest.mark.parametrize("n", [0, 5, 3 * (1 << 16) + 17])
def test_blocked_gram_equals_the_float64_gram(n):
    from layerwise.editing.merge.stream import _gram

    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g) * 3 + 1
    deltas = torch.randn(3, n, generator=g) * 0.01
    rows = torch.cat([base[None, :], deltas]).double()  # (4, n)
    expected = rows @ rows.T
    got = _gram(base, deltas)
    assert got.dtype == torch.float64 and got.shape == (4, 4)
    # float64 sums in another order: equal to ~1e-16 relative; a float32 accumulation would be ~1e-7 off
    scale = float(expected.abs().max().clamp(min=1))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * scale)
