"""Convert pickled whole-module torch checkpoints to safetensors without running any code from the file.

The task-vector papers' public checkpoints (``task_vectors``, ``tangent_task_arithmetic``) are
``torch.save(model)`` of whole ``ImageEncoder`` modules: unpickling them normally imports (an old) open_clip
and runs whatever the pickle names. :func:`read_pickled_checkpoint` instead walks the pickle with a
restricted unpickler (:class:`RestrictedUnpickler`):

- tensors, parameters and storages are rebuilt by layerwise's own functions (the bytes are read from the
  file, nothing of torch's pickling machinery is called);
- ``collections.OrderedDict``, ``set``/``frozenset``, ``torch.Size``, ``torch.device`` and dtypes are allowed;
- any other class is replaced by an inert *stand-in*, never imported: instantiating it (``NEWOBJ``,
  ``copyreg._reconstructor``) gives an object that only records its state (``_parameters``, ``_buffers``,
  ``_modules``, ...), so a module's tensors are found where ``state_dict()`` would find them;
- *calling* a stand-in (a ``__reduce__`` that runs a function: ``os.system``, ``builtins.eval``,
  ``subprocess.Popen``, an enum constructor ...) is refused in one line naming it. Names from modules that can
  run code (``os``, ``subprocess``, ``builtins``, ``sys``, ``importlib``, ``torch`` functions outside the
  rebuild list, ...) are refused as soon as the pickle names them.

``allow_opaque_calls=True`` records calls of stand-ins as inert placeholders instead (needed when the
pickle also holds, say, torchvision transforms with enum members); the real function is still never run.

Both torch formats are read: the zip format (``torch.save`` default since 1.6) and the legacy format
(``_use_new_zipfile_serialization=False``). The result is written with :func:`convert_checkpoint` as one
safetensors file, atomically (``layerwise convert-checkpoint IN.pt --out OUT.safetensors``).

Example
-------
>>> import io, torch
>>> buf = io.BytesIO(); torch.save({"w": torch.arange(3.0)}, buf)
>>> read_pickled_checkpoint(io.BytesIO(buf.getvalue()))["w"]
tensor([0., 1., 2.])
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError, ParameterError, ParameterTypeError

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "read_pickled_checkpoint", "convert_checkpoint"]

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
        torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    )
}
# modules whose names are refused as soon as the pickle mentions them (they can run code or touch the system)
_DENIED_MODULES = (
    "os", "posix", "nt", "subprocess", "commands", "sys", "builtins", "__builtin__", "importlib", "shutil",
    "socket", "pickle", "_pickle", "marshal", "types", "runpy", "code", "codeop", "pty", "ctypes", "io",
    "_io", "eval", "exec", "webbrowser", "multiprocessing", "threading", "signal", "tempfile", "glob",
    "platform", "inspect", "dill", "torch", "copyreg", "_codecs", "codecs", "asyncio", "http", "urllib",
    "ftplib", "smtplib", "sqlite3", "zipimport", "pydoc", "timeit", "cProfile", "profile", "pdb", "bdb",
    "trace", "distutils", "setuptools", "pip", "site", "zipfile", "tarfile", "gzip", "bz2", "lzma", "yaml",
    "jinja2", "ctypes", "cffi", "gc", "weakref", "atexit", "resource", "select", "selectors", "ssl",
)


class UnsafePickleError(CheckpointError):
    """The pickle names or calls something outside the allow-list (the message names it)."""


class _Frozen:
    """Objects the pickle may name but never modify: ``BUILD`` on them (which would set attributes of
    layerwise's own objects for the rest of the process) is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(
            f"refusing to set the state of {type(self).__name__} (an allow-listed object)"
        )


class _Fn(_Frozen):
    """An allow-listed function (layerwise's own re-implementation), callable but not modifiable."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


class _TensorRef(_Frozen):
    """A tensor to be cut from a storage once all storages are read (legacy files store them last)."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> torch.Tensor:
        flat = self.storage.tensor()  # (numel,) of the storage's dtype
        need = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride, strict=True)) + 1
        if any(s == 0 for s in self.size):
            return torch.empty(self.size, dtype=flat.dtype)
        if self.offset < 0 or any(st < 0 for st in self.stride) or need > flat.numel():
            raise CheckpointError(
                f"a tensor of size {list(self.size)} reaches past its storage ({flat.numel()} elements)"
            )
        return flat.as_strided(self.size, self.stride, self.offset).clone()


