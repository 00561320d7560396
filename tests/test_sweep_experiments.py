"""phase-transition, chunks, rhm-stats and diffeo-stability run their grids on the sweep runner: a spawn
process pool gives exactly the in-process numbers (results.json compared with ==), and a resumed run reads
every point back instead of recomputing it and gives the same numbers."""

from __future__ import annotations

import json
import math

import pytest

from layerwise.experiments import run_experiment
from layerwise.sweep import sweep_options

TINY = {
    "phase-transition": dict(depths=(2, 3), eps_levels=(0.0, 0.6, 0.75), n_data=24, process_depth=3,
                             process_levels=(0.0, 0.5), bp_check_instances=()),
    # threads=2: a point may ask for more torch threads than the sweep's; every executor honours it
    "chunks": dict(depths=(2, 3), eps_levels=(0.4, 0.7), n_x0=6, n_traj=4, mask_levels=(0.2, 0.5), threads=2),
    "rhm-stats": dict(vs=(8,), ms=(2, 4), Ls=(2, 3), n_seeds=2, enumerate_instances=((4, 4, 2, 2, 2),)),
    "diffeo-stability": dict(nets=("fc", "lenet"), train_sizes=(32, 64), steps=5, n_probe=20, n_test=100,
                             workers=1, grid_size=24, grid_steps=2, shapes_n=600, shapes_size=32),
}


def _numbers(path):
    """results.json with NaN (stored as null) made comparable."""
    def fix(x):
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return "nan" if isinstance(x, float) and math.isnan(x) else x
    return fix(json.loads(path.read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_process_pool_and_resume_give_the_inprocess_numbers(tmp_path, name):
    if name == "diffeo-stability":
        pytest.importorskip("sklearn")
    import torch

    results = {}
    before = torch.get_num_threads()
    for executor, caller_threads in (("inprocess", 2), ("process", 1)):
        # the caller's own thread setting must not leak into the numbers
        torch.set_num_threads(caller_threads)
        try:
            with sweep_options(executor=executor, max_workers=2, progress=False,
                               store=str(tmp_path / executor)):
                run_experiment(name, tmp_path / f"out-{executor}", **TINY[name])
        finally:
            torch.set_num_threads(before)
        results[executor] = _numbers(tmp_path / f"out-{executor}" / name / "results.json")
    assert results["process"] == results["inprocess"]
    points = sorted((tmp_path / "process" / name).glob("*.json"))
    assert points, "the experiment kept no sweep points in the store"
    stamps = {p.name: p.stat().st_mtime_ns for p in points}
    with sweep_options(executor="process", max_workers=2, resume=True, progress=False,
                       store=str(tmp_path / "process")):
        run_experiment(name, tmp_path / "out-resumed", **TINY[name])
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "process" / name).glob("*.json")} == stamps
    assert _numbers(tmp_path / "out-resumed" / name / "results.json") == results["inprocess"]


def test_diffeo_default_pool_only_replaces_the_inprocess_executor(monkeypatch, tmp_path):
    """diffeo-stability's ``workers`` turns the default in-process executor into a pool of that size; an
    executor chosen on the command line (here dask) is used as given."""
    import layerwise.experiments.diffeo_stability as ds

    seen = []

    def fake_sweep(fn, points, folder, opts):
        seen.append((opts.executor, opts.max_workers))
        raise RuntimeError("stop")

    monkeypatch.setattr(ds, "run_sweep", fake_sweep)
    config = ds.Config(workers=3)
    for executor, want in (("inprocess", ("process", 3)), ("dask", ("dask", None))):
        with sweep_options(executor=executor), pytest.raises(RuntimeError, match="stop"):
            ds._run_points(config, ("digits",), tmp_path)
        assert seen[-1] == want
    with sweep_options(executor="inprocess"), pytest.raises(RuntimeError, match="stop"):
        ds._run_points(ds.Config(workers=1), ("digits",), tmp_path)
    assert seen[-1] == ("inprocess", None)


def test_diffeo_sizes_are_checked_without_loading_the_images():
    """run() checks the sizes from the set's known image count (the points load the images)."""
    pytest.importorskip("sklearn")
    import layerwise.experiments.diffeo_stability as ds
    from layerwise.errors import ParameterError

    assert len(ds.load_digits(8)[0]) == ds._DIGITS_N
    config = ds.Config(shapes_n=300, n_test=100)
    assert [ds._n_images(name, config) for name in ("digits", "shapes")] == [1797, 300]
    with pytest.raises(ParameterError, match="shapes set has 200 training images"):
        ds.run(ds.Config(datasets=("shapes",), shapes_n=300, n_test=100, train_sizes=(32, 201)), None)
    with pytest.raises(ParameterError, match="not more than n_test"):
        ds.run(ds.Config(datasets=("shapes",), shapes_n=100, n_test=100), None)


def test_points_run_with_the_threads_of_their_config(monkeypatch):
    """chunks' ``threads`` and diffeo-stability's ``torch_threads`` set the torch threads inside each point
    (whatever the sweep's), and the caller's setting is restored afterwards."""
    import torch

    import layerwise.experiments._bp_levels as bp_levels
    import layerwise.experiments.diffeo_stability as ds

    seen = []

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop")

    monkeypatch.setattr(bp_levels, "forward_backward", spy)
    monkeypatch.setattr(ds, "_task", spy)
    before = torch.get_num_threads()
    config = {"v": 4, "n_c": 4, "m": 2, "s": 2, "L": 2, "rules_seed": 0, "process": "eps", "level": 0.5,
              "n_data": 4, "n_traj": 2, "float32": False}
    study = {"image_size": 8, "n_test": 100, "shapes_n": 200, "shapes_size": 16}
    monkeypatch.setattr(ds, "_dataset", lambda name, cfg: {})
    for threads in (1, 3):
        with pytest.raises(RuntimeError, match="stop"):
            bp_levels.level_point({**config, "threads": threads}, 0)
        with pytest.raises(RuntimeError, match="stop"):
            ds.train_point({"dataset": "shapes", "net": "fc", "threads": threads, "study": study}, 0)
        assert seen[-2:] == [threads, threads] and torch.get_num_threads() == before
