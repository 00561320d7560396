"""``layerwise reproduce --device`` / ``run_experiment(device=)``: one check before anything runs, and the
device reaches every library call of every experiment family that can run on it, through the sweep points.

On a CPU-only machine the device ``"cpu:0"`` stands in for a GPU: it is valid, and unlike the default
``"cpu"`` it is seen only if the option is passed all the way down. Each experiment runs with a spy in place
of the library call (or of the model that is moved to the device): the spy records the device it receives
and stops the point, so these tests take seconds. The ``cuda``-marked tests run tiny experiments end to end
on a GPU where there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerwise.cli import main
from layerwise.errors import ParameterError
from layerwise.experiments import EXPERIMENTS, run_experiment
from layerwise.sweep import SweepError, sweep_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEVICE = "cpu:0"  # valid everywhere, and not the default "cpu": a dropped option shows

TINY = {
    "rhm-learning": dict(settings=((8, 2, 2),), p_ratios=(1.0,), width=8, epochs=2, n_test=16,
                         n_sensitivity=8, shallow=False, correlation_repeats=1),
    "phase-transition": dict(depths=(2,), eps_levels=(0.5,), n_data=4, process_depth=2,
                             process_levels=(0.5,), processes=(), bp_check_instances=()),
    "chunks": dict(depths=(2,), eps_levels=(0.5,), n_x0=2, n_traj=2, mask_levels=(0.5,)),
    "locality": dict(P_list=(8, 16), n_test=16, seeds=(0,), torus=0),
    "deep-kernels": dict(n_spectrum=64, P_list=(8, 16), n_test=16, seeds=(0,), spectrum_shapes=((4, 4),)),
    "diffeo-stability": dict(datasets=("shapes",), nets=("fc",), train_sizes=(32,), steps=1, n_probe=8,
                             n_test=40, workers=1, shapes_n=120, shapes_size=16),
    "task-arithmetic": dict(tasks=("rot90", "stripes"), seeds=(0,), pretrain_steps=1, ft_steps=1,
                            n_train=20, n_val=10, n_test=10),
    "lines": dict(tasks=("rot90", "stripes"), seeds=(0,), pretrain_steps=1, ft_steps=1, n_train=20,
                  n_val=10, n_test=10),
    "m3id": dict(seeds=(0,), workers=1, n_train_scenes=8, train_steps=1, batch_size=4, hidden=32,
                 n_test_scenes=2, n_dpo_images=2, lambdas=(1.0,), n_reliance=1),
    "m3id-long": dict(seeds=(0,), workers=1, n_train_scenes=8, train_steps=1, batch_size=4, hidden=32,
                      n_test_scenes=2, n_reliance=1),
}


class _Seen(RuntimeError):
    """Raised by the spies once they have seen the device: the point stops there (cheap)."""


class _Moved:
    """Stands in for a model: records the device it is moved to, then stops the point."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def to(self, device, *args, **kwargs):
        self.seen.append(str(device))
        raise _Seen("device spy")


def _spy_call(seen):
    def spy(*args, **kwargs):
        seen.append(str(kwargs.get("device")))
        raise _Seen("device spy")
    return spy


def _install_spy(name: str, monkeypatch) -> list[str]:
    """Replace the call through which experiment ``name`` reaches its device; return the devices seen."""
    seen: list[str] = []
    if name == "rhm-learning":
        monkeypatch.setattr("layerwise.hierarchy.learning.train", _spy_call(seen))
    elif name in ("phase-transition", "chunks"):
        monkeypatch.setattr("layerwise.experiments._bp_levels.BPDenoiser", _spy_call(seen))
    elif name == "locality":
        monkeypatch.setattr("layerwise.experiments.locality.learning_curve", _spy_call(seen))
    elif name == "deep-kernels":
        monkeypatch.setattr("layerwise.experiments.deep_kernels.learning_curve", _spy_call(seen))
    elif name == "diffeo-stability":
        monkeypatch.setattr("layerwise.experiments.diffeo_stability.make_net", lambda *a, **k: _Moved(seen))
    elif name in ("task-arithmetic", "lines"):
        monkeypatch.setattr("layerwise.experiments._editing_world._pretrain", lambda spec: _Moved(seen))
    elif name in ("m3id", "m3id-long"):
        monkeypatch.setattr("layerwise.decoding.toy_vlm.build_toy_llava", lambda *a, **k: _Moved(seen))
    else:
        raise AssertionError(f"no spy for {name}")
    return seen


