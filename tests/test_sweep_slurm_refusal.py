"""``executor="slurm"`` where no SLURM cluster is reachable: one line and exit 2, never submitit's silent
fallback to this machine; submitit's local/debug stand-ins only when asked for (issue 21, item 6)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerwise.errors import ParameterError
from layerwise.sweep import Point, SweepOptions, check_slurm_cluster, current_options, run_sweep

pytest.importorskip("submitit")  # the refusal is about what submitit would do


def square_point(config: dict, seed: int) -> dict:
    """A point whose result is known exactly."""
    return {"i": config["i"], "value": config["i"] ** 2 + seed}


@pytest.fixture
def no_sbatch(tmp_path, monkeypatch):
    """PATH without sbatch or srun (whatever the machine has)."""
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("sbatch", "srun"):
        script = bindir / name
        script.write_text("#!/bin/sh\nexit 1\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bindir))


_LINE = "executor='slurm' but no SLURM cluster is reachable from this machine (no sbatch on PATH)"


def test_check_slurm_cluster_follows_sbatch(no_sbatch, fake_sbatch, monkeypatch):
    # fake_sbatch ran last: sbatch is on PATH, so SLURM is used
    assert check_slurm_cluster(SweepOptions(executor="slurm")) == "slurm"
    assert check_slurm_cluster(SweepOptions(executor="slurm", slurm_cluster="slurm")) == "slurm"
    monkeypatch.setenv("PATH", str(no_sbatch))
    for cluster in (None, "slurm"):
        with pytest.raises(ParameterError, match=r"no SLURM cluster is reachable") as info:
            check_slurm_cluster(SweepOptions(executor="slurm", slurm_cluster=cluster))
        assert "\n" not in str(info.value) and "--slurm-cluster local|debug" in str(info.value)
    assert check_slurm_cluster(SweepOptions(executor="slurm", slurm_cluster="local")) == "local"
    assert check_slurm_cluster(SweepOptions(executor="slurm", slurm_cluster="debug")) == "debug"


def test_run_sweep_refuses_without_running_a_point(tmp_path, no_sbatch):
    with pytest.raises(ParameterError, match="no SLURM cluster is reachable"):
        run_sweep(square_point, [Point({"i": 1})], tmp_path / "pts", executor="slurm", progress=False)
    assert not (tmp_path / "pts" / "submitit").exists()  # submitit never started


def test_slurm_cluster_is_validated_and_slurm_only():
    with pytest.raises(ParameterError,
                       match=r"slurm_cluster must be one of \[None, 'slurm', 'local', 'debug'\]"):
        SweepOptions(executor="slurm", slurm_cluster="cloud")
    with pytest.raises(ParameterError, match="slurm_cluster is only used with executor='slurm'"):
        SweepOptions(executor="process", slurm_cluster="debug")


def test_debug_cluster_runs_a_tiny_sweep_with_inprocess_numbers(tmp_path, no_sbatch):
    pts = [Point({"i": i}, seed=s) for i in range(3) for s in (0, 5)]
    res = run_sweep(square_point, pts, tmp_path / "pts", executor="slurm", slurm_cluster="debug",
                    progress=False)
    assert res.results() == [{"i": p.config["i"], "value": p.config["i"] ** 2 + p.seed} for p in pts]
    assert (tmp_path / "pts" / "submitit").is_dir()  # it did go through submitit


def _tiny_experiment(name, out_dir, scale="quick", **kw):
    """Stands in for an experiment: a tiny sweep under the CLI's sweep options."""
    opts = current_options()
    res = run_sweep(square_point, [Point({"i": i}, seed=1) for i in range(3)],
                    opts.folder_for(name, Path(out_dir) / name), opts)
    _tiny_experiment.seen.append((opts, res.results()))
    return {}


def test_cli_refuses_quickly_and_runs_the_debug_cluster_when_asked(tmp_path, no_sbatch, monkeypatch, capsys):
    import layerwise.experiments as experiments
    import layerwise.report as report
    from layerwise.cli import main

    _tiny_experiment.seen = []
    monkeypatch.setattr(experiments, "run_experiment", _tiny_experiment)
    monkeypatch.setattr(report, "build_report", lambda out: "report.html")
    monkeypatch.setattr(report, "run_times", lambda out, names: "", raising=False)
    out = tmp_path / "res"
    assert main(["reproduce", "rhm-learning", "--out", str(out), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and _LINE in err and not out.exists()
    assert _tiny_experiment.seen == []  # refused before any experiment ran
    assert main(["reproduce", "rhm-learning", "--out", str(out), "--executor", "slurm",
                 "--slurm-cluster", "debug"]) == 0
    (opts, results), = _tiny_experiment.seen
    assert opts.slurm_cluster == "debug"
    assert results == [{"i": i, "value": i * i + 1} for i in range(3)]
    assert (out / ".sweeps" / "rhm-learning" / "submitit").is_dir()
    assert main(["reproduce", "rhm-learning", "--out", str(tmp_path / "x"), "--slurm-cluster", "local"]) == 2
    assert "--slurm-cluster only apply to --executor slurm" in capsys.readouterr().err


def test_layerwise_reproduce_executor_slurm_exits_2_in_one_line(tmp_path):
    """The real command, in its own process, on a PATH without sbatch: refused at once."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    argv = ["reproduce", "rhm-learning", "--executor", "slurm", "--out", str(tmp_path / "r")]
    res = subprocess.run([sys.executable, "-m", "layerwise", *argv], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerwise reproduce: error:") and _LINE in lines[0]
    assert not (tmp_path / "r").exists()
    assert elapsed < 60  # start-up and argument checks only (about 2 s idle)
