"""Save and load RHM data sets (.pt or .npz) together with the rules that generated them.

A file holds the parameters, the rule tables, the labels, the input tokens and the rule choices, so the
full latent tree can be rebuilt (and is checked against the stored tokens on load). ``.pt`` files are
read with ``torch.load(weights_only=True)`` and ``.npz`` files with ``allow_pickle=False``: loading never
runs code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_path
from .rhm import RHM, RHMSample

__all__ = ["save_dataset", "load_dataset", "dataset_arrays", "write_arrays", "read_arrays"]

_PARAMS = ("v", "n_c", "m", "s", "L")
SUFFIXES = (".pt", ".npz")


def _check_suffix(path: Path, name: str) -> str:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{name} must end in one of {SUFFIXES}, got {str(path)!r}")
    return path.suffix


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
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(raw, dict):
            raise ValueError(f"{str(path)!r} does not hold a dict of tensors")
        return {k: torch.as_tensor(v) for k, v in raw.items()}
    with np.load(path, allow_pickle=False) as npz:
        return {k: torch.from_numpy(npz[k].copy()) for k in npz.files}


def save_dataset(path: str | os.PathLike, rhm: RHM, sample: RHMSample) -> Path:
    """Write ``sample`` and the rules of ``rhm`` to ``path`` (.pt or .npz), atomically."""
    return write_arrays(path, dataset_arrays(rhm, sample))


def load_dataset(path: str | os.PathLike) -> tuple[RHM, RHMSample]:
    """Read a file written by :func:`save_dataset`: the RHM (its rules) and the sample with its tree."""
    arrays = read_arrays(path)
    missing = [k for k in ("params", "labels", "tokens", "rules_0", "choices_0") if k not in arrays]
    if missing:
        raise ValueError(f"{str(path)!r} is not a layerwise RHM data file (missing {missing})")
    params = dict(zip(_PARAMS, arrays["params"].tolist(), strict=True))
    rules = [arrays[f"rules_{level}"].long() for level in range(params["L"])]
    rhm = RHM(**params, rules=rules)
    choices = [arrays[f"choices_{level}"].long() for level in range(params["L"])]
    sample = rhm.from_choices(arrays["labels"].long(), choices)
    if not torch.equal(sample.tokens, arrays["tokens"].long()):
        raise ValueError(f"{str(path)!r} is inconsistent: stored tokens do not match rules and choices")
    return rhm, sample
