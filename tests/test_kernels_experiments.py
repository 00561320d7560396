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
    assert [t.name for t in parts.tables] == ["locality_exponents"]
    assert set(parts.figures) == {"learning_curves.png"}
    for name in ("learning_curves.png", "curves.csv", "results.json"):
        assert (folder / name).exists()
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["beta[local t=2 -> local s=2]"] == summary["beta[local t=2 -> local s=2]"]


def test_deep_kernels_tiny(tmp_path):
    run_experiment("deep-kernels", tmp_path, "quick", n_spectrum=96, P_list=(16, 32, 64), n_test=64,
                   seeds=(0, 1))
    parts = read_parts(tmp_path / "deep-kernels")
    assert [c.system for c in parts.claims] == ["Deep hierarchical CNN kernels"] * 3
    assert {t.name for t in parts.tables} == {"deep_kernels_rates", "deep_kernels_spectra"}
    assert (tmp_path / "deep-kernels" / "spectra_and_curves.png").exists()
    assert "full" in EXPERIMENTS.get("deep-kernels").scales