class _Storage(_Frozen):
    """Bytes of one storage and its dtype (filled when read)."""

    __slots__ = ("dtype", "numel", "data")

    def __init__(self, dtype: torch.dtype, numel: int) -> None:
        self.dtype, self.numel, self.data = dtype, numel, None

    def tensor(self) -> torch.Tensor:
        if self.data is None:
            raise CheckpointError("a storage referenced by a tensor was never found in the file")
        size = torch.empty((), dtype=self.dtype).element_size()
        if len(self.data) < self.numel * size:
            raise CheckpointError(
                f"a storage holds {len(self.data)} bytes, {self.numel * size} expected (truncated file?)"
            )
        if self.numel == 0:
            return torch.empty(0, dtype=self.dtype)
        return torch.frombuffer(bytearray(self.data[: self.numel * size]), dtype=self.dtype)


class _StorageType(_Frozen):
    """What ``torch.FloatStorage`` & co. become: a dtype marker (never torch's class)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class StandIn:
    """An inert object standing for an instance of a class the converter never imports.

    ``state`` holds what the pickle gave it (for an ``nn.Module`` its ``__dict__``: ``_parameters``,
    ``_buffers``, ``_modules``, ...); ``qualname`` the class it stands for.
    """

    qualname = "?"

    def __init__(self) -> None:
        self.state: Any = None
        self.args: tuple = ()

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on a dict subclass
        if not isinstance(self.state, dict):
            self.state = {}
        self.state[key] = value

    def append(self, value: Any) -> None:  # APPENDS on a list subclass
        self.args = (*self.args, value)

    def extend(self, values: Any) -> None:
        self.args = (*self.args, *values)

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualname}>"


def _stand_in_class(module: str, name: str, allow_calls: bool) -> type:
    qual = f"{module}.{name}"

    def new(cls, *args: Any, **kwargs: Any):  # NEWOBJ / copyreg._reconstructor: no code of the class runs
        obj = object.__new__(cls)
        StandIn.__init__(obj)
        obj.args = args
        return obj

    class _Meta(type):
        def __call__(cls, *args: Any, **kwargs: Any):
            if not allow_calls:
                raise UnsafePickleError(
                    f"refusing to call {qual} while unpickling: only tensors, state dicts and module classes "
                    "rebuilt from their state are allowed (allow_opaque_calls / --allow-opaque-calls records "
                    "such calls as inert placeholders without running them)"
                )
            obj = cls.__new__(cls)
            obj.args = args
            return obj

    return _Meta(name, (StandIn,), {"__new__": new, "qualname": qual, "__module__": "layerwise.stand_in"})


# -- the allowed functions, re-implemented (never torch's own) ---------------------------------------------
def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"a tensor's storage must come from the file, got {type(storage).__name__}")
    try:
        return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))
    except (TypeError, ValueError):
        raise UnsafePickleError("malformed tensor record (offset, size, stride must be integers)") from None


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    if not isinstance(data, _TensorRef):
        raise UnsafePickleError(f"a parameter must wrap a tensor, got {type(data).__name__}")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in (_FN_TENSOR, _FN_PARAMETER) or new_type not in (_TENSOR, _PARAMETER):
        raise UnsafePickleError("torch._tensor._rebuild_from_type_v2 is only allowed for plain tensors")
    return func(*args)


class _TorchType(_Frozen):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_TENSOR, _PARAMETER = _TorchType("torch.Tensor"), _TorchType("torch.nn.Parameter")


def _ordered_dict(*args: Any) -> OrderedDict:
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple, dict))):
        raise UnsafePickleError("collections.OrderedDict called with unexpected arguments")
    return OrderedDict(*args)


def _set(*args: Any) -> set:
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
        raise UnsafePickleError("builtins.set called with unexpected arguments")
    return set(*args)


def _frozenset(*args: Any) -> frozenset:
    return frozenset(_set(*args))


def _size(*args: Any) -> tuple[int, ...]:
    if len(args) != 1 or not all(isinstance(v, int) for v in args[0]):
        raise UnsafePickleError("torch.Size called with unexpected arguments")
    return tuple(args[0])


def _device(*args: Any) -> str:
    if not args or not all(isinstance(a, (str, int)) for a in args):
        raise UnsafePickleError("torch.device called with unexpected arguments")
    return ":".join(str(a) for a in args)


def _encode(text: Any, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles write bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("_codecs.encode is only allowed for latin-1 byte strings")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg._reconstructor(cls, object, None): instantiate without running the class's code
    if not (isinstance(cls, type) and issubclass(cls, StandIn)) or base is not object or state is not None:
        raise UnsafePickleError("copyreg._reconstructor is only allowed for plain classes")
    return cls.__new__(cls)


_FN_TENSOR, _FN_PARAMETER = _Fn(_rebuild_tensor), _Fn(_rebuild_parameter)
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _FN_TENSOR,
    ("torch._utils", "_rebuild_tensor"): _FN_TENSOR,
    ("torch._utils", "_rebuild_parameter"): _FN_PARAMETER,
    ("torch._utils", "_rebuild_parameter_with_state"): _FN_PARAMETER,
    ("torch._tensor", "_rebuild_from_type_v2"): _Fn(_rebuild_from_type_v2),
    ("torch", "Tensor"): _TENSOR,
    ("torch._tensor", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch", "Size"): _Fn(_size),
    ("torch", "device"): _Fn(_device),
    ("collections", "OrderedDict"): _Fn(_ordered_dict),
    ("builtins", "set"): _Fn(_set),
    ("builtins", "frozenset"): _Fn(_frozenset),
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): _Fn(_reconstructor),
    ("_codecs", "encode"): _Fn(_encode),
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
_ALLOWED.update({("torch", name): name for name in _DTYPE_NAMES})


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose ``find_class`` never imports: allow-listed rebuild functions, or inert
    stand-ins for classes, or a one-line :class:`UnsafePickleError` naming what was refused.

    Parameters
    ----------
    file : binary file
    storage_loader : callable ``(key, dtype, numel) -> _Storage`` for the persistent storage records
    allow_opaque_calls : record calls of unknown callables as inert placeholders instead of refusing them
    """

    def __init__(self, file: BinaryIO, storage_loader: Any = None, allow_opaque_calls: bool = False) -> None:
        super().__init__(file)
        self._storage_loader = storage_loader
        self._allow_calls = allow_opaque_calls
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles use Python 2 names (``__builtin__``, ``commands`` for subprocess): map them
        # the way pickle does before judging them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        top = module.split(".")[0]
        torch_class = module.startswith("torch.nn.modules.") and name[:1].isupper()
        if (top in _DENIED_MODULES and not torch_class) or not module or "." in name:
            raise UnsafePickleError(
                f"refusing {module}.{name}: the pickle names a function outside the allow-list (tensors, "
                "storages, OrderedDict, module classes)"
            )
        if key not in self._stand_ins:
            self._stand_ins[key] = _stand_in_class(module, name, self._allow_calls)
        return self._stand_ins[key]

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise UnsafePickleError(f"unexpected persistent id {type(pid).__name__}")
        if pid[0] == "module" and len(pid) >= 2:  # legacy whole-module saves: (tag, class, file, source)
            return pid[1]  # the stand-in class; the source text is ignored, never executed
        if pid[0] != "storage" or len(pid) < 5 or not isinstance(pid[1], _StorageType):
            raise UnsafePickleError(f"unexpected persistent id {pid[:1]!r}")
        if self._storage_loader is None:
            raise UnsafePickleError("a storage record outside a torch checkpoint")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(numel, int) or numel < 0:
            raise UnsafePickleError("malformed storage record")
        return self._storage_loader(key, storage_type.dtype, numel)


