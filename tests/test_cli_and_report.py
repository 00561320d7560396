"""The `layerwise` command, the experiment runner, the HTML report and atomic outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerwise import _io
from layerwise._io import is_temporary_name
from layerwise._registry import Registry
from layerwise.cli import COMMAND_MODULES, main
from layerwise.experiments import EXPERIMENTS, run_experiment
from layerwise.hierarchy import load_dataset


def test_help_lists_every_job(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMAND_MODULES:
        assert name in out or name.replace("_", "-") in out  # (module merge_data: command merge-data)


def test_python_dash_m_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "layerwise", "reproduce", "--list"], capture_output=True, text=True
    )
    assert res.returncode == 0
    for name in EXPERIMENTS.names():
        assert name in res.stdout


@pytest.mark.parametrize("fmt", ["pt", "npz"])
def test_rhm_sample_writes_a_loadable_file(tmp_path, fmt):
    out = tmp_path / f"data.{fmt}"
    assert main(["rhm", "sample", "--v", "8", "--m", "2", "--L", "3", "--n", "50", "--out", str(out)]) == 0
    rhm, data = load_dataset(out)
    assert (rhm.v, rhm.n_c, rhm.m, rhm.L, len(data)) == (8, 8, 2, 3, 50)


def test_rhm_sample_bad_input_is_one_clear_line(tmp_path, capsys):
    code = main(
        ["rhm", "sample", "--v", "4", "--m", "5", "--L", "2", "--n", "3", "--out", str(tmp_path / "x.pt")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "must be <= v**s" in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


def test_reproduce_writes_results_figures_and_report(tmp_path):
    assert main(["reproduce", "rhm-stats", "--scale", "quick", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "rhm-stats"
    for name in ("config.json", "summary.json", "results.json", "fluctuations.csv", "fluctuations.png"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["all_data_distinct"] is True
    assert summary["max_enumeration_vs_exact_error"] < 1e-12
    assert summary["fitted_exponent_sigma_vs_mL"] == pytest.approx(-0.5, abs=0.05)
    html = (tmp_path / "report.html").read_text()
    assert "rhm-stats" in html and "data:image/png;base64," in html
    # no temporary folders left; .sweeps keeps the finished sweep points for --resume (documented)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".sweeps"]
    assert not [p for p in tmp_path.rglob("*") if is_temporary_name(p.name) or p.suffix == ".tmp"]


def test_reproduce_unknown_name_fails_before_running(tmp_path, capsys):
    assert main(["reproduce", "no-such-exp", "--out", str(tmp_path)]) == 2
    assert "unknown experiment 'no-such-exp'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_interrupted_experiment_leaves_previous_results(tmp_path, monkeypatch):
    run_experiment("rhm-stats", tmp_path)
    before = (tmp_path / "rhm-stats" / "summary.json").read_text()
    exp = EXPERIMENTS.get("rhm-stats")

    def boom(config, out):
        (out / "partial.csv").write_text("half")
        raise KeyboardInterrupt

    broken = type(exp)(name=exp.name, run=boom, scales=exp.scales, description=exp.description)
    monkeypatch.setitem(EXPERIMENTS._items, "rhm-stats", broken)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("rhm-stats", tmp_path)
    assert (tmp_path / "rhm-stats" / "summary.json").read_text() == before
    assert not (tmp_path / "rhm-stats" / "partial.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["rhm-stats"]


def test_config_overrides_are_validated():
    exp = EXPERIMENTS.get("rhm-stats")
    assert exp.config("quick", n_seeds=1).n_seeds == 1
    with pytest.raises(ValueError, match="unknown config field"):
        exp.config("quick", not_a_field=1)
    with pytest.raises(ValueError, match="scale must be one of"):
        exp.config("huge")


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "a.json"
    _io.write_json(target, {"x": 1})
    with pytest.raises(RuntimeError), _io.atomic_path(target) as tmp:
        tmp.write_text("garbage")
        raise RuntimeError
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_json_conversion_of_tensors_big_ints_and_nan():
    import torch

    text = json.dumps(_io.to_jsonable({"t": torch.tensor([1.5, float("nan")]), "big": 8**511}))
    back = json.loads(text)
    assert back["t"] == [1.5, None] and back["big"] == 8**511


def test_registry_refuses_duplicates_and_lists_valid_names():
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    with pytest.raises(ValueError, match="valid names: a"):
        reg.get("b")
    assert reg.unregister("a") == 1 and "a" not in reg


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = _io.write_json(tmp_path / "x.json", {})
        with _io.atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "a.txt").write_text("a")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
