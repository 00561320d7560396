"""Checkpoint I/O: lazy readers against the reference safetensors library and torch.load, the sharded
writer (read back by the reference library and by transformers), atomicity, and safe unpickling."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from layerwise._io import atomic_directory
from layerwise.editing.checkpoints import (
    ShardedSafetensorsWriter,
    check_compatible,
    load_state_dict,
    open_checkpoint,
    parse_size,
    save_checkpoint,
)


def _mixed_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "a.bias": torch.randn(5, generator=g).to(torch.float16),
        "b.weight": torch.randn(3, 4, 2, generator=g).to(torch.bfloat16),
        "c.double": torch.randn(11, generator=g, dtype=torch.float64),
        "c.count": torch.tensor(17, dtype=torch.int64),
        "c.mask": torch.rand(6, generator=g) > 0.5,
        "c.ids": torch.arange(9, dtype=torch.int32).reshape(3, 3),
        "empty": torch.zeros(0, 4),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_reader_matches_reference_library_including_slices(tmp_path):
    sd = _mixed_state_dict()
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(sd, str(path))
    with open_checkpoint(path) as ck:
        assert set(ck.keys()) == set(sd)
        for k, v in sd.items():
            assert ck.shape(k) == tuple(v.shape) and ck.dtype(k) == v.dtype
            assert torch.equal(ck.get(k), v)
            flat = v.reshape(-1)
            for start, stop in [
                (0, flat.numel()),
                (1, max(1, flat.numel() - 2)),
                (flat.numel(), flat.numel()),
            ]:
                if start <= stop:
                    assert torch.equal(ck.read(k, start, stop), flat[start:stop])


@pytest.mark.parametrize("shard_bytes", [10**9, 64])
def test_writer_output_is_read_by_reference_library(tmp_path, shard_bytes):
    sd = _mixed_state_dict(1)
    out = save_checkpoint(sd, tmp_path / "out", max_shard_bytes=shard_bytes)
    files = sorted(out.glob("*.safetensors"))
    if shard_bytes == 64:
        assert len(files) > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(sd)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    else:
        assert [f.name for f in files] == ["model.safetensors"]
    merged = {}
    for f in files:  # the reference implementation validates offsets and coverage of every file
        merged.update(safetensors.torch.load_file(str(f)))
    _assert_same(merged, sd)
    _assert_same(load_state_dict(out), sd)


def test_writer_accepts_slices_in_any_order_and_checks_completeness(tmp_path):
    x = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    w = ShardedSafetensorsWriter(tmp_path, [("x", (4, 5), torch.float32)])
    w.write("x", x.reshape(-1)[12:], start=12)
    w.write("x", x.reshape(-1)[:12], start=0)
    w.close()
    assert torch.equal(safetensors.torch.load_file(str(tmp_path / "model.safetensors"))["x"], x)
    w2 = ShardedSafetensorsWriter(tmp_path / "..", [("y", (3,), torch.float32)])
    with pytest.raises(TypeError, match="dtype"):
        w2.write("y", torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="outside"):
        w2.write("y", torch.zeros(3), start=1)
    w2.write("y", torch.zeros(2))
    with pytest.raises(RuntimeError, match="fully written"):
        w2.close()


def _spy_reads(monkeypatch) -> list[str]:
    """Names of the files that layerwise._io opens for reading (to hash them) from now on."""
    import builtins

    import layerwise._io as lio

    opened: list[str] = []

    def spy(file, mode="r", *args, **kwargs):
        if "r" in mode:
            opened.append(Path(file).name)
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(lio, "open", spy, raising=False)
    return opened


@pytest.mark.parametrize("in_order", [True, False])
def test_writer_hashes_while_writing_for_the_folder_marker(tmp_path, monkeypatch, in_order):
    import hashlib

    sd = _mixed_state_dict()
    opened = _spy_reads(monkeypatch)
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        w = ShardedSafetensorsWriter(tmp, [(k, v.shape, v.dtype) for k, v in sd.items()], 64, hash_files=True)
        items = list(sd.items())
        for k, v in items if in_order else items[::-1]:  # reversed: out of order inside a shard
            flat = v.reshape(-1)
            for start in range(0, max(flat.numel(), 1), 3):  # chunks of 3 elements
                w.write(k, flat[start : start + 3], start)
                w.hash_chunk(k, flat[start : start + 3], start)
        w.close()
    files = sorted(p.name for p in target.glob("*.safetensors"))
    assert len(files) > 1
    marker = json.loads((target / ".layerwise-output").read_text())["files"]
    for name in files:  # the marker holds each file's true digest, whichever way it was obtained
        assert marker[name]["sha256"] == hashlib.sha256((target / name).read_bytes()).hexdigest()
    read_back = sorted(n for n in opened if n.endswith(".safetensors"))
    if in_order:
        assert read_back == []  # every digest came from the writer: nothing was read back
    else:  # shards holding several tensors were written out of order: those are read back
        assert read_back and set(read_back) < set(files)
    _assert_same(load_state_dict(target), sd)


@pytest.mark.parametrize("method", ["task_arithmetic", "slerp"])
def test_merge_output_is_not_read_back_for_its_marker(tmp_path, monkeypatch, method):
    import hashlib

    from layerwise.editing import LinesSpec, merge_models

    g = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.w": torch.randn(40, 30, generator=g) for i in range(3)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    fts, params = (fts[:1], {"t": 0.4}) if method == "slerp" else (fts, {})
    opened = _spy_reads(monkeypatch)
    # LiNeS with an automatic alpha: the stash is written too (not hashed); the output is hashed
    res = merge_models(
        method, fts, base, params=params, lines=LinesSpec(beta=0.5), chunk_elements=7, max_shard_bytes=6000,
        out=tmp_path / "o",
    )
    files = sorted(p.name for p in res.out.glob("*.safetensors"))
    assert len(files) > 1 and not [n for n in opened if n.endswith(".safetensors")]
    marker = json.loads((res.out / ".layerwise-output").read_text())["files"]
    for name in files:
        assert marker[name]["sha256"] == hashlib.sha256((res.out / name).read_bytes()).hexdigest()


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    sd = _mixed_state_dict()
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            w = ShardedSafetensorsWriter(tmp, [(k, v.shape, v.dtype) for k, v in sd.items()], 64)
            w.write("a.weight", sd["a.weight"])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # an existing output survives a failed rewrite untouched
    save_checkpoint(sd, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            ShardedSafetensorsWriter(tmp, [("z", (2,), torch.float32)]).close()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_torch_files_plain_and_wrapped(tmp_path):
    sd = {k: v for k, v in _mixed_state_dict(2).items()}
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "wrapped.pth")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for name in ("plain.pt", "wrapped.pth", "legacy.bin"):
        _assert_same(load_state_dict(tmp_path / name), sd)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2), "payload": _Evil()}, tmp_path / "evil.pt")
    with open(tmp_path / "evil_raw.bin", "wb") as fh:
        pickle.dump({"payload": _Evil()}, fh)
    for name in ("evil.pt", "evil_raw.bin"):
        with pytest.raises(ValueError, match="weights_only"):
            open_checkpoint(tmp_path / name)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_hf_folders_single_and_sharded(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    ref = {k: v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for folder in ("single", "sharded"):
        with open_checkpoint(tmp_path / folder) as ck:
            assert set(ck.keys()) <= set(ref) and len(ck.keys()) > 0
            for k in ck.keys():
                assert torch.equal(ck.get(k), ref[k]), (folder, k)
    # a torch-format folder: pytorch_model.bin
    (tmp_path / "binfolder").mkdir()
    torch.save(ref, tmp_path / "binfolder" / "pytorch_model.bin")
    _assert_same(load_state_dict(tmp_path / "binfolder"), ref)


def test_sharded_torch_index(tmp_path):
    sd = _mixed_state_dict(3)
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:4]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[4:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    wm = {
        k: ("pytorch_model-00001-of-00002.bin" if i < 4 else "pytorch_model-00002-of-00002.bin")
        for i, k in enumerate(keys)
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    _assert_same(load_state_dict(tmp_path), sd)


def test_missing_and_unrecognised_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match="README.md"):
        open_checkpoint(tmp_path / "empty")
    with pytest.raises(TypeError, match="checkpoint"):
        open_checkpoint(3)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        open_checkpoint(tmp_path / "junk.safetensors")


def test_check_compatible_lists_every_mismatch():
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(4), "z": torch.zeros(1)}
    b = {"x": torch.zeros(3, 2), "y": torch.zeros(4, dtype=torch.float16), "extra": torch.zeros(1)}
    with pytest.raises(ValueError) as err:
        check_compatible([open_checkpoint(a), open_checkpoint(b)])
    msg = str(err.value)
    for needle in ("lacks 1 key", "'z'", "'extra'", "shape of 'x'", "(2, 3)", "(3, 2)", "dtype of 'y'"):
        assert needle in msg, needle
    check_compatible([open_checkpoint(a), open_checkpoint(dict(a))])
    b2 = dict(a, y=torch.zeros(4, dtype=torch.float16))
    check_compatible([open_checkpoint(a), open_checkpoint(b2)], check_dtypes=False)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5MiB") == int(1.5 * 2**20)
    assert parse_size(123) == 123
    for bad in ("12 parsecs", "-3MB", 0, "GB"):
        with pytest.raises(ValueError, match="shard_size"):
            parse_size(bad)
    with pytest.raises(TypeError):
        parse_size(True)


def test_reader_does_not_keep_file_mapped(tmp_path):
    """Reading returns tensors that own their memory (no view into a file mapping)."""
    sd = {"w": torch.randn(1000)}
    safetensors.torch.save_file(sd, str(tmp_path / "w.safetensors"))
    ck = open_checkpoint(tmp_path / "w.safetensors")
    t = ck.get("w")
    ck.close()
    Path(tmp_path / "w.safetensors").unlink()
    assert torch.equal(t, sd["w"])
