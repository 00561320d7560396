"""rhm-learning: a tiny end-to-end run (files, claims, table, figure), resume through the CLI's sweep
options, and the P* crossing fit."""

from __future__ import annotations

import json
import math

import pytest

from layerwise.experiments import EXPERIMENTS, run_experiment
from layerwise.experiments._results import read_parts
from layerwise.experiments.claims import Claim, Table
from layerwise.experiments.rhm_learning import crossing
from layerwise.sweep import sweep_options

TINY = dict(settings=((8, 2, 3), (16, 2, 3)), p_ratios=(1.0, 4.0), width=16, epochs=40, n_test=128,
            n_sensitivity=64, shallow_extra_ratios=(8.0,), correlation_repeats=2)


def test_crossing_log_interpolation():
    # Error halves per doubling of P: 0.4 at 100, 0.2 at 200, 0.1 at 400 -> level 0.1 reached at 400,
    # level 0.15 between 200 and 400 at 200 * 2**(0.05/0.1) (linear in error, log in P).
    xs, ys = [100, 200, 400], [0.4, 0.2, 0.1]
    assert crossing(xs, ys, 0.1) == (pytest.approx(400.0), "bracketed")
    x, kind = crossing(xs, ys, 0.15)
    assert kind == "bracketed" and x == pytest.approx(200 * 2**0.5)
    assert crossing(xs, ys, 0.5) == (100, "below_grid")
    assert crossing(xs, ys, 0.05) == (math.inf, "above_grid")


def test_tiny_run_writes_results_and_resumes(tmp_path):
    exp = EXPERIMENTS.get("rhm-learning")
    assert exp.config("quick").settings and exp.config("full").seeds == (0, 1, 2)
    store = tmp_path / "store"
    with sweep_options(store=str(store), progress=False):
        first = run_experiment("rhm-learning", tmp_path / "a", **TINY)
    out = tmp_path / "a" / "rhm-learning"
    for name in ("collapse.png", "points.csv", "curves.csv", "p_star.csv", "results.json", "summary.json"):
        assert (out / name).is_file(), name
    points = list((store / "rhm-learning").glob("*.json"))
    assert len(points) == first["n_points"] == 2 * 2 + 3 and first["n_resumed"] == 0
    parts = read_parts(out)
    assert all(isinstance(c, Claim) for c in parts.claims) and len(parts.claims) == 4
    assert isinstance(parts.tables[0], Table) and "collapse.png" in parts.figures
    assert {c.system for c in parts.claims} == {"Random Hierarchy Model"} and "trainings" in parts.text
    fits = json.loads((out / "results.json").read_text())["fits"]
    assert {f["model"] for f in fits} == {"cnn", "fc"}
    # Resume: nothing retrained, the same numbers.
    with sweep_options(store=str(store), resume=True, progress=False):
        again = run_experiment("rhm-learning", tmp_path / "b", **TINY)
    assert again["n_resumed"] == again["n_points"]
    again_parts = read_parts(tmp_path / "b" / "rhm-learning")
    assert [c.measured for c in again_parts.claims] == [c.measured for c in parts.claims]
    assert again["p_star_over_ncmL"] == first["p_star_over_ncmL"]


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="P_max"):
        run_experiment("rhm-learning", tmp_path, settings=((8, 2, 2),), p_ratios=(4.0,), shallow=False)


# ----------------------------------------------------------------------------------- CLI wiring
def test_reproduce_passes_sweep_options_to_the_experiments(tmp_path, monkeypatch):
    import layerwise.experiments as experiments
    import layerwise.report as report
    from layerwise.cli import main
    from layerwise.sweep import current_options

    seen = []

    def fake_run(name, out_dir, scale="quick", **overrides):
        seen.append((name, current_options()))
        return {}

    monkeypatch.setattr(experiments, "run_experiment", fake_run)
    monkeypatch.setattr(report, "build_report", lambda out: "report.html")
    monkeypatch.setattr(report, "run_times", lambda out, names: "", raising=False)
    out = tmp_path / "res"
    code = main(["reproduce", "rhm-learning", "--out", str(out), "--executor", "process", "--workers", "3",
                 "--resume"])
    assert code == 0
    name, opts = seen[-1]
    assert name == "rhm-learning" and opts.executor == "process" and opts.max_workers == 3 and opts.resume
    assert opts.store == str(out / ".sweeps")
    main(["reproduce", "rhm-learning", "--out", str(out), "--executor", "dask", "--scheduler", "tcp://h:1"])
    assert seen[-1][1].executor == "dask" and seen[-1][1].scheduler == "tcp://h:1" and not seen[-1][1].resume
    main(["reproduce", "rhm-learning", "--out", str(out), "--executor", "slurm", "--partition", "gpu",
          "--slurm-cluster", "debug"])  # no SLURM on a test machine: its stand-in, asked for explicitly
    assert seen[-1][1].partition == "gpu" and seen[-1][1].slurm_cluster == "debug"
    assert current_options().executor == "inprocess"  # restored after the command


def test_reproduce_refuses_bad_sweep_options_before_writing(tmp_path, monkeypatch, capsys):
    import sys

    from layerwise.cli import main

    out = tmp_path / "res"
    assert main(["reproduce", "rhm-learning", "--out", str(out), "--scheduler", "tcp://h:1"]) == 2
    assert "scheduler is only used with executor='dask'" in capsys.readouterr().err and not out.exists()
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["reproduce", "rhm-learning", "--out", str(out), "--executor", "dask"]) == 2
    assert "layerwise[dask]" in capsys.readouterr().err and not out.exists()


def test_loglog_slope_is_exact_on_a_power_law():
    from layerwise.experiments.rhm_learning import _loglog_slope

    assert _loglog_slope([(x, 3.0 * x**1.5) for x in (10.0, 20.0, 80.0)]) == pytest.approx(1.5)
    assert math.isnan(_loglog_slope([(10.0, 1.0), (10.0, 2.0)]))


def test_every_scale_passes_the_config_checks():
    """The full scale is too long for the tests, but its config must at least be valid (it was not once:
    a P/(n_c m^L) ratio of 16 asked for more data than the (8, 2, 3) RHM has)."""
    from layerwise.experiments import EXPERIMENTS
    from layerwise.experiments.rhm_learning import _check

    exp = EXPERIMENTS.get("rhm-learning")
    for scale in exp.scales:
        _check(exp.config(scale))