def _devices_in(obj) -> list[str]:
    """Every value of a ``device`` key, at any depth (diffeo-stability nests its study in the point)."""
    if isinstance(obj, dict):
        here = [str(v) for k, v in obj.items() if k == "device"]
        return here + [d for v in obj.values() for d in _devices_in(v)]
    if isinstance(obj, list):
        return [d for v in obj for d in _devices_in(v)]
    return []


def test_every_experiment_but_rhm_stats_takes_a_device():
    assert {n for n in EXPERIMENTS.names() if EXPERIMENTS.get(n).uses_device} == set(TINY)
    assert not EXPERIMENTS.get("rhm-stats").uses_device  # exact enumeration, CPU only
    for name in TINY:  # the default stays the CPU
        exp = EXPERIMENTS.get(name)
        assert exp.config("quick").device == exp.config("full").device == "cpu"


@pytest.mark.parametrize("name", list(TINY))
def test_the_device_reaches_the_library_call_through_the_sweep_points(name, tmp_path, monkeypatch):
    if name in ("m3id", "m3id-long"):
        pytest.importorskip("transformers")
        pytest.importorskip("trl")
    if name == "diffeo-stability":
        pytest.importorskip("sklearn")
    seen = _install_spy(name, monkeypatch)
    with sweep_options(store=str(tmp_path / "store"), progress=False):
        with pytest.raises(SweepError, match="device spy"):
            run_experiment(name, tmp_path / "out", device=DEVICE, **TINY[name])
    assert seen and set(seen) == {DEVICE}, seen
    # the device travels inside every point's config (what a process, Dask or SLURM worker receives)
    failed = sorted((tmp_path / "store").rglob("*.failed.json"))
    assert failed
    for path in failed:
        assert _devices_in(json.loads(path.read_text())["config"]) == [DEVICE], path
    assert not (tmp_path / "out" / name).exists()


def test_cpu0_gives_the_default_numbers_and_is_recorded(tmp_path):
    """A run on device "cpu:0" computes exactly what the default run computes; config.json and run.json
    say which device produced the numbers."""
    kw = dict(P_list=(8, 16, 32), n_test=32, seeds=(0, 1), torus=0)
    with sweep_options(progress=False):
        run_experiment("locality", tmp_path / "a", **kw)
        run_experiment("locality", tmp_path / "b", device=" CPU:0 ", **kw)
    a, b = tmp_path / "a" / "locality", tmp_path / "b" / "locality"
    assert (a / "results.json").read_text() == (b / "results.json").read_text()
    config = json.loads((b / "config.json").read_text())
    assert config["device"] == config["config"]["device"] == DEVICE  # normalised
    assert json.loads((b / "run.json").read_text())["device"] == DEVICE
    assert json.loads((a / "run.json").read_text())["device"] == "cpu"
    assert json.loads((a / "config.json").read_text())["config"]["device"] == "cpu"


def test_a_cpu_only_experiment_records_that_it_ran_on_the_cpu(tmp_path):
    with sweep_options(progress=False):
        run_experiment("rhm-stats", tmp_path, device=DEVICE, vs=(8,), ms=(2,), Ls=(2, 3), n_seeds=1,
                       enumerate_instances=((4, 4, 2, 2, 2),))
    run = json.loads((tmp_path / "rhm-stats" / "run.json").read_text())
    assert run["device"] == "cpu" and run["device_requested"] == DEVICE
    assert json.loads((tmp_path / "rhm-stats" / "config.json").read_text())["device"] == "cpu"


