"""Kernels from plain specifications (dicts, e.g. from a YAML config): ``make_kernel({...})(X, Y)``.

Keys: ``type`` = ``"full"`` | ``"local"`` | ``"conv"`` | ``"hierarchical"``;

- full / local / conv: ``base`` (registered base-kernel name, default ``"laplace"``), base-kernel
  parameters (e.g. ``sigma``), and for local/conv ``s`` (patch size) and ``dims`` (1 rings, 2 tori);
- hierarchical: ``filters`` (list of ints) and ``kind`` (``"ntk"`` or ``"nngp"``);
- any type: ``support: [start, stop]`` restricts the kernel to the coordinates ``start:stop`` of 1-D
  inputs (a target depending on one sub-tree or patch only).

>>> import torch
>>> k = make_kernel({"type": "local", "s": 2, "base": "laplace", "sigma": 2.0})
>>> k(torch.rand(4, 8)).shape
torch.Size([4, 4])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ParameterError, ParameterTypeError
from ._checks import check_int
from .base import full_kernel, get_base_kernel
from .hierarchical import hierarchical_kernel
from .local import conv_kernel, local_kernel

__all__ = ["KernelSpec", "make_kernel", "TYPES"]

TYPES = ("full", "local", "conv", "hierarchical")
_KEYS = {
    "full": {"base", "support"},
    "local": {"base", "s", "dims", "support"},
    "conv": {"base", "s", "dims", "support"},
    "hierarchical": {"filters", "kind", "support"},
}


@dataclass(frozen=True, eq=False)
class KernelSpec:
    """A kernel callable ``k(X, Y=None) -> Gram`` built from a spec (see the module docstring)."""

    spec: Mapping[str, Any]

    def __call__(self, X: torch.Tensor, Y: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        spec = dict(self.spec)
        kind = spec.pop("type")
        support = spec.pop("support", None)
        if support is not None:
            start, stop = support
            X = torch.as_tensor(X)
            if X.ndim != 2:
                raise ParameterError("support applies to 1-D inputs (n, d) only")
            X = X[:, start:stop]
            Y = None if Y is None else torch.as_tensor(Y)[:, start:stop]
        if kind == "hierarchical":
            return hierarchical_kernel(X, Y, spec.pop("filters"), spec.pop("kind", "ntk"), **kw)
        base = spec.pop("base", "laplace")
        if kind == "full":
            return full_kernel(X, Y, base, **spec, **kw)
        s = spec.pop("s")
        dims = spec.pop("dims", 1)
        fn = local_kernel if kind == "local" else conv_kernel
        return fn(X, Y, s, base, dims, **spec, **kw)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.spec.items())
        return f"KernelSpec({inner})"


def make_kernel(spec: Mapping[str, Any]) -> KernelSpec:
    """Validate ``spec`` (unknown keys and missing required keys raise naming them) and return the kernel."""
    if not isinstance(spec, Mapping):
        raise ParameterTypeError(f"kernel spec must be a mapping, got {type(spec).__name__}")
    spec = dict(spec)
    kind = spec.get("type")
    if kind not in TYPES:
        raise ParameterError(f"kernel spec 'type' must be one of {list(TYPES)}, got {kind!r}")
    allowed = set(_KEYS[kind])
    if kind != "hierarchical":
        base = get_base_kernel(spec.get("base", "laplace"))
        allowed |= set(base.params)
    unknown = sorted(set(spec) - allowed - {"type"})
    if unknown:
        raise ParameterError(
            f"kernel spec of type {kind!r} takes keys {sorted(allowed)}, got unknown {unknown}")
    required = {"local": ["s"], "conv": ["s"], "hierarchical": ["filters"]}.get(kind, [])
    missing = [k for k in required if k not in spec]
    if missing:
        raise ParameterError(f"kernel spec of type {kind!r} needs key(s) {missing}")
    if "support" in spec:
        sup = spec["support"]
        if not isinstance(sup, (list, tuple)) or len(sup) != 2:
            raise ParameterError(f"kernel spec 'support' must be [start, stop], got {sup!r}")
        start, stop = (check_int("support[0]", sup[0], low=0), check_int("support[1]", sup[1], low=1))
        if stop <= start:
            raise ParameterError(f"kernel spec 'support' must have start < stop, got {sup!r}")
        spec["support"] = (start, stop)
    if "filters" in spec:
        spec["filters"] = tuple(spec["filters"])
    return KernelSpec(spec)
