"""``layerwise kernels gram`` and ``layerwise kernels curve``: outputs equal the library's, options reach the
library, bad input is one line naming the parameter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerwise.cli import main
from layerwise.kernels import conv_kernel, hierarchical_kernel, local_kernel


@pytest.fixture
def data(tmp_path):
    X = np.random.default_rng(0).random((12, 16))
    path = tmp_path / "X.npy"
    np.save(path, X)
    return path, torch.from_numpy(X)


def test_gram_hierarchical_equals_library(data, tmp_path):
    path, X = data
    out = tmp_path / "K.npy"
    assert main(["kernels", "gram", "--kind", "hierarchical", "--filters", "4,4", "--data", str(path),
                 "--out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), hierarchical_kernel(X, None, (4, 4)).numpy(), rtol=1e-14)
    out2 = tmp_path / "K2.npy"
    assert main(["kernels", "gram", "--kind", "hierarchical", "--filters", "4,4", "--network-kernel", "nngp",
                 "--data", str(path), "--out", str(out2)]) == 0
    ref = hierarchical_kernel(X, None, (4, 4), "nngp").numpy()
    np.testing.assert_allclose(np.load(out2), ref, rtol=1e-14)


def test_gram_local_conv_options(data, tmp_path):
    path, X = data
    Y = X[:5].numpy()
    np.save(tmp_path / "Y.npy", Y)
    out = tmp_path / "K.npy"
    assert main(["kernels", "gram", "--kind", "conv", "--s", "3", "--base", "laplace", "--sigma", "2.5",
                 "--data", str(path), "--data2", str(tmp_path / "Y.npy"), "--out", str(out),
                 "--block-size", "4"]) == 0
    ref = conv_kernel(X, X[:5], 3, "laplace", sigma=2.5).numpy()
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-13)
    out32 = tmp_path / "K32.npy"
    assert main(["kernels", "gram", "--kind", "local", "--s", "2", "--base", "ntk_relu", "--dtype", "float32",
                 "--data", str(path), "--out", str(out32)]) == 0
    K32 = np.load(out32)
    assert K32.dtype == np.float32
    # the option reaches the library: same numbers as the library's float32 computation
    np.testing.assert_array_equal(K32, local_kernel(X, None, 2, "ntk_relu", dtype=torch.float32).numpy())


def test_gram_on_tori(tmp_path):
    T = np.random.default_rng(1).random((7, 4, 5))
    np.save(tmp_path / "T.npy", T)
    out = tmp_path / "K.npy"
    assert main(["kernels", "gram", "--kind", "local", "--s", "2", "--dims", "2",
                 "--data", str(tmp_path / "T.npy"), "--out", str(out)]) == 0
    ref = local_kernel(torch.from_numpy(T), None, 2, dims=2).numpy()
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-14)


def test_gram_refuses_to_overwrite_and_names_bad_parameters(data, tmp_path, capsys):
    path, _ = data
    out = tmp_path / "K.npy"
    out.write_text("precious")
    assert main(["kernels", "gram", "--kind", "full", "--data", str(path), "--out", str(out)]) == 2
    assert out.read_text() == "precious"
    assert "exists" in capsys.readouterr().err
    new = str(tmp_path / "new.npy")
    assert main(["kernels", "gram", "--kind", "hierarchical", "--filters", "5", "--data", str(path),
                 "--out", new]) == 2
    assert "filters" in capsys.readouterr().err
    assert main(["kernels", "gram", "--kind", "local", "--data", str(path), "--out", new]) == 2
    assert "--s is required" in capsys.readouterr().err
    assert main(["kernels", "gram", "--kind", "local", "--s", "2", "--base", "rbf", "--data", str(path),
                 "--out", new]) == 2
    assert "base must be one of" in capsys.readouterr().err
    assert main(["kernels", "gram", "--kind", "full", "--device", "bogus", "--data", str(path),
                 "--out", new]) == 2
    assert "device must be a usable torch device" in capsys.readouterr().err


CONFIG = """
input: {type: hypercube, shape: [6]}
teachers:
  local_t2: {type: local, s: 2, sigma: 2.0}
students:
  local_s2: {type: local, s: 2, sigma: 2.0}
  full: {type: full, sigma: 6.0}
P: [8, 16, 32]
n_test: 32
seeds: [0, 1]
"""


def test_curve_writes_results(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    assert main(["kernels", "curve", str(cfg), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"curves.csv", "exponents.csv", "learning_curves.png", "config.json"} <= names
    assert json.loads((out / "config.json").read_text())["P"] == [8, 16, 32]
    lines = (out / "curves.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 2 * 3 * 2  # header + students x P x seeds
    # a second run into the same folder needs --overwrite
    assert main(["kernels", "curve", str(cfg), "--out", str(out)]) == 2
    assert main(["kernels", "curve", str(cfg), "--out", str(out), "--overwrite"]) == 0


def test_curve_config_errors_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("n_test: 32", "n_tests: 32"))
    assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "n_tests" in capsys.readouterr().err
    cfg.write_text(CONFIG.replace("s: 2, sigma: 2.0}\nstudents", "s: 9, sigma: 2.0}\nstudents"))
    assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "s must be" in capsys.readouterr().err
