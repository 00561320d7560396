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
    assert "--device must be one of cpu, cuda" in capsys.readouterr().err


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


@pytest.mark.parametrize("args", [["--kind", "full"], ["--kind", "full", "--base", "ntk_relu"],
                                  ["--kind", "local", "--s", "2"], ["--kind", "conv", "--s", "2",
                                                                     "--base", "nngp_relu"],
                                  ["--kind", "hierarchical", "--filters", "4,4"]])
def test_gram_of_huge_finite_inputs_is_an_error_naming_the_cause(tmp_path, capsys, args):
    # 1e300 is finite, but its square overflows float64: the Gram matrix used to be all NaN, exit 0.
    X = np.full((4, 16), 1e300)
    X[1] *= -1
    np.save(tmp_path / "X.npy", X)
    out = tmp_path / "K.npy"
    assert main(["kernels", "gram", *args, "--data", str(tmp_path / "X.npy"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "too large" in err and "1e+300" in err and "rescale" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_gram_refuses_a_matrix_that_cannot_fit_with_the_estimate(tmp_path, capsys, monkeypatch):
    # 200000 points: the float64 Gram matrix alone is 200000^2 * 8 B = 320 GB. Memory is faked small so
    # that the test does not depend on the machine.
    import layerwise._resources as resources

    monkeypatch.setattr(resources, "available_memory", lambda device=None: 8 * 10**9)
    np.save(tmp_path / "X.npy", np.zeros((200000, 2)))
    out = tmp_path / "K.npy"
    assert main(["kernels", "gram", "--kind", "full", "--data", str(tmp_path / "X.npy"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "320 GB" in err and "200000 x 200000" in err and not out.exists()


@pytest.mark.parametrize("change", ["P: [8, 16, 10000000]", "n_test: 100000000"])
def test_curve_refuses_sizes_that_cannot_fit(tmp_path, capsys, change, monkeypatch):
    import layerwise._resources as resources

    monkeypatch.setattr(resources, "available_memory", lambda device=None: 64 * 10**9)
    key = change.split(":")[0]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("\n".join(change if line.startswith(f"{key}:") else line for line in CONFIG.splitlines()))
    assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "learning curve with max(P)" in err and " PB" in err  # 2.4 PB and 240 PB
    assert not (tmp_path / "o").exists()


def test_curve_refuses_a_seed_loop_over_the_time_limit(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    seeds = ", ".join(str(s) for s in range(100000))
    # max_seeds raised: the time estimate after the first seed is what refuses here
    cfg.write_text(CONFIG.replace("seeds: [0, 1]", f"seeds: [{seeds}]") + "max_hours: 0.0001\n"
                   "max_seeds: 100000\n")
    assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "100000 seeds would take about" in err and "max_hours" in err
    # The same limit lets a short run through.
    cfg.write_text(CONFIG + "max_hours: 0.0001\n")
    assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "o")]) == 0
    cfg.write_text(CONFIG + "max_hours: -1\n")
    assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "p")]) == 2
    assert "max_hours" in capsys.readouterr().err


def test_curve_refuses_too_many_seeds_before_any_work(tmp_path, capsys):
    # 100000 seeds of a tiny curve take minutes, well under max_hours (24): the seed cap refuses them at
    # once, with the size of the run (100000 seeds x 3 sizes x 2 pairs = 600000 regressions)
    import time

    cfg = tmp_path / "c.yaml"
    seeds = ", ".join(str(s) for s in range(100000))
    cfg.write_text(CONFIG.replace("seeds: [0, 1]", f"seeds: [{seeds}]"))
    start = time.perf_counter()
    assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "o")]) == 2
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert "seeds has 100000 entries, over the cap of 10000" in err and "6e+05 regressions" in err
    assert "max_seeds" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert elapsed < 60  # the YAML parse of 100000 numbers dominates; no seed runs
    cfg.write_text(CONFIG + "max_seeds: 1\n")  # the config key sets the cap
    assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "seeds has 2 entries, over the cap of 1" in capsys.readouterr().err
    for bad in ("0", "1.5", "true"):
        cfg.write_text(CONFIG + f"max_seeds: {bad}\n")
        assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "o")]) == 2
        assert "config key 'max_seeds' must be an integer >= 1" in capsys.readouterr().err


_CHILD = """
import signal, sys
# A shell that starts jobs in the background makes them ignore SIGINT; restore Ctrl-C's behaviour.
signal.signal(signal.SIGINT, signal.default_int_handler)
from layerwise.cli import main
sys.exit(main(["kernels", "curve", {cfg!r}, "--out", {out!r}]))
"""

SLOW_CONFIG = CONFIG.replace("P: [8, 16, 32]", "P: [32, 64, 128, 256]").replace("n_test: 32", "n_test: 256") \
    .replace("seeds: [0, 1]", "seeds: [" + ", ".join(str(s) for s in range(400)) + "]")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupted_curve_leaves_nothing_that_looks_finished_and_reruns_identically(tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg, out = tmp_path / "c.yaml", tmp_path / "run"
    cfg.write_text(SLOW_CONFIG)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(cfg=str(cfg), out=str(out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "learning curve" not in seen and proc.poll() is None:  # the progress bar: seeds are running
            seen += proc.stderr.read(1)
        assert proc.poll() is None, f"finished before the interrupt: {seen!r}"
        time.sleep(0.5)
        os.kill(proc.pid, getattr(signal, sig))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if sig == "SIGINT" else -signal.SIGKILL)
    # Nothing under the output name: only (for SIGKILL, possibly) a hidden temporary folder.
    assert not out.exists()
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p.name not in {"c.yaml"})
    # The rerun succeeds into the same folder and gives the numbers of an uninterrupted run.
    short = tmp_path / "short.yaml"
    short.write_text(SLOW_CONFIG.replace("seeds: [" + ", ".join(str(s) for s in range(400)) + "]",
                                         "seeds: [0, 1, 2]"))
    assert main(["kernels", "curve", str(short), "--out", str(out)]) == 0
    assert main(["kernels", "curve", str(short), "--out", str(tmp_path / "fresh")]) == 0
    assert (out / "curves.csv").read_text() == (tmp_path / "fresh" / "curves.csv").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))]
