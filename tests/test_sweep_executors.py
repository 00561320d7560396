"""Executor options of the sweep runner: every SLURM option reaches the sbatch script submitit writes (a fake
``sbatch`` captures it, no cluster needed), several points per job, requeue after preemption, a Dask
``scheduler`` of an existing cluster, and the resume checks of ``_read_finished`` and ``.failed.json``."""

from __future__ import annotations

import json
import os
import pickle
import stat
import time
from pathlib import Path

import pytest
import torch

from layerwise.errors import ParameterError
from layerwise.sweep import Point, SweepOptions, point_key, run_sweep

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------- point functions
def seeded_point(config: dict, seed: int) -> dict:
    """A seeded float computation, logged (one line per call) to ``config["log"]`` when given."""
    if config.get("log"):
        with open(config["log"], "a", encoding="utf-8") as fh:
            fh.write(f"{config['i']}\n")
    gen = torch.Generator().manual_seed(seed * 1000 + config["i"])
    x = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    return {"i": config["i"], "trace": float((x @ x.T).trace()), "first": float(x[0, 0])}


def flaky_point(config: dict, seed: int) -> dict:
    """Fails while the file ``config["flag"]`` exists."""
    if Path(config["flag"]).exists():
        raise RuntimeError("flag file present")
    return {"i": config["i"]}


class Preempted(BaseException):
    """What submitit's signal handler does to a running job: it leaves the point function abruptly."""


def preemptible_point(config: dict, seed: int) -> dict:
    """Logged; raises :class:`Preempted` (once) at the point named in ``config["preempt_at"]``."""
    with open(config["log"], "a", encoding="utf-8") as fh:
        fh.write(f"{config['i']}\n")
    marker = Path(config["log"] + ".preempted")
    if config["i"] == config["preempt_at"] and not marker.exists():
        marker.write_text("once")
        raise Preempted
    return {"i": config["i"], "value": config["i"] ** 2 + seed}


def where_point(config: dict, seed: int) -> dict:
    """Logs the address of the Dask worker it runs on; the result does not depend on it."""
    from distributed import get_worker

    with open(config["log"], "a", encoding="utf-8") as fh:
        fh.write(get_worker().address + "\n")
    return seeded_point({"i": config["i"]}, seed)


def _points(n: int, **extra) -> list[Point]:
    return [Point({"i": i, **extra}, seed=7) for i in range(n)]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ----------------------------------------------------------------------------------- SLURM: the sbatch script
