"""The locality and deep-kernels experiments run end to end at a tiny scale and report claims, tables and
figures in the report format (the quick and full scales are checked by `layerwise reproduce`)."""

from __future__ import annotations

import json

from layerwise.experiments import EXPERIMENTS, run_experiment
from layerwise.experiments._results import read_parts
from layerwise.experiments.deep_kernels import d_eff
from layerwise.experiments.locality import predicted


def test_predictions():
    assert predicted("local", 2, "local", 4, 1, 8) == (0.25, "1/s = 1/4")
    assert predicted("local", 2, "conv", 2, 1, 8)[0] == 0.0  # plateau
    assert predicted("local", 2, "full", 0, 1, 8)[0] == 1 / 8
    assert predicted("local", 2, "local", 2, 2, 16)[0] == 1 / 4  # 2 x 2 patch
    assert d_eff((4, 4), 1) == 3 and d_eff((4, 4), 2) == 12 and d_eff((2, 2, 2), 3) == 4


def test_locality_tiny(tmp_path):
    summary = run_experiment("locality", tmp_path, "quick", P_list=(16, 32, 64), n_test=64, seeds=(0, 1),
                             torus_P_list=(16, 32, 64), torus_seeds=(0, 1))
    folder = tmp_path / "locality"
    parts = read_parts(folder)
    claims = parts.claims
    assert all(c.system == "Convolutional kernels & locality" for c in claims)
    assert len(claims) == 10  # 8 one-dimensional pairs + 1 torus + the weight-sharing claim
    assert claims[0].paper_value.startswith("0.500") and "95% CI" in claims[0].measured
    assert all("theory's prediction" in c.paper_value and "paper measured" not in c.paper_value
               for c in claims)
    assert [t.name for t in parts.tables] == ["locality_exponents"]
    assert set(parts.figures) == {"learning_curves.png"}
    for name in ("learning_curves.png", "curves.csv", "results.json"):
        assert (folder / name).exists()
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["beta[local t=2 -> local s=2]"] == summary["beta[local t=2 -> local s=2]"]


def test_deep_kernels_tiny(tmp_path):
    run_experiment("deep-kernels", tmp_path, "quick", n_spectrum=256, P_list=(16, 32, 64, 128), n_test=64,
                   seeds=(0, 1))
    parts = read_parts(tmp_path / "deep-kernels")
    # 2 asymptotic rates + 2 finite-P spectral-theory comparisons (P <= 256/4) + adaptivity
    assert [c.system for c in parts.claims] == ["Deep hierarchical CNN kernels"] * 5
    assert all("theory's prediction" in c.paper_value for c in parts.claims)
    rows = json.loads((tmp_path / "deep-kernels" / "results.json").read_text())["rows"]
    for row in rows:
        assert row["theory_n_valid"] == 3 and len(row["theory_mse"]) == 4
        # the prediction starts near the teacher's variance and decreases with P
        assert row["theory_mse"][0] > row["theory_mse"][2] > 0
    assert {t.name for t in parts.tables} == {"deep_kernels_rates", "deep_kernels_spectra"}
    assert (tmp_path / "deep-kernels" / "spectra_and_curves.png").exists()
    assert "full" in EXPERIMENTS.get("deep-kernels").scales


def test_verdict_exponent_rule_scales_with_the_prediction():
    from layerwise.experiments.claims import verdict_exponent

    # The case: 0.200 against 1/8 is 60% off and its interval misses 1/8.
    assert verdict_exponent(0.200, 0.125, 0.187, 0.211) == "not reproduced"
    assert verdict_exponent(0.200, 0.125, 0.110, 0.290) == "reproduced"  # interval covers
    assert verdict_exponent(0.145, 0.125, 0.140, 0.150) == "reproduced"  # 16% off
    assert verdict_exponent(0.160, 0.125, 0.150, 0.170) == "partly"  # 28% off
    assert verdict_exponent(0.60, 0.50, 0.55, 0.65) == "reproduced"  # 20% of 0.5 = 0.1
    assert verdict_exponent(0.71, 0.50, 0.70, 0.72) == "not reproduced"  # 42% off
    assert verdict_exponent(float("nan"), 0.5, 0.0, 1.0) == "not reproduced"


def test_grids_run_on_the_sweep_executors_with_identical_numbers(tmp_path):
    # Both experiments run their seeds as sweep points: a process pool gives the in-process numbers, and
    # a resumed run reads the finished points back (same numbers, nothing recomputed).
    from layerwise.sweep import sweep_options

    small = {"locality": dict(P_list=(16, 32), n_test=32, seeds=(0, 1), torus=0,
                              students=(("local", 2), ("full", 0))),
             "deep-kernels": dict(n_spectrum=64, P_list=(16, 32), n_test=32, seeds=(0, 1),
                                  spectrum_shapes=((4, 4),))}
    for name, kw in small.items():
        rows = {}
        for executor in ("inprocess", "process"):
            with sweep_options(executor=executor, max_workers=2, progress=False,
                               store=str(tmp_path / f"store-{executor}")):
                run_experiment(name, tmp_path / executor, "quick", **kw)
            rows[executor] = json.loads((tmp_path / executor / name / "results.json").read_text())["rows"]
        assert [r["mse"] for r in rows["inprocess"]] == [r["mse"] for r in rows["process"]]
        points = sorted((tmp_path / "store-process").glob(f"{name}*/*.json"))
        assert len(points) == 2  # one file per seed
        stamp = [p.stat().st_mtime_ns for p in points]
        with sweep_options(resume=True, progress=False, store=str(tmp_path / "store-process")):
            run_experiment(name, tmp_path / "resumed", "quick", **kw)
        assert [p.stat().st_mtime_ns for p in points] == stamp
        resumed = json.loads((tmp_path / "resumed" / name / "results.json").read_text())["rows"]
        assert [r["mse"] for r in resumed] == [r["mse"] for r in rows["inprocess"]]