@pytest.mark.parametrize("device", ["meta", "gpu", "cuda:x", 0])
def test_run_experiment_refuses_a_bad_device_before_writing(device, tmp_path):
    with pytest.raises(ParameterError, match="^device must be one of cpu, cuda"):
        run_experiment("locality", tmp_path, device=device)
    with pytest.raises(ParameterError, match="^device must be one of cpu, cuda"):
        run_experiment("rhm-stats", tmp_path, device=device)  # also where the experiment runs on the CPU
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "meta", "garbage", "xla"])
def test_reproduce_refuses_a_bad_device_in_one_line(device, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CUDA absent, even on a GPU machine
    ran = []
    monkeypatch.setattr("layerwise.experiments.run_experiment", lambda *a, **k: ran.append(a))
    out = tmp_path / "o"
    assert main(["reproduce", "locality", "rhm-stats", "--device", device, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--device must be one of cpu, cuda" in err and repr(device) in err, err
    assert not ran and not out.exists()


def test_reproduce_passes_the_device_to_every_experiment(tmp_path, capsys, monkeypatch):
    calls = []

    def fake(name, out, scale="quick", **kw):
        calls.append((name, kw))
        (Path(out) / name).mkdir(parents=True)
        return {"runtime_s": 0.0}

    monkeypatch.setattr("layerwise.experiments.run_experiment", fake)
    monkeypatch.setattr("layerwise.report.build_report", lambda out: tmp_path / "o" / "report.html")
    monkeypatch.setattr("layerwise.report.run_times", lambda out, names: "")
    argv = ["reproduce", "locality", "rhm-stats", "--device", "CPU:0", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert calls == [("locality", {"device": DEVICE}), ("rhm-stats", {"device": DEVICE})]
    said = capsys.readouterr().out
    assert "locality (quick, on cpu:0)" in said and "rhm-stats (quick, on cpu)" in said  # CPU-only: says so
    calls.clear()
    assert main(["reproduce", "locality", "--out", str(tmp_path / "p")]) == 0
    assert calls == [("locality", {"device": "cpu"})]  # the default


# ----------------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["locality", "rhm-learning", "phase-transition", "diffeo-stability"])
def test_tiny_experiments_run_on_cuda(name, tmp_path):
    if name == "diffeo-stability":
        pytest.importorskip("sklearn")
    kw = {**TINY[name], **({"epochs": 20} if name == "rhm-learning" else {})}
    with sweep_options(progress=False):
        run_experiment(name, tmp_path / "gpu", device="cuda", **kw)
        run_experiment(name, tmp_path / "cpu", **kw)
    assert json.loads((tmp_path / "gpu" / name / "run.json").read_text())["device"] == "cuda"
    if name == "locality":  # float64 Gram matrices and solves: the GPU gives the CPU numbers to round-off
        gpu = json.loads((tmp_path / "gpu" / name / "results.json").read_text())
        cpu = json.loads((tmp_path / "cpu" / name / "results.json").read_text())
        assert gpu.keys() == cpu.keys()
        torch.testing.assert_close(torch.tensor(_floats(gpu)), torch.tensor(_floats(cpu)), rtol=1e-6,
                                   atol=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["task-arithmetic", "m3id"])
def test_models_train_and_decode_on_cuda(name, tmp_path):
    if name == "m3id":
        pytest.importorskip("trl")
    with sweep_options(progress=False):
        run_experiment(name, tmp_path, device="cuda", **TINY[name])
    assert json.loads((tmp_path / name / "config.json").read_text())["config"]["device"] == "cuda"


def _floats(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _floats(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _floats(v)]
    return [float(obj)] if isinstance(obj, float) else []


def test_points_on_other_machines_have_only_the_name_checked_here(monkeypatch):
    """SLURM jobs on a cluster or a remote Dask cluster run every device computation in their points: a
    login node without a GPU accepts --device cuda (the workers check it); a bad name is still refused."""
    from layerwise.experiments._base import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParameterError, match="CUDA is not available"):
        check_device("cuda")
    for remote in (dict(executor="slurm", partition="gpu"), dict(executor="dask", scheduler="tcp://h:8786")):
        with sweep_options(**remote):
            assert check_device(" CUDA:1 ") == "cuda:1" and check_device("mps") == "mps"
            for bad in ("meta", "cpu:1", "cuda:x", "xla", 0):
                with pytest.raises(ParameterError, match="^--device must be one of cpu, cuda"):
                    check_device(bad, name="--device")
    local = (dict(executor="slurm", slurm_cluster="local"), dict(executor="dask"), dict(executor="process"))
    for here in local:
        with sweep_options(**here):
            with pytest.raises(ParameterError, match="CUDA is not available"):
                check_device("cuda")