# -- files ----------------------------------------------------------------------------------------------
def _load_zip(raw: bytes, allow_calls: bool) -> Any:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError("not a torch zip checkpoint (no single <name>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        order = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if order != "little":
            raise CheckpointError(f"byte order {order!r} is not supported")
        cache: dict[str, _Storage] = {}

        def loader(key: str, dtype: torch.dtype, numel: int) -> _Storage:
            if key not in cache:
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise CheckpointError(f"storage {key!r} missing from the archive (truncated file?)")
                cache[key] = _Storage(dtype, numel)
                cache[key].data = zf.read(member)
            return cache[key]

        return _materialize(RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), loader, allow_calls).load())


def _load_legacy(fh: BinaryIO, allow_calls: bool) -> Any:
    header = [RestrictedUnpickler(fh).load() for _ in range(3)]  # magic number, protocol, sys info
    if header[0] != 0x1950A86A20F9469CFC6C:
        raise CheckpointError("not a torch checkpoint (wrong magic number)")
    if isinstance(header[2], Mapping) and header[2].get("little_endian") is False:
        raise CheckpointError("big-endian legacy checkpoints are not supported")
    storages: dict[str, _Storage] = {}

    def loader(key: str, dtype: torch.dtype, numel: int) -> _Storage:
        return storages.setdefault(key, _Storage(dtype, numel))

    obj = RestrictedUnpickler(fh, loader, allow_calls).load()
    keys = RestrictedUnpickler(fh).load()
    if not isinstance(keys, list):
        raise CheckpointError("malformed legacy checkpoint (no storage key list)")
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise CheckpointError(f"storage {key!r} listed but never used")
        count = fh.read(8)
        if len(count) != 8:
            raise CheckpointError("truncated legacy checkpoint")
        (n,) = struct.unpack("<q", count)
        size = torch.empty((), dtype=st.dtype).element_size()
        if n != st.numel:
            raise CheckpointError(f"storage {key!r}: {n} elements recorded, {st.numel} expected")
        st.data = fh.read(n * size)
    return _materialize(obj)


