"""``layerwise convert-checkpoint``: pickled whole modules and state dicts (zip and legacy torch formats) to
safetensors through a restricted unpickler that never imports the pickled classes and never runs code."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch
from safetensors.torch import load_file

from layerwise.cli import main
from layerwise.editing.convert import (
    UnsafePickleError,
    convert_checkpoint,
    read_pickled_checkpoint,
)
from layerwise.errors import CheckpointError, OutputPathError

MODULE_SOURCE = textwrap.dedent(
    """
    import enum
    import pathlib

    import torch


    class Interpolation(enum.Enum):        # like torchvision's InterpolationMode in pickled transforms
        BICUBIC = "bicubic"


    class Preprocess:                       # like the ImageEncoder's train_preprocess / val_preprocess
        def __init__(self):
            self.interpolation = Interpolation.BICUBIC
            self.cache_dir = pathlib.PurePosixPath("/cache/open_clip")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)
            self.norm = torch.nn.LayerNorm(4).double()
            self.register_buffer("steps", torch.tensor([7, 8], dtype=torch.int64))
            self.register_buffer("scratch", torch.ones(2), persistent=False)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 4).to(torch.bfloat16)
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(4, 2, bias=False)
            self.tied = self.head              # the same module twice: state_dict lists it twice
            self.note = "kept as a plain attribute"
            self.none_param = None
            self.register_parameter("absent", None)

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Encoder()
            self.train_preprocess = Preprocess()
    """
)


@pytest.fixture
def vanished_module(tmp_path):
    """Pickles of a whole module whose class lives in a temporary module that is then made un-importable."""
    name = f"lw_tmp_{uuid.uuid4().hex[:8]}"
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{name}.py").write_text(MODULE_SOURCE)
    sys.path.insert(0, str(src))
    try:
        mod = __import__(name)
        torch.manual_seed(0)
        model = mod.Encoder()
        with torch.no_grad():
            model.blocks[1].fc.weight.mul_(3)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        files = {}
        for fmt, zip_format in (("zip", True), ("legacy", False)):
            files[fmt] = tmp_path / f"model_{fmt}.pt"
            torch.save(model, files[fmt], _use_new_zipfile_serialization=zip_format)
        files["with_transforms"] = tmp_path / "image_encoder.pt"
        encoder = mod.ImageEncoder()
        encoder.model.load_state_dict(model.state_dict())
        torch.save(encoder, files["with_transforms"])
    finally:
        sys.path.remove(str(src))
        sys.modules.pop(name, None)
    (src / f"{name}.py").unlink()
    return files, expected


def _assert_same(got, expected, ordered=True):
    assert list(got) == list(expected) if ordered else sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_whole_module_of_a_vanished_class_is_recovered_exactly(vanished_module, fmt):
    files, expected = vanished_module
    # the ordinary loader cannot even unpickle it any more: the class is gone
    with pytest.raises((ModuleNotFoundError, AttributeError, pickle.UnpicklingError)):
        torch.load(files[fmt], weights_only=False)
    got = read_pickled_checkpoint(files[fmt])
    assert "blocks.0.scratch" not in got  # non-persistent buffer, as state_dict() leaves it out
    assert got["blocks.0.steps"].dtype == torch.int64
    _assert_same(got, expected)


def test_pickled_transforms_need_opaque_calls_and_convert_exactly(vanished_module):
    # enum members and paths in the pickle are calls (REDUCE) of classes the converter never imports:
    # refused by default, recorded as inert placeholders with allow_opaque_calls
    files, expected = vanished_module
    with pytest.raises(UnsafePickleError, match=r"refusing to call lw_tmp_\w+\.Interpolation"):
        read_pickled_checkpoint(files["with_transforms"])
    got = read_pickled_checkpoint(files["with_transforms"], allow_opaque_calls=True)
    _assert_same(got, {f"model.{k}": v for k, v in expected.items()})


@pytest.mark.parametrize("zip_format", [True, False])
def test_plain_state_dicts_shared_storage_views_and_wrappers(tmp_path, zip_format):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    sd = {
        "t": base.t(),  # non-contiguous
        "row": base[2],  # a view at an offset of the same storage
        "empty": torch.zeros(0, 3),
        "half": torch.randn(5, generator=torch.Generator().manual_seed(1)).half(),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
    }
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": sd, "epoch": 3}, path, _use_new_zipfile_serialization=zip_format)
    _assert_same(read_pickled_checkpoint(path), sd)


def test_file_objects_and_broken_files(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    raw = buf.getvalue()
    assert torch.equal(read_pickled_checkpoint(io.BytesIO(raw))["w"], torch.ones(2))
    for name, data in (("trunc.pt", raw[: len(raw) // 2]), ("junk.pt", b"not a checkpoint"), ("e.pt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            read_pickled_checkpoint(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
    with pytest.raises(CheckpointError, match="state dict or a pickled module"):
        read_pickled_checkpoint(tmp_path / "no_tensors.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        read_pickled_checkpoint(tmp_path / "missing.pt")


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.eval, (self.code,))


class _Popen:
    def __init__(self, argv):
        self.argv = argv

    def __reduce__(self):
        return (subprocess.call, (self.argv,))


def _payloads(sentinel):
    return {
        "os.system": _System(f"touch {sentinel}"),
        "builtins.eval": _Eval(f"open({str(sentinel)!r}, 'w').write('x')"),
        "subprocess": _Popen(["touch", str(sentinel)]),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess"])
@pytest.mark.parametrize("how", ["zip", "legacy", "raw-pickle"])
def test_malicious_pickles_are_refused_and_never_run(tmp_path, kind, how):
    sentinel = tmp_path / "pwned"
    payload = _payloads(sentinel)[kind]
    path = tmp_path / "evil.pt"
    obj = {"w": torch.ones(2), "x": payload}
    if how == "raw-pickle":
        # (a raw pickle of a tensor would call torch.load, refused first: leave tensors out)
        path.write_bytes(pickle.dumps({"x": payload}, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=how == "zip")
    for opaque in (False, True):  # allow_opaque_calls never opens the door to denied modules
        with pytest.raises(UnsafePickleError) as err:
            read_pickled_checkpoint(path, allow_opaque_calls=opaque)
        msg = str(err.value)
        assert "\n" not in msg and "refusing" in msg
        expected = {"os.system": "system", "builtins.eval": "eval", "subprocess": "subprocess.call"}[kind]
        assert expected in msg
    assert not sentinel.exists()
    out = tmp_path / "evil.safetensors"
    assert main(["convert-checkpoint", str(path), "--out", str(out)]) == 2
    assert not out.exists() and not sentinel.exists()


def test_calls_of_unknown_callables_are_refused_unless_recorded_inertly(tmp_path):
    # a __reduce__ naming an ordinary (non-denied) callable: refused by default, an inert record when allowed
    import collections

    class _Counter:
        def __reduce__(self):
            return (collections.Counter, ("abc",))

    path = tmp_path / "calls.pt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "extra": _Counter()}, path)
    with pytest.raises(UnsafePickleError, match=r"refusing to call collections\.Counter"):
        read_pickled_checkpoint(path)
    got = read_pickled_checkpoint(path, allow_opaque_calls=True)
    assert list(got) == ["w"] and torch.equal(got["w"], torch.arange(3.0))
    out = tmp_path / "calls.safetensors"
    assert main(["convert-checkpoint", str(path), "--out", str(out)]) == 2
    assert main(["convert-checkpoint", str(path), "--out", str(out), "--allow-opaque-calls"]) == 0
    assert list(load_file(out)) == ["w"]


def test_convert_writes_safetensors_with_prefix_and_overwrite(vanished_module, tmp_path, capsys):
    files, expected = vanished_module
    out = tmp_path / "enc.safetensors"
    assert main(["convert-checkpoint", str(files["zip"]), "--out", str(out)]) == 0
    assert f"wrote {len(expected)} tensors" in capsys.readouterr().out
    _assert_same(load_file(out), expected, ordered=False)  # (safetensors orders names its own way)
    # --prefix keeps the matching names, stripped
    sub = tmp_path / "blocks1.safetensors"
    assert main(["convert-checkpoint", str(files["legacy"]), "--out", str(sub), "--prefix", "blocks.1."]) == 0
    got = load_file(sub)
    assert set(got) == {k.removeprefix("blocks.1.") for k in expected if k.startswith("blocks.1.")}
    assert torch.equal(got["fc.weight"], expected["blocks.1.fc.weight"])
    # an existing output is refused without --overwrite and left untouched
    before = out.read_bytes()
    assert main(["convert-checkpoint", str(files["legacy"]), "--out", str(out), "--prefix", "head."]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["convert-checkpoint", str(files["legacy"]), "--out", str(out), "--prefix", "head.",
                 "--overwrite"]) == 0
    assert set(load_file(out)) == {"weight"}
    with pytest.raises(OutputPathError):
        convert_checkpoint(files["zip"], files["zip"], overwrite=True)
    with pytest.raises(ValueError, match="prefix"):
        convert_checkpoint(files["zip"], tmp_path / "x.safetensors", prefix="nothing.")
    with pytest.raises(ValueError, match="safetensors"):
        convert_checkpoint(files["zip"], tmp_path / "x.bin")


def test_the_pickle_cannot_modify_allow_listed_objects(tmp_path):
    from layerwise.editing import convert

    # GLOBAL torch._utils._rebuild_tensor_v2; BUILD {"foo": 1}: would set an attribute of layerwise's own
    # rebuild function for the rest of the process
    evil = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x03\x00\x00\x00fooK\x01sb."
    path = tmp_path / "build.pt"
    path.write_bytes(evil)
    with pytest.raises(UnsafePickleError, match="refusing to set the state"):
        read_pickled_checkpoint(path)
    target = convert._ALLOWED[("torch._utils", "_rebuild_tensor_v2")]
    assert not hasattr(target, "foo")
    # the same with slot state (None, {"_fn": ...}): setattr would replace the wrapped function
    evil = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x03\x00\x00\x00_fnK\x01s\x86b.")
    path.write_bytes(evil)
    with pytest.raises(UnsafePickleError, match="refusing to set the state"):
        read_pickled_checkpoint(path)
    assert target._fn is convert._rebuild_tensor
