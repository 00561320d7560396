"""The task-arithmetic and lines experiments end to end at a tiny scale: files, claims, tables, figures,
and the properties of the shared set-up (validation-only selection, exact tangent-space arithmetic)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")

from layerwise.experiments import EXPERIMENTS, run_experiment  # noqa: E402
from layerwise.experiments._editing_world import WorldSpec, get_world, paired_verdict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"seeds": (0, 1), "pretrain_steps": 20, "ft_steps": 4, "n_train": 60, "n_val": 40, "n_test": 40}


def test_registered_with_scales_and_systems():
    ta, li = EXPERIMENTS.get("task-arithmetic"), EXPERIMENTS.get("lines")
    assert set(ta.scales) == set(li.scales) == {"quick", "full"}
    assert set(ta.systems) == {"Task arithmetic", "Tangent-space fine-tuning"} and li.systems == ("LiNeS",)
    assert len(ta.config("quick").seeds) >= 3 and len(ta.config("quick").tasks) >= 4
    assert "cnn" in ta.config("full").archs and len(ta.config("full").tasks) == 8
    # both experiments share the pre-trained model and the fine-tunes when run in one process
    q1, q2 = ta.config("quick"), li.config("quick")
    for field in (
        "tasks",
        "seeds",
        "pretrain_steps",
        "ft_steps",
        "ft_batch",
        "ft_lr",
        "n_train",
        "n_val",
        "n_test",
    ):
        assert getattr(q1, field) == getattr(q2, field), field


def test_task_arithmetic_tiny_run(tmp_path):
    summary = run_experiment(
        "task-arithmetic",
        tmp_path,
        tasks=("rot90", "stripes"),
        xi_grid=(-1.0, 0.0, 1.0),
        xi_samples=10,
        **TINY,
    )
    folder = tmp_path / "task-arithmetic"
    for f in (
        "addition_negation_vit.png",
        "disentanglement_vit.png",
        "per_seed.csv",
        "xi.json",
        "claims.json",
    ):
        assert (folder / f).exists(), f
    claims = json.loads((folder / "claims.json").read_text())["claims"]
    assert {c["system"] for c in claims} == {"Task arithmetic", "Tangent-space fine-tuning"}
    assert len(claims) == 6
    assert 0 <= summary["nonlinear_add_norm"] and summary["ft_time_ratio"] > 1.0
    xi = json.loads((folder / "xi.json").read_text())
    assert len(xi) == 2 * 3  # seeds x modes, each a 3 x 3 grid with xi(0, 0) = 0
    assert all(grid[1][1] == 0 for grid in xi.values())


def test_lines_tiny_run(tmp_path):
    summary = run_experiment(
        "lines", tmp_path, tasks=("rot90", "stripes"), uniform_grid=(0.0, 0.5, 1.0), **TINY
    )
    folder = tmp_path / "lines"
    for f in ("lines_tradeoff.png", "lines_multitask.png", "single_task_rows.csv", "claims.json"):
        assert (folder / f).exists(), f
    claims = json.loads((folder / "claims.json").read_text())["claims"]
    assert len(claims) == 3 and {c["system"] for c in claims} == {"LiNeS"}
    assert {"multi_task_arithmetic_gain", "multi_ties_gain", "multi_consensus_gain"} <= set(summary)


def test_world_linear_combinations_are_exact_and_splits_disjoint():
    w = get_world(
        WorldSpec(
            arch="vit",
            tasks=("rot90", "stripes"),
            seed=0,
            pretrain_steps=5,
            ft_steps=3,
            n_train=80,
            n_val=20,
            n_test=20,
        )
    )
    # f_lin(theta0 + a tau1 + b tau2) from cached jvps equals a direct LinearizedModel evaluation
    from layerwise.editing.task_vector import TaskVector
    from layerwise.tangent.linearize import LinearizedModel

    t1, t2 = w.tau("linearized", "rot90"), w.tau("linearized", "stripes")
    combo = TaskVector.from_tensors({k: 0.7 * t1[k] - 0.4 * t2[k] for k in t1})
    x, y = w.data("rot90", "val")
    with torch.no_grad():
        direct = (
            (w.heads["rot90"](LinearizedModel.posthoc(w.encoder, combo)(x)).argmax(-1) == y).double().mean()
        )
    acc = w.acc_combo([("linearized", "rot90", 0.7), ("linearized", "stripes", -0.4)], "rot90", "val", True)
    assert acc == pytest.approx(float(direct))
    tr, va, te = (w.data("rot90", s)[0] for s in ("train", "val", "test"))
    flat = lambda a: {tuple(r.flatten().tolist()) for r in a}  # noqa: E731
    assert not flat(tr) & flat(te) and not flat(va) & flat(te)


def test_paired_verdict_rule():
    assert paired_verdict([1.0, 1.1, 1.2], [0.0, 0.1, 0.2])[0] == "reproduced"
    assert paired_verdict([1.0, 0.0, 1.0], [0.0, 0.9, 0.9])[0] == "partly"
    assert paired_verdict([0.0, 0.0], [0.1, 0.1])[0] == "not reproduced"


def test_lines_plain_merges_search_the_authors_grids(monkeypatch):
    """The merge coefficient of plain task arithmetic / Consensus is searched on 0.1..1.0 (step 0.1) and
    TIES on 0.1..1.5, the LiNeS authors' grids (not wider ones)."""
    from layerwise.experiments import lines as lines_exp

    tenths = [round(0.1 * k, 6) for k in range(1, 16)]
    expected = {"task_arithmetic": tenths[:10], "consensus": tenths[:10], "ties": tenths}
    seen = []
    real = lines_exp.search_addition

    def spy(evaluate, finetuned, grid):
        seen.append([round(g, 6) for g in grid])
        return real(evaluate, finetuned, grid)

    monkeypatch.setattr(lines_exp, "search_addition", spy)
    config = lines_exp.Config(tasks=("rot90", "stripes"), **TINY)
    w = get_world(WorldSpec(arch="vit", tasks=config.tasks, seed=0, pretrain_steps=20, ft_steps=4,
                            n_train=60, n_val=40, n_test=40))
    out = lines_exp._multi_task(w, config)
    # per method: the plain search, then the LiNeS beta search, both on the method's grid
    assert seen == [g for m in lines_exp.METHODS for g in (expected[m], expected[m])]
    assert all(out[m]["scale"] in expected[m] for m in lines_exp.METHODS)


