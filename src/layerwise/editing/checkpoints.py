"""Lazy checkpoint readers (safetensors, sharded folders, Hugging Face folders, torch state dicts) and a
streaming, atomic writer of sharded safetensors.

Every reader exposes the same small interface (:class:`Checkpoint`): the tensor names, their shapes and
dtypes without loading anything, and ``read(name, start, stop)`` returning one tensor or a slice of its
flattened elements. Safetensors are read with positioned reads (see ``_safetensors``); torch files are
opened with ``torch.load(weights_only=True, mmap=True)``, which refuses arbitrary pickled objects.

Example
-------
>>> ckpt = open_checkpoint({"w": torch.ones(2, 3)})
>>> ckpt.keys(), ckpt.shape("w"), ckpt.read("w", 1, 3)
(['w'], (2, 3), tensor([1., 1.]))
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_directory, remember_sha256, write_json
from ..errors import CheckpointError, ParameterError, ParameterTypeError
from . import _safetensors as st

__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "check_compatible",
    "ShardedSafetensorsWriter",
    "save_checkpoint",
    "load_state_dict",
    "parse_size",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# what torch.load raises on truncated, corrupted or hostile files (weights_only=True refuses code)
_TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    RuntimeError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    struct.error,
    UnicodeDecodeError,
    OverflowError,
    ImportError,
)


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint path does not exist or holds no weights (also a ``FileNotFoundError``)."""


