"""The sweep runner: point files, resume after a kill, failures, executors (in-process, spawn pool, a real
Dask LocalCluster, submitit's debug executor) giving the same numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from layerwise.errors import MissingExtraError, ParameterError
from layerwise.sweep import (
    Point,
    SweepError,
    SweepOptions,
    current_options,
    point_key,
    run_sweep,
    sweep_options,
)

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------- point functions
def random_point(config: dict, seed: int) -> dict:
    """A seeded float computation: the numbers must not depend on where it runs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(config["n"], config["n"], generator=gen, dtype=torch.float64)
    return {"trace": float((x @ x.T).trace()), "first": float(x[0, 0]), "n": config["n"]}


def logged_point(config: dict, seed: int) -> dict:
    """Append a line to the log file named in the config (counts invocations), optionally sleep or fail."""
    with open(config["log"], "a", encoding="utf-8") as fh:
        fh.write(f"{config['i']} {seed}\n")
    time.sleep(config.get("sleep", 0.0))
    if config.get("fail"):
        raise RuntimeError(f"point {config['i']} was told to fail")
    return {"value": config["i"] * 10 + seed, "noise": float(torch.randn(1, generator=torch.Generator()
                                                                          .manual_seed(seed)))}


def crashing_point(config: dict, seed: int) -> dict:
    if config["crash"]:
        os._exit(3)  # the worker process dies, as on a segfault or an OOM kill
    return {"i": config["i"]}


def threads_point(config: dict, seed: int) -> dict:
    return {"threads": torch.get_num_threads()}


def _log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _point_files(folder: Path) -> list[Path]:
    # Finished points only (a kill may leave a hidden temporary file, never a partial <key>.json).
    return sorted(p for p in folder.glob("*.json")
                  if not p.name.endswith(".failed.json") and not p.name.startswith("."))


# ----------------------------------------------------------------------------------- in-process basics
def test_one_file_per_point_in_order_and_keyed_by_config(tmp_path):
    points = [Point({"n": n}, seed=s) for n in (2, 3) for s in (0, 1)]
    res = run_sweep(random_point, points, tmp_path, progress=False)
    assert [r.point for r in res.points] == points
    files = _point_files(tmp_path)
    assert len(files) == 4
    for r in res.points:
        data = json.loads((tmp_path / f"{r.key}.json").read_text())
        assert data["config"] == r.point.config and data["seed"] == r.point.seed
        assert data["result"] == r.result == random_point(dict(r.point.config), r.point.seed)
    keys = {r.key for r in res.points}
    assert len(keys) == 4  # config and seed both enter the key
    assert point_key(random_point, {"n": 2}, 0) != point_key(logged_point, {"n": 2}, 0)
    same = point_key(random_point, {"a": [1, 2], "n": 2}, 0)
    assert point_key(random_point, {"n": 2, "a": (1, 2)}, 0) == same


def test_duplicates_run_once(tmp_path):
    log = tmp_path / "log.txt"
    pts = [Point({"i": 1, "log": str(log)}, 0)] * 3
    res = run_sweep(logged_point, pts, tmp_path / "pts", progress=False)
    assert len(_log_lines(log)) == 1 and [r.result["value"] for r in res.points] == [10, 10, 10]


def test_resume_skips_finished_points_and_changed_config_is_recomputed(tmp_path):
    log = tmp_path / "log.txt"
    folder = tmp_path / "pts"
    pts = [Point({"i": i, "log": str(log)}, seed=2) for i in range(4)]
    first = run_sweep(logged_point, pts[:2], folder, progress=False)
    assert len(_log_lines(log)) == 2
    second = run_sweep(logged_point, pts, folder, resume=True, progress=False)
    assert len(_log_lines(log)) == 4  # only the two new points ran
    assert second.n_resumed == 2 and [r.resumed for r in second.points] == [True, True, False, False]
    assert [r.result for r in second.points[:2]] == [r.result for r in first.points]
    # Without resume everything runs again.
    run_sweep(logged_point, pts, folder, resume=False, progress=False)
    assert len(_log_lines(log)) == 8
    # A changed config (same seed) never reuses a stale file.
    changed = [Point({"i": i, "log": str(log), "extra": 1}, seed=2) for i in range(4)]
    run_sweep(logged_point, changed, folder, resume=True, progress=False)
    assert len(_log_lines(log)) == 12


