"""`layerwise diffeo` on hostile input: one line and exit 2 naming the cause, nothing written (issue 21);
`--model` from the current folder or a file path (issue 24)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DIFFEO_MODEL_CODE
from layerwise.cli import main
from layerwise.diffeo.io import load_model, read_image, read_images

PIL = pytest.importorskip("PIL.Image")

MODEL_CODE = DIFFEO_MODEL_CODE + '''


def nan_weights():
    m = build()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    return m


def nan_output():
    class Log(torch.nn.Module):
        def forward(self, x):
            return torch.log(x - 2.0).flatten(1)   # images in [0, 1]: log of negatives is NaN
    return Log()


def constant():
    m = build()
    with torch.no_grad():
        m[3].weight.zero_()
    return m


def broken():
    raise KeyError("no such checkpoint in my zoo")
'''


@pytest.fixture()
def work(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(MODEL_CODE)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.random((12, 3, 12, 12)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _one_line(code, err, *words):
    """Exit 2 and one error line (a progress bar may have been drawn before it), no traceback."""
    assert code == 2, err
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert errors[0].startswith("layerwise diffeo: error:") or "layerwise diffeo: error:" in errors[0]
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize(("extra", "model", "words"), [
    ([], "mynets.py:nan_weights", ["parameter '0.weight'", "NaN"]),
    ([], "mynets.py:nan_output", ["NaN or inf", "model"]),
    ([], "mynets.py:constant", ["constant"]),
    (["--T", "0"], "mynets.py:build", ["T must be > 0"]),
    (["--T", "1e-300"], "mynets.py:build", ["T_min"]),
    (["--T", "1e-300", "--allow-below-T-min"], "mynets.py:build", ["round-off"]),
    (["--n-repeats", "1000000000"], "mynets.py:build", ["would need about"]),
    (["--n-repeats", "1e9"], "mynets.py:build", ["would need about", "1000000000 repeats"]),
    (["--n-repeats", "100000", "--max-hours", "1e-6"], "mynets.py:build", ["would take about"]),
    ([], "mynets.py:broken", ["factory mynets.py:broken()", "KeyError", "no such checkpoint"]),
])
def test_stability_refuses_garbage_in_one_line(work, capsys, extra, model, words):
    out = work / "res"
    code, err = _run(capsys, "diffeo", "stability", "--model", model, "--images", "x.npy", "--out", str(out),
                     *extra)
    _one_line(code, err, *words)
    assert not out.exists()


def test_stability_refuses_bad_images_in_one_line(work, capsys):
    x = np.load(work / "x.npy")
    bad = x.copy()
    bad[2, 0, 5, 5] = np.nan
    np.save(work / "nan.npy", bad)
    np.save(work / "flat.npy", np.ones_like(x) * np.arange(12, dtype=np.float32)[:, None, None, None])
    (work / "empty.npy").write_bytes(b"")
    np.save(work / "gray.npy", x[:, :1])
    cases = [("nan.npy", ["NaN or inf", "images"]), ("flat.npy", ["constant"]), ("empty.npy", ["empty.npy"]),
             ("gray.npy", ["--model mynets:build", "1 channel(s)"])]
    for name, words in cases:
        out = work / f"res_{name}"
        code, err = _run(capsys, "diffeo", "stability", "--model", "mynets:build", "--images", name,
                         "--out", str(out))
        _one_line(code, err, *words)
        assert not out.exists()


def test_model_from_the_current_folder_and_from_a_file_path(work, capsys):
    """`mynets:build` is found in the current folder (as `python -m` would), `sub/other.py:build` by path,
    and both give the library's numbers."""
    (work / "sub").mkdir()
    (work / "sub" / "other.py").write_text(MODEL_CODE)
    rows = {}
    for spec in ("mynets:build", "sub/other.py:build", str(work / "mynets.py") + ":build"):
        out = work / f"res{len(rows)}"
        code, err = _run(capsys, "diffeo", "stability", "--model", spec, "--images", "x.npy",
                         "--out", str(out), "--c", "3")
        assert code == 0, err
        import json

        rows[spec] = json.loads((out / "stability.json").read_text())["layers"][0]["R"]
    assert len(set(rows.values())) == 1
    code, err = _run(capsys, "diffeo", "stability", "--model", "nosuchmodule:build", "--images", "x.npy",
                     "--out", str(work / "r9"))
    _one_line(code, err, "nosuchmodule", "current folder")
    (work / "syntax.py").write_text("def build(:\n")
    with pytest.raises(ValueError, match="importing your module"):
        load_model("syntax.py:build")
    with pytest.raises(ValueError, match="importing your module"):
        load_model("syntax:build")


def test_decompression_bombs_are_refused(work, monkeypatch, capsys):
    """Both of Pillow's variants: over MAX_IMAGE_PIXELS (a warning) and over twice that (an error)."""
    monkeypatch.setattr(PIL, "MAX_IMAGE_PIXELS", 1000)
    rng = np.random.default_rng(0)
    PIL.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(work / "warn.png")  # 1600 px
    PIL.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(work / "error.png")  # 3600 px
    for name in ("warn.png", "error.png"):
        with pytest.raises(ValueError, match="too large to decode safely"):
            read_image(work / name)
        code, err = _run(capsys, "diffeo", "sample", name, "--out", str(work / f"g_{name}"))
        _one_line(code, err, "too large to decode safely")
        assert not (work / f"g_{name}").exists()
    folder = work / "imgs"
    folder.mkdir()
    for k in range(2):
        (folder / f"{k}.png").write_bytes((work / "warn.png").read_bytes())
    with pytest.raises(ValueError, match="too large to decode safely"):
        read_images(folder)


@pytest.mark.parametrize(("extra", "words"), [
    (["--c", "1000000"], ["would need about", "c = 1000000"]),
    (["--c", "1e6"], ["would need about", "c = 1000000"]),
    (["--size", "1e5"], ["would need about", "100000 x 100000"]),
    (["--T-steps", "1e6"], ["--T-steps"]),
    (["--T-steps", "1000000"], ["--T-steps"]),
    (["--size", "100000"], ["would need about", "100000 x 100000"]),
    (["--c", "1"], ["--c"]),
])
def test_sample_estimates_resources_before_allocating(work, capsys, extra, words):
    rng = np.random.default_rng(0)
    PIL.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(work / "img.png")
    code, err = _run(capsys, "diffeo", "sample", "img.png", "--out", str(work / "g.png"), *extra)
    _one_line(code, err, *words)
    assert not (work / "g.png").exists()


def test_npy_reader_estimates_memory_from_the_header(work, monkeypatch):
    """A .npy whose float32 copy cannot fit is refused from its header, before reading the data."""
    from layerwise import _resources

    np.save(work / "big.npy", np.zeros((64, 3, 32, 32), dtype=np.uint8))
    monkeypatch.setattr(_resources, "available_memory", lambda device=None: 1 << 20)
    monkeypatch.setattr(_resources, "_ALWAYS_FITS", 0)
    with pytest.raises(MemoryError, match="would need about"):
        read_images(work / "big.npy")
    assert read_images(work / "x.npy", max_images=2).shape == (2, 3, 12, 12)  # small ones still read
    assert torch.is_tensor(read_images(work / "x.npy"))


def test_integer_options_take_scientific_notation_but_not_fractions(work, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["diffeo", "sample", "x.png", "--out", "g.png", "--c", "2.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "invalid integer '2.5'" in err[0]
