"""``layerwise reproduce rhm-learning`` interrupted by SIGINT (Ctrl-C) and by SIGKILL: no partial file looks
finished, and the rerun with ``--resume`` succeeds, reuses the finished trainings and gives the numbers of an
uninterrupted run (the real CLI in a child process, on a tiny config put in place of the quick scale)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# 7 trainings (4 deep CNN, 3 shallow), each a fraction of a second
TINY = dict(settings=((8, 2, 3), (16, 2, 3)), p_ratios=(1.0, 4.0), width=16, epochs=40, n_test=128,
            n_sensitivity=64, shallow_extra_ratios=(8.0,), correlation_repeats=2)
N_POINTS = 7

_CHILD = textwrap.dedent("""
    import signal, sys
    # Ctrl-C as a terminal delivers it (a background job started by a shell ignores SIGINT otherwise)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from layerwise.experiments import EXPERIMENTS
    exp = EXPERIMENTS.get("rhm-learning")
    exp.scales["quick"] = exp.config("quick", **{tiny!r})
    from layerwise.cli import main
    sys.exit(main(["reproduce", "rhm-learning", "--out", {out!r}, *{flags!r}]))
""")


def _reproduce(out: Path, *flags: str) -> subprocess.Popen:
    script = _CHILD.format(tiny=TINY, out=str(out), flags=list(flags))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)


def _finished(store: Path) -> list[Path]:
    return sorted(p for p in store.glob("*.json") if not p.name.startswith("."))


def _outputs(out: Path) -> dict[str, list[dict[str, str]]]:
    """The experiment's tables of numbers, without the measured training times."""
    tables = {}
    for name in ("points.csv", "curves.csv", "p_star.csv"):
        with open(out / "rhm-learning" / name, newline="", encoding="utf-8") as fh:
            rows = csv.DictReader(fh)
            tables[name] = [{k: v for k, v in row.items() if k != "train_seconds"} for row in rows]
    assert tables["points.csv"] and "test_error" in tables["points.csv"][0]
    return tables


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = _reproduce(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return _outputs(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_reproduce_resumes_to_the_same_numbers(tmp_path, reference, sig):
    out = tmp_path / "res"
    store = out / ".sweeps" / "rhm-learning"
    proc = _reproduce(out)
    deadline = time.time() + 300
    try:
        while len(_finished(store)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()}"
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert "Traceback" not in err  # one line, not a traceback
    # Nothing looks finished that is not: no experiment folder, no report, every point file complete.
    assert not (out / "rhm-learning").exists() and not (out / "report.html").exists()
    finished = _finished(store)
    assert 2 <= len(finished) < N_POINTS
    for path in finished:
        data = json.loads(path.read_text())
        assert data["format"] == "layerwise-sweep-point/1" and data["key"] == path.stem and "result" in data
    assert all(p.name.startswith(".") for p in store.iterdir() if p not in finished)  # temporary files
    # The rerun resumes: only the missing trainings run, and the numbers are those of an uninterrupted run.
    rerun = _reproduce(out, "--resume")
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    summary = json.loads((out / "rhm-learning" / "summary.json").read_text())
    assert summary["n_resumed"] == len(finished) and summary["n_points"] == N_POINTS
    assert _outputs(out) == reference