class Checkpoint:
    """A read-only view of named tensors: metadata up front, data one tensor (or slice) at a time."""

    source: str = "<checkpoint>"

    def keys(self) -> list[str]:
        """Tensor names."""
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key`` (read from the header; no data loaded)."""
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of tensor ``key``."""
        raise NotImplementedError

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor ``key`` as a 1-D tensor ``(stop - start,)``.

        May be a view of the source (in-memory state dicts, memory-mapped torch files): do not modify it.
        """
        raise NotImplementedError

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """Fill the contiguous 1-D tensor ``out`` with elements ``[start, start + out.numel())`` of ``key``.

        Converts to ``out.dtype``; readers override it to read straight into ``out`` without a copy.
        """
        out.copy_(self.read(key, start, start + out.numel()))

    def read_into_over(
        self, key: str, out: torch.Tensor, start: int, base: Checkpoint, base_chunk: torch.Tensor
    ) -> None:
        """:meth:`read_into`, for a caller that already holds the same elements of ``base`` in ``base_chunk``
        (converted to ``out.dtype``): a checkpoint built on ``base`` (a LoRA adapter on it) uses them
        instead of reading the base again. Others read as usual."""
        self.read_into(key, out, start)

    def numel(self, key: str) -> int:
        """Number of elements of tensor ``key``."""
        n = 1
        for d in self.shape(key):
            n *= d
        return n

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` with its shape."""
        return self.read(key).reshape(self.shape(key))

    def nbytes(self, key: str) -> int:
        """Size of tensor ``key`` in bytes, in its stored dtype."""
        return self.numel(key) * torch.empty((), dtype=self.dtype(key)).element_size()

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Load everything (for small models and tests)."""
        return {k: self.get(k) for k in self.keys()}

    def close(self) -> None:
        """Release open files or memory maps (a no-op for in-memory checkpoints)."""
        pass

    def __contains__(self, key: object) -> bool:
        return key in set(self.keys())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _missing(self, key: str) -> KeyError:
        return KeyError(f"{self.source}: no tensor named {key!r}")


class StateDictCheckpoint(Checkpoint):
    """A checkpoint over an in-memory mapping of name -> tensor."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str = "<state dict>") -> None:
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"state dict values must be tensors; not tensors: {bad[:5]}")
        self._t = dict(tensors)
        self.source = source

    def keys(self) -> list[str]:
        return list(self._t)

    def __contains__(self, key: object) -> bool:
        return key in self._t

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._t[key]
        except KeyError:
            raise self._missing(key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._tensor(key).detach().reshape(-1)[start:stop]


class SafetensorsCheckpoint(Checkpoint):
    """One or several safetensors files (the shards of one model), read lazily."""

    def __init__(self, files: Sequence[str | os.PathLike], source: str | None = None) -> None:
        self._where: dict[str, tuple[Path, st.TensorInfo]] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            infos, meta = st.read_header(f)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self._where:
                    raise CheckpointError(
                        f"tensor {name!r} appears in two shards: {self._where[name][0]} and {f}"
                    )
                self._where[name] = (Path(f), info)
        self.source = source or str(files[0])
        self._handles: dict[Path, Any] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def _info(self, key: str) -> tuple[Path, st.TensorInfo]:
        try:
            return self._where[key]
        except KeyError:
            raise self._missing(key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key)[1].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._info(key)[1].dtype

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        path, info = self._info(key)
        return st.read_range(self._handle(path), info, start, stop)

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        path, info = self._info(key)
        if out.dtype != info.dtype or not out.is_contiguous():
            return super().read_into(key, out, start)
        st.read_into(self._handle(path), info, out, start)

    def _handle(self, path: Path):
        fh = self._handles.get(path)
        if fh is None:
            fh = self._handles[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        return fh

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


class TorchCheckpoint(Checkpoint):
    """Torch pickles (``.bin``/``.pt``/``.pth``), possibly sharded, loaded with ``weights_only=True``.

    Each file is memory-mapped (``mmap=True``) on first use; only tensors, plain containers and numbers are
    accepted by the unpickler, so a file carrying code raises instead of running it.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        weight_map: Mapping[str, str] | None = None,
        source: str | None = None,
    ) -> None:
        self._files = [Path(f) for f in files]
        self.source = source or str(self._files[0])
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        if weight_map is not None:  # sharded .bin with an index: names known without loading
            folder = self._files[0].parent
            self._where = {k: folder / v for k, v in weight_map.items()}
            # open each shard once now (memory-mapped, then released) so that a truncated or hostile shard
            # is refused when the checkpoint is opened (``--dry-run``), not halfway through a merge
            for f in self._files:
                found = set(_torch_load_tensors(f))
                listed = sorted(k for k, v in self._where.items() if v == f and k not in found)
                if listed:
                    raise CheckpointError(
                        f"{f}: the index lists tensors this shard lacks: {_clip(_q(listed))}"
                    )
        else:
            self._where = {}
            for f in self._files:
                for k in self._load(f):
                    self._where[k] = f

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._loaded:
            self._loaded[path] = _torch_load_tensors(path)
        return self._loaded[path]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise self._missing(key)
        return self._load(self._where[key])[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._tensor(key).reshape(-1)[start:stop]

    def close(self) -> None:
        self._loaded.clear()


def _torch_load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``; unwrap ``{"state_dict": ...}``/``{"model": ...}``; tensors only."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refusing to load: the file contains Python objects other than tensors, and layerwise "
            f"only unpickles with weights_only=True. Convert it to safetensors in a trusted environment. "
            f"({(str(err).splitlines() or [''])[0]})"
        ) from None
    except _TORCH_LOAD_ERRORS as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupted?): "
            f"{type(err).__name__}: {first}"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if (
        not isinstance(obj, Mapping)
        or not all(isinstance(k, str) for k in obj)
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    return dict(obj)


def open_checkpoint(source: Any, name: str | None = None) -> Checkpoint:
    """Open ``source`` lazily as a :class:`Checkpoint`.

    Parameters
    ----------
    source : str, PathLike, Mapping[str, Tensor] or Checkpoint
        A ``.safetensors`` file; a torch file (``.bin``, ``.pt``, ``.pth``, ``.ckpt``); a folder holding a
        sharded index (``*.safetensors.index.json`` preferred over ``*.bin.index.json``), a single weights
        file (``model.safetensors``, ``pytorch_model.bin``…) or several safetensors files (a Hugging Face
        model folder, an open_clip export…); an in-memory state dict; or an open checkpoint (returned as is).
    name : str, optional
        How an in-memory state dict is called in error messages.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return StateDictCheckpoint(source, source=name or "<state dict>")
    if not isinstance(source, (str, os.PathLike)):
        raise ParameterTypeError(
            f"checkpoint must be a path, a state dict or a Checkpoint, got {type(source).__name__}"
        )
    path = Path(source)
    if not path.exists():
        raise MissingCheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint([path])
        if path.name.endswith(".index.json"):
            return _open_index(path)
        return TorchCheckpoint([path])
    indexes = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.bin.index.json"))
    if indexes:
        return _open_index(indexes[0])
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if shards:
        return SafetensorsCheckpoint(shards, source=str(path))
    torch_files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(torch_files) == 1:
        return TorchCheckpoint(torch_files, source=str(path))
    found = ", ".join(p.name for p in sorted(path.iterdir())[:10]) or "(empty)"
    raise MissingCheckpointError(
        f"{path}: no weights found: expected an index json, *.safetensors files, or one torch file "
        f"({', '.join(WEIGHT_SUFFIXES)}); folder holds: {found}"
    )


def _open_index(index: Path) -> Checkpoint:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{index}: not a valid index json: {err}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: an index json needs a non-empty 'weight_map' mapping tensor names to shard files"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(
                f"{index}: weight_map[{name!r}] must be a file name in the index's folder, got {shard!r}"
            )
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MissingCheckpointError(f"{index}: shards listed in the index are missing: {missing}")
    if index.name.endswith(".safetensors.index.json"):
        ck = SafetensorsCheckpoint(files, source=str(index.parent))
        wrong = sorted(k for k, f in weight_map.items() if k not in ck._where or ck._where[k][0].name != f)
        if wrong:
            raise CheckpointError(
                f"{index}: tensors not found in the shard the index names: {_clip(_q(wrong))}"
            )
        return ck
    return TorchCheckpoint(files, weight_map=weight_map, source=str(index.parent))


def check_compatible(checkpoints: Sequence[Checkpoint], *, check_dtypes: bool = True) -> None:
    """Raise ``ValueError`` listing every key, shape or dtype that differs from the first checkpoint."""
    ref = checkpoints[0]
    ref_keys = set(ref.keys())
    problems: list[str] = []
    for ck in checkpoints[1:]:
        keys = set(ck.keys())
        if keys != ref_keys:
            missing, extra = sorted(ref_keys - keys), sorted(keys - ref_keys)
            if missing:
                problems.append(
                    f"{ck.source} lacks {len(missing)} key(s) of {ref.source}: {_clip(_q(missing))}"
                )
            if extra:
                problems.append(
                    f"{ck.source} has {len(extra)} key(s) not in {ref.source}: {_clip(_q(extra))}"
                )
        for key in sorted(keys & ref_keys):
            if ck.shape(key) != ref.shape(key):
                problems.append(
                    f"shape of {key!r}: {ref.shape(key)} in {ref.source}, {ck.shape(key)} in {ck.source}"
                )
            elif check_dtypes and ck.dtype(key) != ref.dtype(key):
                problems.append(
                    f"dtype of {key!r}: {ref.dtype(key)} in {ref.source}, {ck.dtype(key)} in {ck.source}"
                )
    if problems:
        raise CheckpointError("checkpoints do not match:\n  " + "\n  ".join(_clip(problems, 20, sep="\n  ")))


def _q(items: list[str]) -> list[str]:
    return [repr(k) for k in items]


def _clip(items: list[str], n: int = 8, sep: str = ", ") -> str | list[str]:
    if sep == ", ":
        return sep.join(items[:n]) + (f", … (+{len(items) - n} more)" if len(items) > n else "")
    return items[:n] + ([f"… (+{len(items) - n} more)"] if len(items) > n else [])


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: int | str, name: str = "shard_size") -> int:
    """Bytes from an int or a string like ``"500MB"``, ``"2GiB"`` (decimal and binary units)."""
    if isinstance(value, bool):
        raise ParameterTypeError(f"{name} must be an int or a string like '2GB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        digits = text.rstrip("KMGTIB")
        unit = text[len(digits) :]
        if unit not in _UNITS or not digits:
            raise ParameterError(
                f"{name} must be bytes or a number with a unit in {sorted(_UNITS)}, got {value!r}"
            )
        try:
            size = int(float(digits) * _UNITS[unit])
        except (ValueError, OverflowError):
            raise ParameterError(f"{name} must be bytes or a number with a unit, got {value!r}") from None
    else:
        raise ParameterTypeError(f"{name} must be an int or a string like '2GB', got {type(value).__name__}")
    if size <= 0:
        raise ParameterError(f"{name} must be positive, got {value!r}")
    return size


class ShardedSafetensorsWriter:
    """Write tensors whose names, shapes and dtypes are known in advance into sharded safetensors.

    The layout is planned up front (tensors in the order given, a new shard when the next tensor would
    exceed ``max_shard_bytes``), so each file's header is written first and every tensor, or any slice of
    its flattened elements, is written straight to its final offset: nothing is buffered in memory.
    Output: ``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``. Write into a temporary folder (:func:`layerwise._io.atomic_directory`)
    so that an interrupted run leaves nothing; :meth:`close` checks that every byte was written.

    Parameters
    ----------
    directory : path
        Existing folder that receives the files.
    specs : sequence of (name, shape, dtype)
    max_shard_bytes : int
    metadata : mapping of str to str, optional
        Stored in each header's ``__metadata__`` (``{"format": "pt"}`` by default, as transformers expects).
    hash_files : bool
        Also compute each file's sha256 from the bytes handed to :meth:`hash_chunk` (call it with the same
        arguments as :meth:`write`, in any thread); :meth:`close` records the digests of the files whose
        bytes all came in file order (:func:`layerwise._io.remember_sha256`), so that the folder marker of
        :func:`layerwise._io.atomic_directory` does not read them back. Other files are hashed by reading.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
        max_shard_bytes: int = 5 * 10**9,
        metadata: Mapping[str, str] | None = None,
        hash_files: bool = False,
    ) -> None:
        self.directory = Path(directory)
        specs = [(name, tuple(int(d) for d in shape), dtype) for name, shape, dtype in specs]
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for spec in specs:
            n = _numel(spec[1]) * torch.empty((), dtype=spec[2]).element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += n
        meta = {"format": "pt", **dict(metadata or {})}
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        self._place: dict[str, tuple[Path, int, torch.dtype, int]] = {}  # name -> file, offset, dtype, numel
        self._weight_map: dict[str, str] = {}
        # file -> [sha256 of its bytes so far, next byte offset, end], or None once a chunk came out of order
        self._digests: dict[Path, list | None] = {}
        self.total_size = 0
        for fname, shard in zip(names, shards, strict=False):
            prefix, offsets = st.plan_header(shard, meta)
            path = self.directory / fname
            end = len(prefix) + sum(_numel(s) * torch.empty((), dtype=d).element_size() for _, s, d in shard)
            with open(path, "wb") as fh:
                fh.write(prefix)
                fh.truncate(end)  # sparse until written; close() checks that everything was
            if hash_files:
                self._digests[path] = [hashlib.sha256(prefix), len(prefix), end]
            for name, shape, dtype in shard:
                self._place[name] = (path, offsets[name], dtype, _numel(shape))
                self._weight_map[name] = fname
                self.total_size += _numel(shape) * torch.empty((), dtype=dtype).element_size()
        self.files = [self.directory / n for n in names]
        self._written = dict.fromkeys(self._place, 0)
        self._fh: Any = None
        self._fh_path: Path | None = None

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write ``tensor`` (any shape; its flattened elements) at element ``start`` of tensor ``name``."""
        path, pos, data = self._locate(name, tensor, start)
        if self._fh_path != path:
            if self._fh is not None:
                self._fh.close()
            self._fh, self._fh_path = open(path, "r+b", buffering=0), path  # noqa: SIM115
        self._fh.seek(pos)
        done = 0
        while done < len(data):
            done += self._fh.write(data[done:])
        self._written[name] += tensor.numel()

    def hash_chunk(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Add the bytes of a chunk to its file's sha256 (``hash_files``; same arguments as :meth:`write`).

        A chunk that does not continue its file where the previous one ended (a tensor written out of
        order) gives up on that file's digest: the folder marker then reads the file back."""
        path, pos, data = self._locate(name, tensor, start)
        state = self._digests.get(path)
        if state is None:
            return
        if pos != state[1]:
            self._digests[path] = None
            return
        state[0].update(data)  # hashlib releases the GIL on large buffers
        state[1] += len(data)

    def _locate(self, name: str, tensor: torch.Tensor, start: int) -> tuple[Path, int, memoryview]:
        """File, byte offset and bytes of a chunk of ``name`` starting at element ``start`` (checked)."""
        if name not in self._place:
            raise KeyError(f"tensor {name!r} is not in the planned output")
        path, offset, dtype, numel = self._place[name]
        if tensor.dtype != dtype:
            raise TypeError(f"tensor {name!r}: planned dtype {dtype}, got {tensor.dtype}")
        flat = tensor.detach().reshape(-1).contiguous()  # (n,)
        if start < 0 or start + flat.numel() > numel:
            raise ValueError(
                f"tensor {name!r}: elements [{start}, {start + flat.numel()}) outside [0, {numel})"
            )
        data = memoryview(flat.view(torch.uint8).numpy()).cast("B")  # the chunk's bytes, shared
        return path, offset + start * flat.element_size(), data

    def close(self) -> None:
        """Finish: check completeness, record the digests (``hash_files``) and write the index (when there
        are several shards)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = self._fh_path = None
        incomplete = [k for k, n in self._written.items() if n != self._place[k][3]]
        if incomplete:
            raise RuntimeError(f"writer closed before these tensors were fully written: {_clip(incomplete)}")
        for path, state in self._digests.items():
            if state is not None and state[1] == state[2]:
                remember_sha256(path, state[0].hexdigest())
        if len(self.files) > 1:
            write_json(
                self.directory / SAFETENSORS_INDEX,
                {"metadata": {"total_size": self.total_size}, "weight_map": self._weight_map},
            )


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def save_checkpoint(
    tensors: Mapping[str, torch.Tensor], out: str | os.PathLike, max_shard_bytes: int | str = 5 * 10**9
) -> Path:
    """Write a state dict as (sharded) safetensors into the folder ``out``, atomically. Returns ``out``."""
    max_shard_bytes = parse_size(max_shard_bytes, "max_shard_bytes")
    with atomic_directory(out) as tmp:
        writer = ShardedSafetensorsWriter(
            tmp, [(k, v.shape, v.dtype) for k, v in tensors.items()], max_shard_bytes
        )
        for k, v in tensors.items():
            writer.write(k, v)
        writer.close()
    return Path(out)


def load_state_dict(source: Any) -> dict[str, torch.Tensor]:
    """Load a whole checkpoint (any form :func:`open_checkpoint` accepts) into memory."""
    with open_checkpoint(source) as ck:
        return ck.to_dict()
