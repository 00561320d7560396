"""The safetensors file format, read and written with positioned I/O one tensor (or one slice) at a time.

Format (https://github.com/huggingface/safetensors#format): 8 bytes little-endian header length ``n``, a
JSON header of ``n`` bytes mapping each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the end of the header) plus an optional ``"__metadata__"`` dict of strings, then the raw
little-endian data. We read with ``readinto`` into a freshly allocated tensor rather than memory-mapping the
file: mapped pages that have been touched count as resident memory of the process until the whole file is
unmapped, so a mapped merge of several multi-GB files shows a peak RSS of the size of the files; positioned
reads keep the resident set at the tensors actually alive (the OS page cache still speeds re-reads).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["DTYPES", "DTYPE_NAMES", "TensorInfo", "read_header", "read_range", "read_into", "plan_header"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the reference implementation's limit; guards against reading garbage

if sys.byteorder != "little":  # pragma: no cover - every platform torch supports today is little-endian
    raise ImportError(
        "layerwise.editing reads safetensors with native byte order and needs a little-endian host"
    )


class TensorInfo(tuple):
    """``(shape, dtype, begin)``: where a tensor lives in a safetensors file (``begin``: absolute bytes)."""

    __slots__ = ()

    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, begin: int) -> TensorInfo:
        return super().__new__(cls, (tuple(shape), dtype, begin))

    shape = property(lambda self: self[0])
    dtype = property(lambda self: self[1])
    begin = property(lambda self: self[2])


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a safetensors file, or a broken one: {what}")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of a safetensors file: ``({name: TensorInfo}, metadata)``.

    Checked as the reference ``safetensors`` library does when it opens a file, so that a broken file is
    refused before any tensor is read: header length within the file; a JSON object without duplicate keys;
    ``__metadata__`` a mapping of strings to strings; every tensor with exactly the keys ``dtype`` (a known
    one), ``shape`` (non-negative integers) and ``data_offsets`` (``[begin, end]``, ``begin <= end``);
    ``end - begin`` equal to the number of elements times the item size; the tensors, sorted by offset,
    contiguous and non-overlapping from byte 0 to exactly the end of the file. Names are returned in file
    order. Raises :class:`~layerwise.errors.CheckpointError` naming the file (and the tensor).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) != 8:
            raise _fail(path, "shorter than 8 bytes")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise _fail(path, f"header length {n} is implausible (limit {_MAX_HEADER})")
        if 8 + n > size:
            raise _fail(path, f"header length {n} runs past the end of the file ({size} bytes)")
        text = fh.read(n)
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _fail(path, f"bad JSON header: {err}") from None
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    entries = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise _fail(path, f"tensor {name!r} must have exactly dtype, shape and data_offsets, got {keys}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _fail(path, f"tensor {name!r} has unsupported dtype {dtype!r}; known: {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
            raise _fail(
                path, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_index(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _fail(
                path,
                f"tensor {name!r}: data_offsets must be [begin, end], 0 <= begin <= end, got {offsets!r}",
            )
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _fail(
                path,
                f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets "
                f"{offsets} span {offsets[1] - offsets[0]}",
            )
        entries.append((offsets[0], offsets[1], name, tuple(shape), DTYPES[dtype]))
    entries.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    infos: dict[str, TensorInfo] = {}
    for begin, end, name, shape, dtype in entries:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}] {what} (expected begin {pos})")
        pos = end
        infos[name] = TensorInfo(shape, dtype, 8 + n + begin)
    if pos != data_len:
        what = "truncated" if pos > data_len else "longer than its tensors"
        raise _fail(path, f"data section {what}: the header describes {pos} bytes, the file holds {data_len}")
    return infos, dict(metadata)


def read_range(fh, info: TensorInfo, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Read elements ``[start, stop)`` of the flattened tensor ``info`` from the open binary file ``fh``.

    Returns a new 1-D tensor ``(stop - start,)`` of ``info.dtype`` that owns its memory.
    """
    numel = 1
    for d in info.shape:
        numel *= d
    stop = numel if stop is None else stop
    out = torch.empty(stop - start, dtype=info.dtype)
    read_into(fh, info, out, start)
    return out


def read_into(fh, info: TensorInfo, out: torch.Tensor, start: int = 0) -> None:
    """Fill contiguous ``out`` (dtype ``info.dtype``) with elements ``[start, start + out.numel())``."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")  # raw bytes of ``out``, shared
    fh.seek(info.begin + start * out.element_size())
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{getattr(fh, 'name', 'file')}: truncated safetensors data")
        done += got


def plan_header(
    specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix + JSON, space-padded to 8 bytes) and each name's absolute byte offset.

    Tensors are laid out contiguously in the order of ``specs``.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets: dict[str, int] = {}
    pos = 0
    for name, shape, dtype in specs:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [pos, pos + nbytes],
        }
        offsets[name] = pos
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {name: len(prefix) + off for name, off in offsets.items()}
