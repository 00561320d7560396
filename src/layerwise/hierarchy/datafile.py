"""Save and load RHM data sets (.pt or .npz) together with the rules that generated them.

A file holds the parameters, the rule tables, the labels, the input tokens and the rule choices, so the
full latent tree can be rebuilt (and is checked against the stored tokens on load). ``.pt`` files are
read with ``torch.load(weights_only=True)`` and ``.npz`` files with ``allow_pickle=False``: loading never
runs code. A file that is truncated, corrupted, not of this format or holding out-of-range values (a label
outside ``[0, n_c)``, a rule choice outside ``[0, m)``) raises :class:`~layerwise.errors.InputDataError`
naming the file, before anything is computed or written.
"""

from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_path
from .._resources import check_memory
from ..errors import InputDataError, LayerwiseError, ParameterError
from .rhm import RHM, RHMSample

__all__ = [
    "save_dataset",
    "load_dataset",
    "dataset_arrays",
    "write_arrays",
    "read_arrays",
    "check_data_path",
]

_PARAMS = ("v", "n_c", "m", "s", "L")
SUFFIXES = (".pt", ".npz")


def _check_suffix(path: Path, name: str) -> str:
    if path.suffix not in SUFFIXES:
        raise ParameterError(f"{name} must end in one of {SUFFIXES}, got {str(path)!r}")
    return path.suffix


def check_data_path(path: str | os.PathLike, name: str = "path") -> Path:
    """Return ``path`` as a Path if it ends in .pt or .npz; else raise ParameterError naming ``name``."""
    path = Path(path)
    _check_suffix(path, name)
    return path


def dataset_arrays(rhm: RHM, sample: RHMSample) -> dict[str, torch.Tensor]:
    """The arrays of a data file: ``params``, ``rules_<l>``, ``labels``, ``tokens``, ``choices_<l>``."""
    arrays: dict[str, torch.Tensor] = {
        "params": torch.tensor([getattr(rhm, k) for k in _PARAMS], dtype=torch.long),
        "labels": sample.labels,
        "tokens": sample.tokens,
    }
    for level in range(rhm.L):
        arrays[f"rules_{level}"] = rhm.rules[level]
        arrays[f"choices_{level}"] = sample.choices[level]
    return arrays


def write_arrays(path: str | os.PathLike, arrays: dict[str, torch.Tensor], name: str = "path") -> Path:
    """Write named tensors to ``path`` (.pt or .npz, by suffix), atomically; ``name`` is used in errors."""
    path = Path(path)
    suffix = _check_suffix(path, name)
    with atomic_path(path) as tmp:
        if suffix == ".pt":
            torch.save(arrays, tmp)
        else:
            np.savez_compressed(tmp, **{k: v.numpy() for k, v in arrays.items()})
    return path


def read_arrays(path: str | os.PathLike, name: str = "path") -> dict[str, torch.Tensor]:
    """Read the named tensors of a .pt (``weights_only=True``) or .npz (``allow_pickle=False``) file."""
    path = Path(path)
    suffix = _check_suffix(path, name)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such data file", str(path))
    # Both formats are zip archives; their members' uncompressed sizes bound what loading allocates
    # (a small compressed file may declare a huge array).
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise InputDataError(f"{str(path)!r} is not a readable {suffix} file ({err})") from None
    check_memory(2 * unpacked, f"reading {str(path)!r}")
    try:
        if suffix == ".pt":
            raw = torch.load(path, weights_only=True, map_location="cpu")
            if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
                raise InputDataError(f"{str(path)!r} does not hold a dict of named tensors")
            return {k: torch.as_tensor(v) for k, v in raw.items()}
        with np.load(path, allow_pickle=False) as npz:
            return {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    except (LayerwiseError, MemoryError):
        raise
    except Exception as err:  # truncated, corrupted or foreign content: never a traceback
        # (torch/numpy raise RuntimeError, EOFError, BadZipFile, UnpicklingError, KeyError, ValueError,
        # zlib.error, TypeError... depending on where the file is broken)
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise InputDataError(
            f"{str(path)!r} is not a readable {suffix} data file ({type(err).__name__}: {detail})"
        ) from None


def save_dataset(path: str | os.PathLike, rhm: RHM, sample: RHMSample) -> Path:
    """Write ``sample`` and the rules of ``rhm`` to ``path`` (.pt or .npz), atomically."""
    return write_arrays(path, dataset_arrays(rhm, sample))


def _integers(arrays: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], low: int, high: int,
              where: str) -> torch.Tensor:
    """``arrays[key]`` as int64 after checking its dtype, shape and that values lie in ``[low, high)``."""
    if key not in arrays:
        raise InputDataError(f"{where} is not a layerwise RHM data file (missing {key!r})")
    value = arrays[key]
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise InputDataError(f"{where}: {key} must hold integers, got {value.dtype}")
    if tuple(value.shape) != shape:
        raise InputDataError(f"{where}: {key} must have shape {shape}, got {tuple(value.shape)}")
    value = value.long()
    if value.numel() and (int(value.min()) < low or int(value.max()) >= high):
        raise InputDataError(
            f"{where}: {key} must hold values in [{low}, {high}), got values in "
            f"[{int(value.min())}, {int(value.max())}]"
        )
    return value


def load_dataset(path: str | os.PathLike) -> tuple[RHM, RHMSample]:
    """Read a file written by :func:`save_dataset`: the RHM (its rules) and the sample with its tree.

    Every array is checked (integer dtype, shape, range: labels in ``[0, n_c)``, rule choices in
    ``[0, m)``) and the stored tokens must equal the rules applied to the choices; any violation raises
    :class:`~layerwise.errors.InputDataError` naming the file.
    """
    arrays = read_arrays(path)
    where = repr(str(path))
    missing = [k for k in ("params", "labels", "tokens", "rules_0", "choices_0") if k not in arrays]
    if missing:
        raise InputDataError(f"{where} is not a layerwise RHM data file (missing {missing})")
    raw = _integers(arrays, "params", (len(_PARAMS),), -(1 << 63), 1 << 63, where)
    params = dict(zip(_PARAMS, raw.tolist(), strict=True))
    if not 1 <= params["L"] <= len(arrays):
        raise InputDataError(f"{where}: depth L={params['L']} does not match the {len(arrays)} arrays stored")
    try:
        rules = [
            _integers(arrays, f"rules_{level}", tuple(arrays.get(f"rules_{level}", torch.empty(0)).shape),
                      0, max(params["v"], 1), where)
            for level in range(params["L"])
        ]
        rhm = RHM(**params, rules=rules)
    except InputDataError:
        raise
    except LayerwiseError as err:
        raise InputDataError(f"{where}: invalid RHM in the file: {err}") from None
    if arrays["labels"].dim() != 1:
        shape = tuple(arrays["labels"].shape)
        raise InputDataError(f"{where}: labels must be one-dimensional, got shape {shape}")
    n = int(arrays["labels"].shape[0])
    labels = _integers(arrays, "labels", (n,), 0, rhm.n_c, where)
    choices = [
        _integers(arrays, f"choices_{level}", (n, rhm.s**level), 0, rhm.m, where) for level in range(rhm.L)
    ]
    tokens = _integers(arrays, "tokens", (n, rhm.d), 0, rhm.v, where)
    sample = rhm.from_choices(labels, choices)
    if not torch.equal(sample.tokens, tokens):
        raise InputDataError(f"{where} is inconsistent: stored tokens do not match rules and choices")
    return rhm, sample
