"""Data-dependent merges (RegMean, Fisher merging) and the statistics behind them, checked against closed
forms on linear models: RegMean of least-squares fits is the least-squares fit on the union of the data;
Fisher merging is the Fisher-weighted average (the plain average for equal Fishers)."""

from __future__ import annotations

import pytest
import torch
import yaml

from layerwise.cli import main
from layerwise.editing import load_state_dict
from layerwise.editing.merge import (
    DATA_MERGE_METHODS,
    collect_fisher,
    collect_regmean_stats,
    load_statistics,
    merge_models,
    merge_with_statistics,
    save_statistics,
)
from layerwise.errors import CheckpointError, InputDataError, ParameterError

D, K = 5, 3
SIZES = (7, 19, 40)  # rows per task: unequal, so that "sum" and "mean" Grams differ


def _tasks(seed=0):
    """Three regression tasks with different inputs and targets: (X_i (n_i, D), Y_i (n_i, K))."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(SIZES):
        x = torch.randn(n, D, generator=g, dtype=torch.float64) * (1 + i) + i
        w = torch.randn(K, D, generator=g, dtype=torch.float64)
        out.append((x, x @ w.T + 0.3 * torch.randn(n, K, generator=g, dtype=torch.float64)))
    return out


def _fit(x, y):
    """Least-squares weight (K, D): argmin ||x W^T - y||."""
    return torch.linalg.lstsq(x, y).solution.T


def _linear(w, bias=None):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _batches(x, size=6):
    return [x[i : i + size] for i in range(0, len(x), size)]


def test_regmean_stats_are_input_grams():
    x, _ = _tasks()[1]
    model = torch.nn.Sequential(
        _linear(torch.randn(4, D, dtype=torch.float64)),
        torch.nn.ReLU(),
        _linear(torch.randn(2, 4, dtype=torch.float64)),
    )
    model.train()
    stats = collect_regmean_stats(model, _batches(x))
    assert model.training  # mode restored
    torch.testing.assert_close(stats["0.weight"], x.T @ x)
    h = torch.relu(model[0](x)).detach()
    torch.testing.assert_close(stats["2.weight"], h.T @ h)
    assert stats.counts == {"0.weight": len(x), "2.weight": len(x)}
    only = collect_regmean_stats(model, _batches(x), modules=["2"])
    assert set(only) == {"2.weight"}
    # leading dimensions are rows: a (B, S, D) batch counts B * S rows
    seq = collect_regmean_stats(model, [x[:6].reshape(2, 3, D)])
    torch.testing.assert_close(seq["0.weight"], x[:6].T @ x[:6])
    assert seq.counts["0.weight"] == 6
    with pytest.raises(InputDataError):
        collect_regmean_stats(model, [])
    with pytest.raises(ParameterError, match="modules"):
        collect_regmean_stats(model, [x], modules=["1"])


def test_regmean_of_least_squares_fits_is_least_squares_on_the_union():
    tasks = _tasks()
    models = [{"weight": _fit(x, y)} for x, y in tasks]
    stats = [
        collect_regmean_stats(_linear(m["weight"]), _batches(x))
        for m, (x, _) in zip(models, tasks, strict=True)
    ]
    merged = merge_with_statistics("regmean", models, stats)
    xs, ys = torch.cat([x for x, _ in tasks]), torch.cat([y for _, y in tasks])
    union = _fit(xs, ys)
    torch.testing.assert_close(merged["weight"], union, rtol=1e-9, atol=1e-9)
    # ... which is not the plain average of the fits
    assert (merged["weight"] - sum(m["weight"] for m in models) / 3).abs().max() > 1e-2
    # gram: mean weights each task's rows by 1 / n_i: the weighted least-squares solution
    mean = merge_with_statistics("regmean", models, stats, params={"gram": "mean"})["weight"]
    wts = torch.cat([torch.full((n,), 1.0 / n, dtype=torch.float64) for n in SIZES])
    weighted = _fit(xs * wts.sqrt()[:, None], ys * wts.sqrt()[:, None])
    torch.testing.assert_close(mean, weighted, rtol=1e-9, atol=1e-9)
    assert (mean - union).abs().max() > 1e-3
    # per-model weights w_i multiply the Grams: rows of task i weighted by w_i
    w = [1.0, 3.0, 0.5]
    got = merge_with_statistics("regmean", models, stats, weights=w)["weight"]
    rw = torch.cat([torch.full((n,), wi, dtype=torch.float64) for n, wi in zip(SIZES, w, strict=True)])
    torch.testing.assert_close(
        got, _fit(xs * rw.sqrt()[:, None], ys * rw.sqrt()[:, None]), rtol=1e-9, atol=1e-9
    )


def test_regmean_alpha_scales_off_diagonals():
    tasks = _tasks(1)
    models = [{"weight": _fit(x, y)} for x, y in tasks]
    stats = [
        collect_regmean_stats(_linear(m["weight"]), [x]) for m, (x, _) in zip(models, tasks, strict=True)
    ]
    for alpha in (0.0, 0.4):
        gs = [alpha * x.T @ x + (1 - alpha) * torch.diag(torch.diagonal(x.T @ x)) for x, _ in tasks]
        expected = sum(m["weight"] @ g for m, g in zip(models, gs, strict=True)) @ torch.linalg.inv(sum(gs))
        got = merge_with_statistics("regmean", models, stats, params={"alpha": alpha})["weight"]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # alpha 0: diagonal Grams, each column a weighted mean of the models' columns
    d = [torch.diagonal(x.T @ x) for x, _ in tasks]
    col = sum(m["weight"] * di for m, di in zip(models, d, strict=True)) / sum(d)
    torch.testing.assert_close(
        merge_with_statistics("regmean", models, stats, params={"alpha": 0.0})["weight"], col
    )


def test_regmean_averages_other_tensors_and_refuses_bad_statistics():
    tasks = _tasks()
    g = torch.Generator().manual_seed(3)
    models = [
        {
            "weight": _fit(x, y),
            "bias": torch.randn(K, generator=g, dtype=torch.float64),
            "steps": torch.tensor([i]),
        }
        for i, (x, y) in enumerate(tasks)
    ]
    stats = [
        collect_regmean_stats(_linear(m["weight"], m["bias"]), [x])
        for m, (x, _) in zip(models, tasks, strict=True)
    ]
    merged, info = merge_with_statistics("regmean", models, stats, return_info=True)
    torch.testing.assert_close(merged["bias"], sum(m["bias"] for m in models) / 3)
    assert torch.equal(merged["steps"], torch.tensor([0]))  # integer tensors: the first model's
    assert info["regmean_layers"] == ["weight"]
    with pytest.raises(CheckpointError, match="missing for model 1"):
        merge_with_statistics("regmean", models, [stats[0], {}, stats[2]])
    with pytest.raises(CheckpointError, match="expected"):
        merge_with_statistics("regmean", models, [stats[0], stats[1], {"weight": torch.eye(2)}])
    rank1 = torch.ones(3, D, dtype=torch.float64)  # inputs spanning one direction: a singular Gram
    low = [collect_regmean_stats(_linear(m["weight"]), [rank1]) for m in models]
    with pytest.raises(ParameterError, match="singular"):
        merge_with_statistics("regmean", models, low)
    assert merge_with_statistics("regmean", models, low, params={"alpha": 0.5})["weight"].isfinite().all()
    with pytest.raises(ParameterError, match="alpha"):
        merge_with_statistics("regmean", models, stats, params={"alpha": 1.5})
    with pytest.raises(ParameterError, match="unknown"):
        merge_with_statistics("regmean", models, stats, params={"eps": 1.0})
    with pytest.raises(ParameterError, match="one entry per model"):
        merge_with_statistics("regmean", models, stats[:2])
    with pytest.raises(ParameterError, match="data-dependent merge method"):
        merge_with_statistics("ties", models, stats)
    assert sorted(DATA_MERGE_METHODS.names()) == ["fisher", "regmean"]


def _mse(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).mean()


def test_collect_fisher_is_the_mean_squared_batch_gradient():
    x, y = _tasks()[2]
    w = torch.randn(K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    b = torch.zeros(K, dtype=torch.float64)
    model = _linear(w, b)
    model.weight.grad = torch.full_like(w, 7.0)  # restored afterwards
    batches = list(zip(_batches(x, 8), _batches(y, 8), strict=True))
    fisher = collect_fisher(model, batches, _mse)
    gw, gb = [], []
    for xb, yb in batches:  # d/dW 0.5 mean((x W^T + b - y)^2) = r^T x / (n K), r the residuals
        r = xb @ w.T + b - yb
        gw.append((r.T @ xb / r.numel()) ** 2)
        gb.append((r.sum(0) / r.numel()) ** 2)
    torch.testing.assert_close(fisher["weight"], sum(gw) / len(gw))
    torch.testing.assert_close(fisher["bias"], sum(gb) / len(gb))
    assert fisher.counts["weight"] == len(batches)
    assert torch.equal(model.weight.grad, torch.full_like(w, 7.0)) and model.bias.grad is None
    only = collect_fisher(model, batches, _mse, names=["bias"])
    assert set(only) == {"bias"}
    with pytest.raises(ParameterError, match="scalar"):
        collect_fisher(model, batches, lambda m, b: m(b[0]))


def test_fisher_merge_closed_forms():
    g = torch.Generator().manual_seed(5)
    models = [{"w": torch.randn(4, 3, generator=g), "n": torch.tensor([i])} for i in range(3)]
    same = torch.rand(4, 3, generator=g) + 0.1
    avg = merge_with_statistics("fisher", models, [{"w": same}] * 3)
    torch.testing.assert_close(avg["w"], sum(m["w"] for m in models) / 3)
    fs = [{"w": torch.rand(4, 3, generator=g) + 0.01} for _ in models]
    got = merge_with_statistics("fisher", models, fs)["w"]
    expected = sum(f["w"] * m["w"] for f, m in zip(fs, models, strict=True)) / sum(f["w"] for f in fs)
    torch.testing.assert_close(got, expected)
    w = [2.0, 0.0, 1.0]
    got = merge_with_statistics("fisher", models, fs, weights=w)["w"]
    expected = sum(wi * f["w"] * m["w"] for wi, f, m in zip(w, fs, models, strict=True)) / sum(
        wi * f["w"] for wi, f in zip(w, fs, strict=True)
    )
    torch.testing.assert_close(got, expected)
    # eps floors the Fishers: a zero Fisher against a tiny one
    pair = [{"w": torch.zeros(1)}, {"w": torch.ones(1)}]
    tiny = [{"w": torch.zeros(1)}, {"w": torch.full((1,), 1e-9)}]
    assert merge_with_statistics("fisher", pair, tiny, params={"eps": 1e-3})["w"].item() == pytest.approx(
        0.5, abs=1e-5
    )
    assert merge_with_statistics("fisher", pair, tiny, params={"eps": 1e-15})["w"].item() == pytest.approx(
        1.0, abs=1e-5
    )
    # tensors without a Fisher are averaged
    part = merge_with_statistics(
        "fisher", [{**m, "b": torch.full((2,), float(i))} for i, m in enumerate(models)], fs, return_info=True
    )
    assert part[1]["averaged"] == ["b"] and torch.equal(part[0]["b"], torch.ones(2))
    with pytest.raises(CheckpointError, match="negative"):
        merge_with_statistics("fisher", models, [{"w": -same}] * 3)
    with pytest.raises(ParameterError, match="weights"):
        merge_with_statistics("fisher", models, fs, weights=[0.0, 0.0, 0.0])


def test_statistics_files_and_the_cli(tmp_path, capsys):
    from safetensors.torch import save_file

    tasks = _tasks()
    models, stat_files = [], []
    for i, (x, y) in enumerate(tasks):
        lin = _linear(_fit(x, y).float().double(), torch.zeros(K, dtype=torch.float64))
        path = tmp_path / f"ft{i}.safetensors"
        save_file({k: v.contiguous() for k, v in lin.state_dict().items()}, str(path))
        models.append(path)
        stat_files.append(tmp_path / f"ft{i}.stats.safetensors")
        save_statistics(collect_regmean_stats(lin, _batches(x)), stat_files[-1])
    back = load_statistics(stat_files[0], "regmean")
    torch.testing.assert_close(back["weight"], tasks[0][0].T @ tasks[0][0])
    assert back.counts == {"weight": SIZES[0]}
    with pytest.raises(CheckpointError, match="regmean statistics, fisher needed"):
        load_statistics(stat_files[0], "fisher")
    with pytest.raises(CheckpointError, match="not a layerwise statistics file"):
        load_statistics(models[0])
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "regmean",
                "parameters": {"gram": "mean"},
                "models": [
                    {"model": m.name, "statistics": s.name, "weight": 1.0 + i}
                    for i, (m, s) in enumerate(zip(models, stat_files, strict=True))
                ],
            }
        )
    )
    out = tmp_path / "merged"
    assert main(["merge-data", str(cfg), "--out", str(out)]) == 0
    got = load_state_dict(out)
    expected = merge_with_statistics(
        "regmean",
        [str(m) for m in models],
        [str(s) for s in stat_files],
        weights=[1.0, 2.0, 3.0],
        params={"gram": "mean"},
    )
    assert set(got) == {"weight", "bias"}
    torch.testing.assert_close(got["weight"], expected["weight"])
    # the YAML's weights and parameters reach the merge (plain sums differ)
    plain = merge_with_statistics("regmean", [str(m) for m in models], [str(s) for s in stat_files])
    assert (plain["weight"] - got["weight"]).abs().max() > 1e-4
    assert (out / "merge_info.json").is_file()
    assert main(["merge-data", str(cfg), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"method": "regmean", "models": [{"model": "x"}]}))
    assert main(["merge-data", str(cfg), "--out", str(tmp_path / "o2")]) == 2
    assert "models[0]" in capsys.readouterr().err


def test_the_element_wise_entry_points_point_data_methods_to_merge_data(tmp_path, capsys):
    # `layerwise merge --list-methods` lists both registries; the data-dependent ones under their command
    assert main(["merge", "--list-methods"]) == 0
    listing = capsys.readouterr().out
    tail = listing.split("data-dependent methods", 1)[1]
    for name in DATA_MERGE_METHODS.names():
        assert f"\n{name}: " in tail and DATA_MERGE_METHODS.get(name).reference in tail
    # method: regmean in a `layerwise merge` YAML, or merge_models("fisher"): one line naming merge-data
    a = {"w": torch.zeros(3)}
    with pytest.raises(ParameterError, match="'fisher' is data-dependent.*merge-data"):
        merge_models("fisher", [a, a], a)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"method": "regmean", "models": ["a", "b"], "base_model": "c"}))
    assert main(["merge", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'regmean' is data-dependent" in err and "merge-data" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "name",
    [
        "layerwise.editing.merge.statistics",
        "layerwise.editing.merge.data_dependent",
        "layerwise.editing.convert",
        "layerwise.tangent.fusionbench",
    ],
)
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