def test_failing_point_reported_with_config_and_traceback_others_kept(tmp_path):
    log = tmp_path / "log.txt"
    pts = [Point({"i": i, "log": str(log), "fail": i == 1}, seed=0) for i in range(3)]
    res = run_sweep(logged_point, pts, tmp_path / "pts", progress=False)
    assert [r.ok for r in res.points] == [True, False, True]
    bad = res.failures[0]
    assert "RuntimeError: point 1 was told to fail" == bad.error and "logged_point" in bad.traceback
    assert len(_point_files(tmp_path / "pts")) == 2
    failed = json.loads((tmp_path / "pts" / f"{bad.key}.failed.json").read_text())
    assert failed["config"]["i"] == 1 and "Traceback" in failed["traceback"]
    with pytest.raises(SweepError) as info:
        res.results()
    text = str(info.value)
    assert '"i": 1' in text and "told to fail" in text and "Traceback" in text
    # Resuming reruns only the failed point.
    run_sweep(logged_point, pts, tmp_path / "pts", resume=True, progress=False)
    assert [line.split()[0] for line in _log_lines(log)] == ["0", "1", "2", "1"]


def test_threads_option_is_applied_and_restored(tmp_path):
    before = torch.get_num_threads()
    one = run_sweep(threads_point, [Point({}, 0)], tmp_path / "a", threads=1, progress=False)
    two = run_sweep(threads_point, [Point({}, 0)], tmp_path / "b", threads=2, progress=False)
    assert one.points[0].result["threads"] == 1 and two.points[0].result["threads"] == 2
    assert torch.get_num_threads() == before


def test_options_validation_and_context(tmp_path):
    with pytest.raises(ParameterError, match="executor must be one of"):
        SweepOptions(executor="mpi")
    with pytest.raises(ParameterError, match="scheduler is only used"):
        SweepOptions(executor="process", scheduler="tcp://x:1")
    with pytest.raises(ParameterError, match="max_workers"):
        SweepOptions(max_workers=0)
    with pytest.raises(ParameterError, match="unknown sweep option"):
        run_sweep(random_point, [], tmp_path, executer="dask")
    with pytest.raises(TypeError, match="JSON"):
        Point({"x": object()}, 0)
    with pytest.raises(ParameterError, match="seed"):
        Point({}, -1)
    assert current_options().executor == "inprocess"
    log = tmp_path / "log.txt"
    with sweep_options(resume=True, store=str(tmp_path / "store")) as opts:
        assert current_options() == opts and opts.folder_for("x", "dflt") == tmp_path / "store" / "x"
        run_sweep(logged_point, [Point({"i": 0, "log": str(log)})], tmp_path / "p", progress=False)
        run_sweep(logged_point, [Point({"i": 0, "log": str(log)})], tmp_path / "p", progress=False)
    assert len(_log_lines(log)) == 1  # the context's resume=True was used
    assert current_options().resume is False and current_options().folder_for("x", "d") == Path("d")


def test_missing_extras_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(MissingExtraError, match=r"layerwise\[dask\]"):
        run_sweep(random_point, [Point({"n": 1})], tmp_path, executor="dask", progress=False)
    with pytest.raises(MissingExtraError, match=r"layerwise\[slurm\]"):
        run_sweep(random_point, [Point({"n": 1})], tmp_path, executor="slurm", progress=False)


# ----------------------------------------------------------------------------------- kill and resume
_SCRIPT = textwrap.dedent("""
    import signal, sys
    # Ctrl-C as a user's terminal delivers it: a shell that starts jobs in the background (as CI may) has
    # them ignore SIGINT, and Python then installs no KeyboardInterrupt handler; restore it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {here!r})
    from layerwise.sweep import Point, run_sweep
    from test_sweep import logged_point
    pts = [Point({{"i": i, "log": {log!r}, "sleep": {sleep}}}, seed=1) for i in range({n})]
    run_sweep(logged_point, pts, {folder!r}, executor={executor!r}, max_workers=2, resume=True,
              progress=False)
""")


def _start_and_interrupt(tmp_path: Path, executor: str, sig: int, n: int, sleep: float, after: int):
    """Run a sweep in a child process and send ``sig`` once ``after`` point files exist."""
    folder, log = tmp_path / "pts", tmp_path / "log.txt"
    script = _SCRIPT.format(here=str(HERE), log=str(log), sleep=sleep, n=n, folder=str(folder),
                            executor=executor)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    try:
        while len(_point_files(folder)) < after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"sweep ended before it could be interrupted: {proc.stderr.read()!r}"
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return folder, log