def _materialize(obj: Any, depth: int = 0) -> Any:
    """Replace every tensor record by a tensor (containers and stand-in states walked)."""
    if depth > 200:
        raise CheckpointError("the pickle is nested too deeply")
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _materialize(v, depth + 1)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, depth + 1) for v in obj)
    if isinstance(obj, StandIn):
        obj.state = _materialize(obj.state, depth + 1)
    return obj


def _module_state(obj: StandIn, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    """``state_dict()`` of a stand-in module: parameters, persistent buffers, sub-modules in order."""
    if depth > 100:
        raise CheckpointError("modules nested too deeply")
    state = obj.state[0] if isinstance(obj.state, tuple) and obj.state else obj.state
    if not isinstance(state, Mapping):
        return
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, torch.Tensor) and not (group == "_buffers" and name in skip):
                out[prefix + name] = value
    for name, sub in (state.get("_modules") or {}).items():
        if isinstance(sub, StandIn):
            _module_state(sub, f"{prefix}{name}.", out, depth + 1)


def _tensors(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, StandIn):
        out: dict[str, torch.Tensor] = {}
        _module_state(obj, "", out)
        if not out:
            raise CheckpointError(f"{source}: a pickled {obj.qualname} without parameters or buffers")
        return out
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, (Mapping, StandIn)) and inner:
                return _tensors(inner, source)
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
    raise CheckpointError(
        f"{source}: expected a state dict or a pickled module, got {type(obj).__name__}"
    )


def read_pickled_checkpoint(
    source: str | os.PathLike | BinaryIO, *, allow_opaque_calls: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors of a torch checkpoint (state dict or whole pickled module), read without running its code.

    Parameters
    ----------
    source : path or binary file
        A ``torch.save`` file, zip or legacy format.
    allow_opaque_calls : bool
        Record calls of classes/functions outside the allow-list as inert placeholders instead of refusing
        (they are never run either way).

    Returns
    -------
    dict
        ``name -> tensor`` in ``state_dict()`` order for a module (parameters, persistent buffers,
        sub-modules), or the state dict's own order (``{"state_dict": ...}`` wrappers unwrapped).

    Raises
    ------
    UnsafePickleError
        One line naming the refused function or class.
    CheckpointError
        Not a torch checkpoint, truncated, or no tensors.
    """
    if not isinstance(allow_opaque_calls, bool):
        raise ParameterTypeError(f"allow_opaque_calls must be True or False, got {allow_opaque_calls!r}")
    name = str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        raw = path.read_bytes()
    else:
        raw = source.read()
    try:
        if raw[:4] == b"PK\x03\x04":
            obj = _load_zip(raw, allow_opaque_calls)
        else:
            obj = _load_legacy(io.BytesIO(raw), allow_opaque_calls)
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{name}: {err}") from None
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error, RecursionError, MemoryError, OverflowError) as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{name}: not a readable torch checkpoint (truncated or corrupted?): "
            f"{type(err).__name__}: {first}"
        ) from None
    return _tensors(obj, name)


def convert_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefix: str | None = None,
    overwrite: bool = False,
    allow_opaque_calls: bool = False,
) -> dict[str, Any]:
    """Read ``source`` with :func:`read_pickled_checkpoint` and write ``out`` (one safetensors file, atomic).

    Parameters
    ----------
    source, out : paths (``out`` must not exist unless ``overwrite``; never the input)
    prefix : keep only tensors whose names start with ``prefix`` and strip it (``"model."`` turns the
        task-vector ``ImageEncoder``'s ``model.visual.*`` into open_clip's ``visual.*``)
    overwrite : replace an existing ``out`` file
    allow_opaque_calls : see :func:`read_pickled_checkpoint`

    Returns
    -------
    dict
        ``{"out", "tensors", "parameters" (element count), "dtypes"}``.
    """
    from safetensors.torch import save_file

    from .._io import atomic_path, check_output_file

    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        raise ParameterError(f"prefix must be a non-empty string or None, got {prefix!r}")
    target = check_output_file(out, overwrite=overwrite, inputs=[source])
    if target.suffix != ".safetensors":
        raise ParameterError(f"out must end in .safetensors, got {out!s}")
    tensors = read_pickled_checkpoint(source, allow_opaque_calls=allow_opaque_calls)
    if prefix is not None:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise ParameterError(f"prefix {prefix!r} matches no tensor name of {source}")
    seen: set[int] = set()
    for k, v in tensors.items():  # a module listed twice (tied weights): safetensors wants separate copies
        if id(v) in seen:
            tensors[k] = v.clone()
        seen.add(id(v))
    with atomic_path(target) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    return {
        "out": target,
        "tensors": len(tensors),
        "parameters": sum(v.numel() for v in tensors.values()),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()}),
    }
