"""The procedural shape world: seeded, balanced, and its classes survive smooth deformations (counted by
connected components of the thresholded picture); the experiment's image-folder input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerwise.diffeo import (
    PROCEDURAL_CLASSES,
    deform,
    procedural_shapes,
    sample_fields,
    temperature_range,
)
from layerwise.errors import ParameterError

ndimage = pytest.importorskip("scipy.ndimage")

# (foreground components, background components) of each class: a ring has one hole, blobs are separate.
TOPOLOGY = {"disk": (1, 1), "ring": (1, 2), "two blobs": (2, 1), "three blobs": (3, 1), "bar": (1, 1),
            "cross": (1, 1)}


def _topology(img: torch.Tensor) -> tuple[int, int]:
    """Connected components (4-connectivity, >= 6 pixels) above and below 0.5."""
    mask = img[0].numpy() > 0.5

    def count(m):
        labels, _ = ndimage.label(m)
        return int((np.bincount(labels.ravel())[1:] >= 6).sum())

    return count(mask), count(~mask)


def test_seeded_balanced_and_in_range():
    x, y = procedural_shapes(60, 32, seed=3)
    x2, y2 = procedural_shapes(60, 32, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, procedural_shapes(60, 32, seed=4)[0])
    assert x.shape == (60, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.bincount(y, minlength=6).tolist() == [10] * 6
    rgb, _ = procedural_shapes(6, 16, seed=0, channels=3)
    assert rgb.shape == (6, 3, 16, 16)
    with pytest.raises(ParameterError, match="channels"):
        procedural_shapes(6, 16, channels=2)
    with pytest.raises(ParameterError, match="size"):
        procedural_shapes(6, 4)


def test_images_fill_every_pixel_direction():
    """Unlike upscaled digits (rank <= 64), the procedural images span all 1024 pixel directions."""
    x, _ = procedural_shapes(1200, 32, seed=0)
    flat = x.flatten(1).double()
    s = torch.linalg.svdvals(flat - flat.mean(0))
    assert int((s > s[0] * 1e-6).sum()) == 1024


def test_classes_are_the_topology_of_the_picture_and_survive_diffeos():
    """>= 95% of the pictures show their class's topology (components of the shape and of its background);
    a diffeo at T_max / 5 (c = 3) keeps the topology of >= 97% of them."""
    x, y = procedural_shapes(300, 32, seed=1)
    clean = [_topology(img) for img in x]
    match = np.mean([t == TOPOLOGY[PROCEDURAL_CLASSES[int(label)]]
                     for t, label in zip(clean, y, strict=True)])
    assert match >= 0.95, match
    _, t_max = temperature_range(32, 3)
    xd = deform(x, sample_fields(300, 32, 32, 3, t_max / 5, seed=0))
    kept = np.mean([_topology(a) == b for a, b in zip(xd, clean, strict=True)])
    assert kept >= 0.97, kept


def test_experiment_takes_an_image_folder(tmp_path):
    """A labelled folder (root/<class>/*.png) replaces the built-in sets: the claims are tagged [folder] and
    the points come from its images."""
    pytest.importorskip("sklearn")
    PIL = pytest.importorskip("PIL.Image")
    from layerwise.experiments import EXPERIMENTS

    x, y = procedural_shapes(72, 16, seed=0, channels=3)
    root = tmp_path / "imgs"
    for k, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = root / f"class_{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        PIL.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{k}.png")
    exp = EXPERIMENTS.get("diffeo-stability")
    config = exp.config("quick", nets=("fc", "lenet"), train_sizes=(16, 32), steps=3, n_probe=10, n_test=20,
                        workers=1, torch_threads=1, grid_size=24, grid_steps=2, image_folder=str(root),
                        folder_size=16)
    out = tmp_path / "out"
    out.mkdir()
    summary = exp.run(config, out)
    assert len(summary["claims"]) == 5 and all(c.claim.startswith("[folder]") for c in summary["claims"])
    rows = json.loads((out / "results.json").read_text())["points"]
    assert len(rows) == 4 and {r["dataset"] for r in rows} == {"folder"}
    assert all(r["R_sup"] > 0 and r["G_sup"] > 0 for r in rows)


def test_cli_experiment_passes_every_option(tmp_path, monkeypatch, capsys):
    """`layerwise diffeo experiment` hands the folder and each option to the diffeo-stability experiment."""
    import layerwise.experiments as experiments
    from layerwise.cli import main

    calls = []

    def fake(name, out, scale, **kw):
        calls.append((name, out, scale, kw))
        return {"runtime_s": 1}

    monkeypatch.setattr(experiments, "run_experiment", fake)
    (tmp_path / "imgs").mkdir()
    assert main(["diffeo", "experiment", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"),
                 "--scale", "full", "--size", "24", "--grayscale", "--max-per-class", "50",
                 "--train-sizes", "16", "1e2"]) == 0
    name, out, scale, kw = calls[0]
    assert (name, out, scale) == ("diffeo-stability", str(tmp_path / "o"), "full")
    assert kw == {"image_folder": str(tmp_path / "imgs"), "folder_size": 24, "folder_grayscale": True,
                  "folder_max_per_class": 50, "train_sizes": (16, 100), "device": "cpu"}
    assert main(["diffeo", "experiment", "--images", str(tmp_path / "imgs"), "--out", "o2",
                 "--device", "CPU:0"]) == 0
    assert calls[1][3] == {"image_folder": str(tmp_path / "imgs"), "folder_size": 32,
                           "folder_grayscale": False, "folder_max_per_class": None, "device": "cpu:0"}
    assert calls[1][2] == "quick"
    capsys.readouterr()
    assert main(["diffeo", "experiment", "--images", str(tmp_path / "imgs"), "--out", "o3",
                 "--device", "meta"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device must be one of cpu, cuda" in err, err
    assert len(calls) == 2
    assert main(["diffeo", "experiment", "--images", str(tmp_path / "nope"), "--out", "o3"]) == 2
    assert main(["diffeo", "experiment", "--images", str(tmp_path / "imgs"), "--out", "o3",
                 "--size", "30"]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "divisible by 4" in err


def test_experiment_refuses_training_sizes_larger_than_the_folder(tmp_path):
    pytest.importorskip("sklearn")
    PIL = pytest.importorskip("PIL.Image")
    from layerwise.experiments import EXPERIMENTS

    x, y = procedural_shapes(40, 16, seed=0)
    for k, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = tmp_path / "imgs" / f"c{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        PIL.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{k}.png")
    exp = EXPERIMENTS.get("diffeo-stability")
    config = exp.config("quick", image_folder=str(tmp_path / "imgs"), folder_size=16, n_test=10, n_probe=10,
                        train_sizes=(20, 64), workers=1)
    with pytest.raises(ParameterError, match="train_sizes"):
        exp.run(config, tmp_path)
