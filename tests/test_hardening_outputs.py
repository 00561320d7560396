"""Issue 21, items 1, 2, 5 and 7 (report, output folders, .npy/YAML/image readers, missing local paths).

Each test starts from a reproduction of the issue: before the fix the report embedded any file, replaced a
user's report.html, accepted an edited output of the same size, gave a traceback for an empty .npy, a deep
YAML or a decompression bomb, and sent a missing local folder to the hub.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from layerwise._io import OUTPUT_MARKER, atomic_directory, check_output_dir, read_npy, read_yaml
from layerwise.cli import main
from layerwise.errors import ConfigError, InputDataError, OutputPathError
from layerwise.report import build_report, check_report_target


def _png(path: Path, width: int = 3, height: int = 2, tail: bytes = b"") -> bytes:
    """A valid RGB PNG written by hand (``tail`` is appended after IEND, as a marker to look for)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes([10, 200, 30] * width) for _ in range(height))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"") + tail)
    path.write_bytes(data)
    return data


def _bomb(path: Path, width: int, height: int) -> None:
    """A tiny PNG file whose header declares ``width x height`` pixels (grey, 1 bit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = zlib.compress(row * 4)  # far fewer rows than declared: Pillow must refuse before decoding
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _results(root: Path, figures: dict[str, str]) -> Path:
    """A results folder with one experiment ``exp`` whose claims.json names ``figures``."""
    exp = root / "results" / "exp"
    exp.mkdir(parents=True)
    (exp / "summary.json").write_text('{"x": 1}')
    (exp / "claims.json").write_text(json.dumps({"text": "t", "figures": figures, "claims": []}))
    return root / "results"


def _b64_pieces(data: bytes) -> list[str]:
    """Base64 of ``data`` at the three byte alignments (a substring of any page that embeds it)."""
    return [base64.b64encode(data[k:])[4:40].decode() for k in range(3)]


# -- 1. the report embeds only image files inside the experiment's folder ---------------------------------
def test_report_embeds_only_images_inside_the_experiment_folder(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOPSECRET-" * 20)
    outside_png = _png(tmp_path / "outside.png", tail=b"PNG-FROM-OUTSIDE" * 8)
    results = _results(tmp_path, {
        str(secret): "absolute path", "../../secret.txt": "parent path", "link.png": "link out",
        "fake.png": "not an image", "good.png": "a real figure", "../../outside.png": "image outside",
        "nul\u0000.png": "a NUL byte in the name",
    })
    exp = results / "exp"
    os.symlink(tmp_path / "outside.png", exp / "link.png")
    (exp / "fake.png").write_bytes(b"not an image at all " * 10)
    good = _png(exp / "good.png", 4, 4)
    page = build_report(results).read_text()
    for data in (secret.read_bytes(), outside_png, (exp / "fake.png").read_bytes()):
        assert not any(piece in page for piece in _b64_pieces(data))
    assert "TOPSECRET" not in page
    assert base64.b64encode(good).decode() in page  # the figure of the folder itself is still shown
    assert page.count("not inside the experiment folder") == 4  # the two paths, the link, outside.png
    assert "not a PNG, JPEG or GIF image" in page


def test_malformed_claims_json_is_one_line(tmp_path, capsys):
    results = _results(tmp_path, {})
    (results / "exp" / "claims.json").write_text('{"figures": {"a.png": 3}}')
    assert main(["report", str(results)]) == 2
    err = capsys.readouterr().err
    assert "claims.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- 2. report.html and output folders: only layerwise's own unchanged output is replaced ------------------
def test_report_never_replaces_a_users_report_html(tmp_path, capsys):
    results = _results(tmp_path, {})
    mine = results / "report.html"
    mine.write_text("<html>my own notes</html>")
    assert main(["report", str(results)]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace" in err and len(err.strip().splitlines()) == 1
    assert mine.read_text() == "<html>my own notes</html>"
    mine.unlink()
    first = build_report(results).read_bytes()  # layerwise's own report: rebuilt freely
    assert main(["report", str(results), "--title", "again"]) == 0
    second = mine.read_bytes()
    assert b"<title>again</title>" in second and second != first
    # edited by hand, same size: refused (a size check would let this through)
    edited = second.replace(b"<title>again</title>", b"<title>AGAIN</title>")
    assert len(edited) == len(second)
    mine.write_bytes(edited)
    with pytest.raises(OutputPathError, match="not an unchanged report"):
        build_report(results)
    assert mine.read_bytes() == edited
    mine.unlink()
    os.symlink(tmp_path / "elsewhere.html", mine)
    with pytest.raises(OutputPathError, match="symbolic link"):
        check_report_target(results)


def test_reproduce_refuses_a_users_report_html_before_running(tmp_path, monkeypatch, capsys):
    from dataclasses import dataclass

    from layerwise.experiments import EXPERIMENTS, Experiment

    ran = []

    @dataclass(frozen=True)
    class Config:
        k: int = 1

    def run(config, out):
        ran.append(out)
        return {"x": 1}

    monkeypatch.setitem(EXPERIMENTS._items, "tiny-21", Experiment(
        name="tiny-21", run=run, scales={"quick": Config()}, description="toy"))
    out = tmp_path / "results"
    out.mkdir()
    (out / "report.html").write_text("mine")
    assert main(["reproduce", "tiny-21", "--out", str(out)]) == 2
    assert "report.html" in capsys.readouterr().err
    assert ran == [] and (out / "report.html").read_text() == "mine" and not (out / "tiny-21").exists()
    (out / "report.html").unlink()
    assert main(["reproduce", "tiny-21", "--out", str(out)]) == 0  # twice: its own report is replaced
    assert main(["reproduce", "tiny-21", "--out", str(out)]) == 0
    assert len(ran) == 2


def test_overwrite_refuses_an_output_edited_keeping_its_size(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"\x00" * 64)
    assert check_output_dir(target, overwrite=True) == target  # unchanged: may be replaced
    marker = json.loads((target / OUTPUT_MARKER).read_text())
    import hashlib

    assert marker["files"]["weights.bin"] == {"size": 64, "sha256": hashlib.sha256(b"\x00" * 64).hexdigest()}
    (target / "weights.bin").write_bytes(b"\x01" * 64)  # the user's edit, same size
    with pytest.raises(OutputPathError, match="weights.bin"):
        check_output_dir(target, overwrite=True)
    with pytest.raises(OutputPathError, match="weights.bin"):
        with atomic_directory(target):
            pass
    assert (target / "weights.bin").read_bytes() == b"\x01" * 64


def test_marker_without_hashes_cannot_be_verified(tmp_path):
    target = tmp_path / "old"
    target.mkdir()
    (target / "a.json").write_text("{}")
    (target / OUTPUT_MARKER).write_text(json.dumps({"created_by": "layerwise", "files": {"a.json": 2}}))
    with pytest.raises(OutputPathError, match="cannot be verified"):
        check_output_dir(target, overwrite=True)
    assert (target / "a.json").read_text() == "{}"


# -- 5. empty .npy, deep YAML, decompression bombs ----------------------------------------------------------
def test_read_npy_refuses_every_unusable_file_in_one_line(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    np.savez(tmp_path / "arch.npz", a=np.zeros(2))
    np.save(tmp_path / "ok.npy", np.arange(6, dtype=">f8").reshape(2, 3))  # big-endian
    full = tmp_path / "full.npy"
    np.save(full, np.zeros((50, 4)))
    (tmp_path / "cut.npy").write_bytes(full.read_bytes()[:200])
    for name, needle in (("empty.npy", "empty"), ("strings.npy", "dtype"), ("arch.npz", ".npz"),
                         ("cut.npy", "cannot be read"), ("missing.npy", "not found")):
        with pytest.raises(InputDataError, match=needle) as err:
            read_npy(tmp_path / name, what="--data")
        assert "\n" not in str(err.value) and "--data" in str(err.value)
    got = read_npy(tmp_path / "ok.npy")
    assert got.dtype == np.float64 and got.dtype.isnative
    np.testing.assert_array_equal(got, np.arange(6.0).reshape(2, 3))


def test_kernels_gram_on_an_empty_npy_is_one_line(tmp_path, capsys):
    (tmp_path / "x.npy").write_bytes(b"")
    code = main(["kernels", "gram", "--kind", "full", "--data", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "k.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "empty (0 bytes)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "k.npy").exists()


DEEP = "a: " + "[" * 3000 + "]" * 3000 + "\n"


def test_read_yaml_deep_and_bad_documents_are_config_errors(tmp_path):
    f = tmp_path / "c.yaml"
    for text, needle in ((DEEP, "nested too deeply"), ("a: [1, 2\n", "not valid YAML"),
                         ("seed: 2001-13-45\n", "not valid YAML")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=needle) as err:
            read_yaml(f)
        assert "\n" not in str(err.value)
    f.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ConfigError, match="UTF-8"):
        read_yaml(f)


@pytest.mark.parametrize("command", [["kernels", "curve"], ["finetune"], ["merge"]])
def test_deeply_nested_yaml_is_one_line_in_every_yaml_command(tmp_path, capsys, command):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(DEEP)
    argv = [*command, str(cfg)] + (["--out", str(tmp_path / "o")] if command[0] != "finetune" else
                                   ["--out", str(tmp_path / "o"), "--dry-run"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "deep.yaml" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)])  # over 2x the limit; over it
def test_finetune_image_folder_refuses_decompression_bombs(tmp_path, size):
    pytest.importorskip("PIL")
    from layerwise.tangent.clip import ImageFolder

    (tmp_path / "cls").mkdir()
    _bomb(tmp_path / "cls" / "bomb.png", *size)
    assert (tmp_path / "cls" / "bomb.png").stat().st_size < 2000
    data = ImageFolder(tmp_path, 8)
    with pytest.raises(InputDataError, match="too large to decode"):
        data[0]


# -- 7. a missing local path never goes to the hub ----------------------------------------------------------
def _finetune_cfg(tmp_path: Path, model_path: str) -> Path:
    (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"kind": "hf_clip", "path": model_path},
                                   "tasks": [{"name": "t", "train": "train"}]}))
    return cfg


@pytest.mark.parametrize("model_path", ["path/to/x", "./clip", "../clip", "/nowhere/clip", "~/no/such"])
def test_finetune_missing_local_model_folder_says_folder_not_found(tmp_path, monkeypatch, model_path):
    from layerwise.tangent import clip, workflow

    monkeypatch.setattr(clip, "load_clip", lambda *a, **k: pytest.fail("tried to load (hub)"))
    with pytest.raises(ConfigError, match="model.path.*folder not found"):
        workflow.load_finetune_job(_finetune_cfg(tmp_path, model_path))


def test_finetune_hub_id_and_existing_folder_are_still_accepted(tmp_path):
    from layerwise.tangent import workflow

    job = workflow.load_finetune_job(_finetune_cfg(tmp_path, "openai/clip-vit-base-patch32"))
    assert job.path == "openai/clip-vit-base-patch32"
    (tmp_path / "path" / "to" / "x").mkdir(parents=True)
    job = workflow.load_finetune_job(_finetune_cfg(tmp_path, "path/to/x"))
    assert Path(job.path) == tmp_path / "path" / "to" / "x"


def test_merge_missing_local_model_says_folder_not_found(tmp_path, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"method": "task_arithmetic", "base_model": "path/to/base",
                                   "models": ["path/to/ft"]}))
    assert main(["merge", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "folder not found" in err and "path/to" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_finetune_meta_device_is_refused_when_the_config_is_read(tmp_path, device):
    from layerwise.tangent import workflow

    cfg = tmp_path / "ft.yaml"
    job = {"model": {"kind": "toy_cnn", "device": device}, "tasks": [{"name": "rot90"}]}
    cfg.write_text(yaml.safe_dump(job))
    if device == "meta":
        with pytest.raises(ConfigError, match="model.device.*meta"):
            workflow.load_finetune_job(cfg)
    else:
        assert workflow.load_finetune_job(cfg).device == "cpu"