@pytest.mark.slow
def test_seed_points_give_the_same_numbers_on_any_executor(tmp_path):
    """Seeds are sweep points: a spawned process pool (fresh processes: their own pre-training and
    fine-tunes) gives the numbers of the in-process run, bit for bit (timings aside)."""
    import csv

    from layerwise.sweep import sweep_options

    runs = {
        "task-arithmetic": ({"xi_grid": (-1.0, 0.0, 1.0), "xi_samples": 10}, "per_seed.csv"),
        "lines": ({"uniform_grid": (0.0, 0.5, 1.0)}, "single_task_rows.csv"),
    }
    timing = {"ft_time_ratio", "runtime_s"}
    for name, (extra, table) in runs.items():
        kw = {"tasks": ("rot90", "stripes"), **extra, **TINY}
        with sweep_options(progress=False):
            a = run_experiment(name, tmp_path / "inprocess", **kw)
        with sweep_options(executor="process", max_workers=2, progress=False):
            b = run_experiment(name, tmp_path / "process", **kw)
        same = [k for k in a if k not in timing]
        assert same and {k: a[k] for k in same} == {k: b[k] for k in same}
        rows = [
            [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(open(d / name / table))]
            for d in (tmp_path / "inprocess", tmp_path / "process")
        ]
        assert rows[0] == rows[1] and len(rows[0]) >= 2
        points = list((tmp_path / "process" / name / "points").glob("*.json"))
        assert len(points) == len(TINY["seeds"])  # one result file per seed point


def test_world_batched_passes_equal_one_pass_per_task():
    """Forward passes and jvps over several tasks' concatenated inputs give each task's numbers bit for bit
    (what lets the experiments batch them)."""
    from torch.func import functional_call

    from layerwise.tangent.linearize import linearized_jvp

    w = get_world(WorldSpec(arch="vit", tasks=("rot90", "stripes"), seed=1, pretrain_steps=5, ft_steps=3,
                            n_train=80, n_val=20, n_test=30))
    tau = w.tau("nonlinear", "rot90")
    deltas = {k: 0.6 * v for k, v in tau.items()}
    names = ("rot90", "stripes", "upright")
    many = w.features_many(deltas, names, "test")
    params = {k: v + deltas[k] if k in deltas else v for k, v in w.theta0.items()}
    with torch.no_grad():
        for t in names:
            x, y = w.data(t, "test")
            alone = functional_call(w.encoder, params, (x,))
            assert torch.equal(many[t], alone), t
            _, jt = linearized_jvp(w.encoder, w.params0(), tau, (x,))
            assert torch.equal(w.jvp("nonlinear", "rot90", t, "test"), jt), t
            acc = float((w.heads[t](alone).argmax(-1) == y).double().mean())
            assert w.acc_deltas_many(deltas, names, "test")[t] == acc


def test_resume_reuses_finished_seeds(tmp_path, monkeypatch):
    from layerwise.experiments import task_arithmetic as ta
    from layerwise.sweep import SweepError, sweep_options

    kw = {"tasks": ("rot90", "stripes"), "xi_grid": (-1.0, 0.0, 1.0), "xi_samples": 10, **TINY}
    store = tmp_path / "store"
    with sweep_options(progress=False, store=str(store)):
        first = run_experiment("task-arithmetic", tmp_path / "a", **kw)

    def fail(*args, **kwargs):
        raise AssertionError("a finished seed was recomputed")

    monkeypatch.setattr(ta, "_seed_results", fail)
    with sweep_options(progress=False, store=str(store), resume=True):
        again = run_experiment("task-arithmetic", tmp_path / "b", **kw)
    assert again == {**first, "runtime_s": again["runtime_s"]}
    with sweep_options(progress=False, store=str(store)), pytest.raises(SweepError, match="recomputed"):
        run_experiment("task-arithmetic", tmp_path / "c", **kw)  # without resume: recomputed