def test_killed_inprocess_sweep_resumes_without_redoing_points(tmp_path):
    n = 6
    folder, log = _start_and_interrupt(tmp_path, "inprocess", signal.SIGKILL, n=n, sleep=0.3, after=2)
    finished = {json.loads(p.read_text())["config"]["i"] for p in _point_files(folder)}
    assert 2 <= len(finished) < n
    ran_before = len(_log_lines(log))
    pts = [Point({"i": i, "log": str(log), "sleep": 0.3}, seed=1) for i in range(n)]
    res = run_sweep(logged_point, pts, folder, resume=True, progress=False)
    rerun = [int(line.split()[0]) for line in _log_lines(log)[ran_before:]]
    assert not set(rerun) & finished and set(rerun) | finished == set(range(n))
    assert res.n_resumed == len(finished)
    fresh = run_sweep(logged_point, pts, tmp_path / "fresh", progress=False)
    assert [r.result for r in res.points] == [r.result for r in fresh.points]


@pytest.mark.slow
def test_dask_localcluster_interrupted_then_resumed_same_numbers(tmp_path):
    """A real LocalCluster (2 workers): an interrupted dask sweep resumes on dask and matches in-process."""
    pytest.importorskip("distributed")
    # enough points that the interrupt, sent once 2 have finished, always lands before the last one is done
    # (with 5 points a slow start of the cluster let every point finish first on a loaded CI machine)
    n, sleep = 16, 0.2
    folder, log = _start_and_interrupt(tmp_path, "dask", signal.SIGINT, n=n, sleep=sleep, after=2)
    finished = {json.loads(p.read_text())["config"]["i"] for p in _point_files(folder)}
    assert 2 <= len(finished) < n
    ran_before = len(_log_lines(log))
    pts = [Point({"i": i, "log": str(log), "sleep": sleep}, seed=1) for i in range(n)]
    # The results hold seeded torch draws: the dask numbers must equal in-process ones.
    res = run_sweep(logged_point, pts, folder, executor="dask", max_workers=2, resume=True, progress=False)
    rerun = {int(line.split()[0]) for line in _log_lines(log)[ran_before:]}
    assert not rerun & finished and rerun | finished == set(range(n))
    reference = run_sweep(logged_point, [Point({**p.config, "log": str(tmp_path / "ref.txt")}, p.seed)
                                         for p in pts], tmp_path / "ref", progress=False)
    assert [r.result for r in res.points] == [r.result for r in reference.points]


def test_spawn_process_pool_gives_inprocess_numbers(tmp_path):
    pts = [Point({"n": n}, seed=s) for n in (3, 17) for s in (0, 5)]
    ref = run_sweep(random_point, pts, tmp_path / "a", progress=False).results()
    pool = run_sweep(random_point, pts, tmp_path / "b", executor="process", max_workers=2, progress=False)
    assert pool.results() == ref and pool.executor == "process"


def test_dead_worker_fails_its_points_without_losing_finished_ones(tmp_path):
    pts = [Point({"i": i, "crash": i == 1}, seed=0) for i in range(3)]
    res = run_sweep(crashing_point, pts, tmp_path, executor="process", max_workers=1, progress=False)
    assert res.points[0].ok and res.points[0].result == {"i": 0}
    assert [p.ok for p in res.points[1:]] == [False, False]
    assert all("BrokenProcessPool" in p.error for p in res.failures)
    assert len(_point_files(tmp_path)) == 1 and len(list(tmp_path.glob("*.failed.json"))) == 2


def test_slurm_path_through_submitit_debug_executor(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    seen = {}
    original = submitit.AutoExecutor.update_parameters

    def capture(self, **kwargs):
        seen.update(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(submitit.AutoExecutor, "update_parameters", capture)
    log = tmp_path / "log.txt"
    pts = [Point({"i": i, "log": str(log), "fail": i == 2}, seed=3) for i in range(3)]
    res = run_sweep(logged_point, pts, tmp_path / "pts", executor="slurm", slurm_cluster="debug",
                    partition="debugq", slurm_timeout_min=7, slurm_cpus_per_task=3, slurm_mem_gb=2.5,
                    progress=False)
    assert seen == {"timeout_min": 7, "cpus_per_task": 3, "mem_gb": 2.5, "slurm_partition": "debugq"}
    ref = run_sweep(logged_point, pts, tmp_path / "ref", progress=False)
    assert [r.result for r in res.points] == [r.result for r in ref.points]
    assert [r.ok for r in res.points] == [True, True, False] and "told to fail" in res.failures[0].error
    assert (tmp_path / "pts" / "submitit").is_dir()


def test_progress_option(tmp_path, capsys):
    run_sweep(random_point, [Point({"n": 1})], tmp_path / "a", progress=False)
    assert "sweep (inprocess)" not in capsys.readouterr().err
    run_sweep(random_point, [Point({"n": 1})], tmp_path / "b", progress=True)
    assert "sweep (inprocess)" in capsys.readouterr().err