@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` on PATH that keeps a copy of the script it is given and refuses it (so nothing runs)."""
    pytest.importorskip("submitit")
    bindir, captured = tmp_path / "bin", tmp_path / "captured.sh"
    bindir.mkdir()
    refuse = f'cp "$1" {captured}\necho "sbatch: error: fake sbatch (test)" >&2\nexit 1'
    for name, body in (("sbatch", refuse), ("srun", "exit 1")):  # submitit looks for srun before it submits
        script = bindir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return captured


def _sbatch_lines(tmp_path: Path, captured: Path, n_points: int, **options) -> set[str]:
    with pytest.raises(Exception, match="fake sbatch"):
        run_sweep(seeded_point, _points(n_points), tmp_path / "pts", executor="slurm", slurm_cluster="slurm",
                  progress=False, **options)
    return {line for line in captured.read_text().splitlines() if line.startswith("#SBATCH")}


def test_every_slurm_option_reaches_the_sbatch_script(tmp_path, fake_sbatch):
    lines = _sbatch_lines(tmp_path, fake_sbatch, 5, partition="gpuq", slurm_account="proj42",
                          slurm_qos="high", slurm_timeout_min=7, slurm_cpus_per_task=3, slurm_mem_gb=2.5,
                          slurm_gpus_per_job=2,
                          slurm_array_parallelism=2, slurm_points_per_job=2, slurm_requeue=True)
    for want in ("#SBATCH --partition=gpuq", "#SBATCH --account=proj42", "#SBATCH --qos=high",
                 "#SBATCH --time=7", "#SBATCH --cpus-per-task=3", "#SBATCH --mem=2560MB",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --requeue",
                 "#SBATCH --array=0-2%2"):  # 5 points, 2 per job: 3 jobs, at most 2 at once
        assert want in lines, (want, sorted(lines))


def test_slurm_defaults_in_the_sbatch_script(tmp_path, fake_sbatch):
    lines = _sbatch_lines(tmp_path, fake_sbatch, 3)
    assert "#SBATCH --array=0-2%3" in lines  # one job per point, all at once
    assert "#SBATCH --time=60" in lines and "#SBATCH --cpus-per-task=1" in lines
    assert not any(key in line for line in lines
                   for key in ("--requeue", "--account", "--qos", "--gpus", "--partition", "--mem"))


def test_slurm_options_are_validated_and_only_for_slurm():
    for bad in ({"slurm_points_per_job": 0}, {"slurm_gpus_per_job": -1}, {"slurm_array_parallelism": 0},
                {"slurm_account": ""}, {"slurm_timeout_min": 0}, {"slurm_qos": 3}):
        with pytest.raises(ParameterError, match=next(iter(bad))):
            SweepOptions(executor="slurm", **bad)
    with pytest.raises(ParameterError, match="slurm_qos, slurm_requeue are only used with executor='slurm'"):
        SweepOptions(executor="process", slurm_qos="high", slurm_requeue=True)


# ------------------------------------------------------------------------------- SLURM: jobs (debug cluster)
def test_several_points_per_job_one_file_per_point_same_numbers(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    sizes = []
    original = submitit.AutoExecutor.submit

    def counting_submit(self, fn, *args, **kwargs):
        sizes.append(len(args[0]))
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(submitit.AutoExecutor, "submit", counting_submit)
    pts = _points(5)
    res = run_sweep(seeded_point, pts, tmp_path / "pts", executor="slurm", slurm_cluster="debug",
                    slurm_points_per_job=2, progress=False)
    assert sizes == [2, 2, 1]  # three jobs
    ref = run_sweep(seeded_point, pts, tmp_path / "ref", progress=False)
    assert res.results() == ref.results()
    files = sorted(p.name for p in (tmp_path / "pts").glob("*.json"))
    assert files == sorted(f"{r.key}.json" for r in res.points)


def test_requeued_job_skips_the_points_it_had_finished(tmp_path):
    pytest.importorskip("submitit")
    from layerwise.sweep import _Chunk, _RequeueableChunk, _submit_all

    log = tmp_path / "log.txt"
    pts = _points(3, log=str(log), preempt_at=1)
    name = f"{preemptible_point.__module__}.{preemptible_point.__qualname__}"
    items = [(point_key(preemptible_point, p.config, p.seed), p.config, p.seed) for p in pts]
    folder = tmp_path / "pts"
    folder.mkdir()
    job = _RequeueableChunk(preemptible_point, name, str(folder), 1)
    with pytest.raises(Preempted):
        job(items)
    # submitit's handler now calls job.checkpoint(*args) and pickles the submission it returns
    delayed = pickle.loads(pickle.dumps(job.checkpoint(items)))
    outs = delayed.result()
    assert [o["result"]["value"] for o in outs] == [0 + 7, 1 + 7, 4 + 7]
    assert _lines(log) == ["0", "1", "1", "2"]  # point 0 ran once, 1 again after the preemption
    ref = run_sweep(preemptible_point, [Point({**p.config, "preempt_at": -1}, p.seed) for p in pts],
                    tmp_path / "ref", progress=False)
    assert [o["result"] for o in outs] == ref.results()
    assert len(list(folder.glob("*.json"))) == 3  # each point written by the job as it finished
    # Without slurm_requeue the job is not checkpointable (submitit does not requeue it after a timeout).
    assert not hasattr(_Chunk(preemptible_point, name, str(folder), 1), "checkpoint")

    class Recorder:
        def __init__(self):
            self.fns = []

        def submit(self, fn, *args):
            self.fns.append(fn)
            return len(self.fns)

        def batch(self):
            import contextlib

            return contextlib.nullcontext()

    for requeue, kind in ((True, _RequeueableChunk), (False, _Chunk)):
        rec = Recorder()
        opts = SweepOptions(executor="slurm", slurm_requeue=requeue)
        _submit_all(rec, opts, preemptible_point, name, folder,
                    [(i, key, p) for i, ((key, _, _), p) in enumerate(zip(items, pts, strict=True))])
        assert [type(fn) for fn in rec.fns] == [kind] * 3


def self_preempting_point(config: dict, seed: int) -> dict:
    """Logged; at point ``preempt_at`` the first time, sends itself submitit's preemption signal (SIGUSR2)."""
    import signal as _signal

    with open(config["log"], "a", encoding="utf-8") as fh:
        fh.write(f"{config['i']}\n")
    marker = Path(config["log"] + ".preempted")
    if config["i"] == config["preempt_at"] and not marker.exists():
        marker.write_text("once")
        os.kill(os.getpid(), _signal.SIGUSR2)
        time.sleep(30)  # the signal handler checkpoints and exits the job before this ends
    return {"i": config["i"], "value": config["i"] ** 2 + seed}


@pytest.mark.slow
@pytest.mark.parametrize("requeue", [True, False])
def test_preempted_job_on_submitit_local_cluster(tmp_path, monkeypatch, requeue):
    """A real submitit job (the "local" stand-in, a subprocess) preempted after its first point: it is
    requeued; with ``slurm_requeue`` it skips the point it had finished, without it reruns it."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "log.txt"
    pts = _points(3, log=str(log), preempt_at=1)
    res = run_sweep(self_preempting_point, pts, tmp_path / "pts", executor="slurm", slurm_cluster="local",
                    slurm_points_per_job=3, slurm_requeue=requeue, progress=False)
    assert [r["value"] for r in res.results()] == [0 + 7, 1 + 7, 4 + 7]
    assert _lines(log) == (["0", "1", "1", "2"] if requeue else ["0", "1", "0", "1", "2"])


def test_dead_slurm_job_keeps_the_points_it_wrote(tmp_path, monkeypatch):
    """A job that dies after writing some of its points: those are kept, the others fail."""
    import contextlib

    import layerwise.sweep as sweep

    class Job:  # a finished submitit job
        def __init__(self, fn, items):
            fn(items[:1])  # the job writes its first point, then its node is lost
            self.exc = RuntimeError("node lost")

        def done(self):
            return True

        def result(self):
            raise self.exc

    class Cluster:
        def submit(self, fn, items):
            return Job(fn, items)

        def batch(self):
            return contextlib.nullcontext()

    monkeypatch.setattr(sweep, "_pool", lambda opts, folder: contextlib.nullcontext(Cluster()))
    pts = _points(4)
    res = run_sweep(seeded_point, pts, tmp_path / "pts", executor="slurm", slurm_points_per_job=2,
                    progress=False)
    assert [r.ok for r in res.points] == [True, False, True, False]
    assert all("node lost" in r.error for r in res.failures)
    assert [res.points[k].result for k in (0, 2)] == [seeded_point(dict(pts[k].config), 7) for k in (0, 2)]
    assert len(list((tmp_path / "pts").glob("*.failed.json"))) == 2


# ------------------------------------------------------------------------------- Dask: an existing cluster
@pytest.mark.slow
def test_dask_scheduler_of_an_existing_cluster_gives_inprocess_numbers(tmp_path):
    distributed = pytest.importorskip("distributed")
    log = tmp_path / "where.txt"
    pts = [Point({"i": i, "log": str(log)}, seed=s) for i in range(4) for s in (0, 3)]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        workers = set(cluster.scheduler_info["workers"])
        res = run_sweep(where_point, pts, tmp_path / "pts", executor="dask",
                        scheduler=cluster.scheduler_address, progress=False)
    assert res.executor == "dask"
    assert set(_lines(log)) <= workers and len(_lines(log)) == len(pts)  # ran on that cluster's workers
    ref = [seeded_point({"i": p.config["i"]}, p.seed) for p in pts]
    assert res.results() == ref  # bit for bit: floats compared with ==


# ----------------------------------------------------------------------------------- resume checks
def test_resume_refuses_a_stored_result_whose_key_differs(tmp_path):
    folder = tmp_path / "pts"
    a, b = Point({"i": 1}, seed=0), Point({"i": 2}, seed=0)
    first = run_sweep(seeded_point, [a, b], folder, progress=False)
    key_a, key_b = first.points[0].key, first.points[1].key
    # b's finished file now sits under a's name (a foreign or misplaced file): it must not be taken for a.
    (folder / f"{key_a}.json").write_text((folder / f"{key_b}.json").read_text())
    again = run_sweep(seeded_point, [a], folder, resume=True, progress=False)
    assert again.n_resumed == 0 and again.points[0].result == first.points[0].result
    assert json.loads((folder / f"{key_a}.json").read_text())["key"] == key_a  # rewritten


def test_failed_file_removed_after_the_point_succeeds(tmp_path):
    flag = tmp_path / "flag"
    flag.write_text("fail")
    pts = [Point({"i": 0, "flag": str(flag)})]
    res = run_sweep(flaky_point, pts, tmp_path / "pts", progress=False)
    failed = tmp_path / "pts" / f"{res.points[0].key}.failed.json"
    assert not res.points[0].ok and failed.exists()
    flag.unlink()
    again = run_sweep(flaky_point, pts, tmp_path / "pts", resume=True, progress=False)
    assert again.points[0].ok and not failed.exists()
    assert sorted(p.name for p in (tmp_path / "pts").iterdir()) == [f"{res.points[0].key}.json"]


def test_cli_slurm_flags_reach_the_sweep_options(tmp_path, monkeypatch, capsys, fake_sbatch):
    # fake_sbatch: --executor slurm refuses where no sbatch is on PATH (tests/test_sweep_slurm_refusal.py)
    pytest.importorskip("submitit")
    import layerwise.experiments as experiments
    import layerwise.report as report
    from layerwise.cli import main
    from layerwise.sweep import current_options

    seen = []
    monkeypatch.setattr(experiments, "run_experiment",
                        lambda name, out_dir, scale="quick", **kw: seen.append(current_options()) or {})
    monkeypatch.setattr(report, "build_report", lambda out: "report.html")
    monkeypatch.setattr(report, "run_times", lambda out, names: "", raising=False)
    out = tmp_path / "res"
    assert main(["reproduce", "rhm-stats", "--out", str(out), "--executor", "slurm", "--partition", "p",
                 "--account", "acc", "--qos", "q", "--time-min", "30", "--cpus-per-job", "4", "--mem-gb", "8",
                 "--gpus-per-job", "1", "--array-parallelism", "5", "--points-per-job", "3",
                 "--requeue"]) == 0
    opts = seen[-1]
    assert (opts.partition, opts.slurm_account, opts.slurm_qos, opts.slurm_timeout_min,
            opts.slurm_cpus_per_task, opts.slurm_mem_gb, opts.slurm_gpus_per_job,
            opts.slurm_array_parallelism, opts.slurm_points_per_job, opts.slurm_requeue) == (
        "p", "acc", "q", 30, 4, 8.0, 1, 5, 3, True)
    assert main(["reproduce", "rhm-stats", "--out", str(out), "--executor", "slurm"]) == 0
    assert seen[-1] == SweepOptions(executor="slurm", store=str(out / ".sweeps"))  # the defaults
    assert main(["reproduce", "rhm-stats", "--out", str(tmp_path / "x"), "--qos", "q", "--requeue"]) == 2
    err = capsys.readouterr().err
    assert "--qos, --requeue only apply to --executor slurm" in err and not (tmp_path / "x").exists()

