"""`layerwise diffeo sample|stability` end to end, the experiment on a tiny config, and the sample grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DIFFEO_MODEL_CODE
from layerwise.cli import main
from layerwise.diffeo import log_temperatures, relative_stability, sample_grid, temperature_range
from layerwise.diffeo.io import load_model, read_images
from layerwise.errors import CheckpointError, ParameterError

PIL = pytest.importorskip("PIL.Image")

MODEL_CODE = DIFFEO_MODEL_CODE


def _png(path, size=12, seed=0):
    rng = np.random.default_rng(seed)
    PIL.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "mynets.py"
    path.write_text(MODEL_CODE)
    return path


def test_sample_writes_a_grid_png(tmp_path):
    _png(tmp_path / "img.png", size=40)
    out = tmp_path / "grid.png"
    assert main(["diffeo", "sample", str(tmp_path / "img.png"), "--c", "3", "--T-steps", "4",
                 "--out", str(out)]) == 0
    with PIL.open(out) as img:
        assert img.width > 4 * img.height / 2  # 5 columns x 2 rows
    # Refuses to overwrite.
    assert main(["diffeo", "sample", str(tmp_path / "img.png"), "--out", str(out)]) == 2


def test_sample_grid_has_increasing_temperatures_and_equal_norms():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    temps = log_temperatures(32, 5, 4)
    t_min, t_max = temperature_range(32, 5)
    assert temps[0] == pytest.approx(t_min) and temps[-1] == pytest.approx(t_max)
    assert all(a < b for a, b in zip(temps, temps[1:], strict=False))
    g = sample_grid(image, 5, temps, seed=0)
    change = (g["deformed"] - image).flatten(1).norm(dim=1)
    noise = (g["noisy"] - image).flatten(1).norm(dim=1)
    assert torch.allclose(change, noise, rtol=1e-5)
    assert float(change[-1]) > float(change[0])


def test_stability_command_matches_the_library(tmp_path, model_file):
    images = np.random.default_rng(0).random((20, 3, 12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    torch.manual_seed(1)
    net = load_model(f"{model_file}:build")
    net.load_state_dict({k: torch.randn_like(v) for k, v in net.state_dict().items()})
    torch.save(net.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "res"
    assert main(["diffeo", "stability", "--model", f"{model_file}:build", "--weights", str(tmp_path / "w.pt"),
                 "--images", str(tmp_path / "x.npy"), "--out", str(out), "--layers", "output", "0",
                 "--c", "3", "--seed", "4", "--n-repeats", "2"]) == 0
    data = json.loads((out / "stability.json").read_text())
    got = {r["layer"]: r for r in data["layers"]}
    ref = relative_stability(net.eval(), torch.from_numpy(images), layers=["", "0"], c=3, seed=4, n_repeats=2,
                             progress=False)
    assert got["output"]["R"] == pytest.approx(ref[""].R, rel=1e-6)
    assert got["0"]["D"] == pytest.approx(ref["0"].D, rel=1e-6)
    assert (out / "stability.csv").exists()
    # The same weights as safetensors give the same numbers; without weights, different ones.
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    out2 = tmp_path / "res2"
    assert main(["diffeo", "stability", "--model", f"{model_file}:build", "--weights",
                 str(tmp_path / "w.safetensors"), "--images", str(tmp_path / "x.npy"), "--out", str(out2),
                 "--c", "3", "--seed", "4", "--n-repeats", "2"]) == 0
    assert json.loads((out2 / "stability.json").read_text())["layers"][0]["R"] == pytest.approx(
        ref[""].R, rel=1e-6)
    out3 = tmp_path / "res3"
    assert main(["diffeo", "stability", "--model", f"{model_file}:build", "--images", str(tmp_path / "x.npy"),
                 "--out", str(out3), "--c", "3", "--seed", "4", "--n-repeats", "2"]) == 0
    assert json.loads((out3 / "stability.json").read_text())["layers"][0]["R"] != pytest.approx(
        ref[""].R, rel=1e-3)
    # Existing results are never overwritten.
    assert main(["diffeo", "stability", "--model", f"{model_file}:build", "--images", str(tmp_path / "x.npy"),
                 "--out", str(out)]) == 2


def test_images_from_a_folder(tmp_path):
    for k in range(3):
        _png(tmp_path / f"{k}.png", seed=k)
    x = read_images(tmp_path)
    assert x.shape == (3, 3, 12, 12) and float(x.max()) <= 1.0
    assert read_images(tmp_path, size=8, grayscale=True, max_images=2).shape == (2, 1, 8, 8)
    _png(tmp_path / "odd.png", size=10)
    with pytest.raises(ValueError, match="--size"):
        read_images(tmp_path)


def test_bad_model_and_weights_are_named(tmp_path, model_file):
    with pytest.raises(ParameterError, match="--model"):
        load_model("no_colon_here")
    with pytest.raises(ParameterError, match="--model"):
        load_model(f"{model_file}:missing")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="--weights"):
        load_model(f"{model_file}:build", tmp_path / "bad.pt")
    torch.save({"other": torch.zeros(2)}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="--weights"):
        load_model(f"{model_file}:build", tmp_path / "wrong.pt")
    # An arbitrary pickled object is refused by weights_only=True.
    torch.save({"w": object()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError):
        load_model(f"{model_file}:build", tmp_path / "pickle.pt")


def test_experiment_runs_on_a_tiny_config(tmp_path):
    pytest.importorskip("sklearn")
    from layerwise.experiments import EXPERIMENTS
    from layerwise.experiments.claims import Claim, Table

    exp = EXPERIMENTS.get("diffeo-stability")
    config = exp.config("quick", nets=("fc", "lenet"), train_sizes=(32, 64), steps=5, n_probe=20, n_test=100,
                        workers=1, torch_threads=1, grid_size=24, grid_steps=2, shapes_n=200, shapes_size=16)
    summary = exp.run(config, tmp_path)
    # Five claims on each of the two image sets, judged by the same rules.
    assert len(summary["claims"]) == 10 and all(isinstance(c, Claim) for c in summary["claims"])
    assert [c.claim[:8] for c in summary["claims"]] == ["[digits]"] * 5 + ["[shapes]"] * 5
    assert [c.rule for c in summary["claims"][:5]] == [c.rule for c in summary["claims"][5:]]
    assert {c.system for c in summary["claims"]} == {"Diffeomorphism stability"}
    assert isinstance(summary["tables"][0], Table) and len(summary["tables"][0].rows) == 8
    for name in summary["figures"]:
        assert (tmp_path / name).stat().st_size > 1000
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["points"]
    assert len(rows) == 8 and all(0.2 < r["R_init"] < 5 for r in rows)
    # The in-support control: digits live in <= 64 directions of the 256 pixels, the shapes in many more.
    assert 1 <= data["support_rank"]["digits"] <= 64 < data["support_rank"]["shapes"]
    assert all(r["D"] > 0 and r["G_sup"] > 0 and r["R_sup"] > 0 for r in rows)


@pytest.mark.parametrize(("extra", "named"), [(["--device", "foo"], "device"),
                                              (["--max-images", "-1"], "max"),
                                              (["--size", "0"], "size")])
def test_stability_bad_options_are_one_line_and_write_nothing(tmp_path, model_file, capsys, extra, named):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((4, 3, 12, 12)).astype(np.float32))
    out = tmp_path / "res"
    code = main(["diffeo", "stability", "--model", f"{model_file}:build", "--images", str(tmp_path / "x.npy"),
                 "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and named in err[0] and "Traceback" not in err[0]
    assert not out.exists()
