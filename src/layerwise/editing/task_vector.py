"""Task vectors ``tau = theta_finetuned - theta_pretrained`` (Ilharco et al., ICLR 2023), computed lazily.

A :class:`TaskVector` is a recipe, not a copy: each tensor is computed on access from the checkpoints it
came from, so sums, negations and scalings of task vectors of multi-GB models cost no memory until their
tensors are read one at a time (``items()``, ``dot``, ``norm``, ``apply_to``). Only floating-point tensors
take part; integer buffers (``num_batches_tracked``, ``position_ids``…) are skipped and ``apply_to`` copies
them from the base. Tensors are computed in float32 (float64 when the checkpoint is float64).

Example
-------
>>> pre = {"w": torch.zeros(3), "n": torch.tensor(5)}
>>> ft = {"w": torch.tensor([1.0, -2.0, 2.0]), "n": torch.tensor(9)}
>>> tau = TaskVector(pre, ft)
>>> tau.keys(), tau.norm(1), (2 * tau).norm(2)
(['w'], 5.0, 6.0)
>>> (-tau).apply_to(pre, scale=0.5)["w"]
tensor([-0.5000,  1.0000, -1.0000])
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .checkpoints import Checkpoint, check_compatible, open_checkpoint

__all__ = ["TaskVector", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for a stored dtype: float64 stays, every other float type is promoted to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TaskVector:
    """A lazy task vector over the floating-point tensors of a model.

    Parameters
    ----------
    pretrained, finetuned : path, state dict or Checkpoint
        Anything :func:`~layerwise.editing.checkpoints.open_checkpoint` accepts. Keys and shapes must match.
    check_dtypes : bool
        Refuse checkpoints whose tensors differ in dtype (default True).
    """

    def __init__(self, pretrained: Any = None, finetuned: Any = None, *, check_dtypes: bool = True) -> None:
        if pretrained is None and finetuned is None:  # internal construction by _from_fn
            return
        pre, ft = open_checkpoint(pretrained), open_checkpoint(finetuned)
        check_compatible([pre, ft], check_dtypes=check_dtypes)
        keys = [k for k in pre.keys() if pre.dtype(k).is_floating_point]
        self._init(keys, {k: pre.shape(k) for k in keys}, lambda k: _diff(pre, ft, k))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> TaskVector:
        """A task vector holding given difference tensors (e.g. a merge result) in memory."""
        keys = [k for k, v in tensors.items() if v.dtype.is_floating_point]
        return cls._from_fn(
            keys,
            {k: tuple(tensors[k].shape) for k in keys},
            lambda k: tensors[k].to(compute_dtype(tensors[k].dtype)),
        )

    @classmethod
    def _from_fn(
        cls, keys: list[str], shapes: Mapping[str, tuple[int, ...]], fn: Callable[[str], torch.Tensor]
    ) -> TaskVector:
        tv = cls()
        tv._init(keys, shapes, fn)
        return tv

    def _init(
        self, keys: list[str], shapes: Mapping[str, tuple[int, ...]], fn: Callable[[str], torch.Tensor]
    ):
        self._keys = list(keys)
        self._shapes = dict(shapes)
        self._fn = fn

    # -- access -----------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names of the task vector."""
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key``."""
        return self._shapes[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(f"task vector has no tensor {key!r}")
        return self._fn(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time (each computed on demand)."""
        for k in self._keys:
            yield k, self._fn(k)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, materialised: ``{name: tensor}``."""
        return dict(self.items())

    # -- algebra (lazy) ---------------------------------------------------------------------------------
    def _check_same(self, other: TaskVector) -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"expected a TaskVector, got {type(other).__name__}")
        if self._shapes != other._shapes:
            a, b = set(self._shapes), set(other._shapes)
            diff = sorted(a ^ b) or sorted(k for k in a if self._shapes[k] != other._shapes[k])
            raise ValueError(f"task vectors differ in keys or shapes: {diff[:8]}")

    def __add__(self, other: TaskVector) -> TaskVector:
        if isinstance(other, numbers.Number) and other == 0:  # so that sum([...]) works
            return self
        self._check_same(other)
        return TaskVector._from_fn(self._keys, self._shapes, lambda k: self._fn(k) + other._fn(k))

    __radd__ = __add__

    def __neg__(self) -> TaskVector:
        return TaskVector._from_fn(self._keys, self._shapes, lambda k: -self._fn(k))

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    def __mul__(self, scale: float) -> TaskVector:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"a task vector can be multiplied by a real number, got {type(scale).__name__}")
        s = float(scale)
        return TaskVector._from_fn(self._keys, self._shapes, lambda k: self._fn(k) * s)

    __rmul__ = __mul__

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> TaskVector:
        """A new lazy task vector whose tensor ``k`` is ``fn(k, self[k])`` (e.g. LiNeS scaling)."""
        return TaskVector._from_fn(self._keys, self._shapes, lambda k: fn(k, self._fn(k)))

    # -- reductions (stream over tensors, accumulate in float64) -----------------------------------------
    def dot(self, other: TaskVector) -> float:
        """``sum_k <self[k], other[k]>`` over all tensors."""
        self._check_same(other)
        return float(sum(torch.sum(self._fn(k).double() * other._fn(k).double()) for k in self._keys))

    def norm(self, p: int = 2) -> float:
        """L1 (``p=1``) or L2 (``p=2``) norm of the whole flattened vector."""
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        total = sum(float(torch.linalg.vector_norm(self._fn(k).double(), ord=p)) ** p for k in self._keys)
        return total if p == 1 else total**0.5

    def apply_to(self, base: Any, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """``theta = base + scale * tau`` as a state dict in the base's dtypes; non-float tensors copied.

        Raises ``ValueError`` when ``base`` lacks a key of the task vector or its shape differs.
        """
        base_ck: Checkpoint = open_checkpoint(base)
        missing = [k for k in self._keys if k not in base_ck or tuple(base_ck.shape(k)) != self._shapes[k]]
        if missing:
            raise ValueError(
                f"base lacks or reshapes {len(missing)} tensor(s) of the task vector: {missing[:8]}"
            )
        mine = set(self._keys)
        out = {}
        for k in base_ck.keys():
            b = base_ck.get(k)
            if k in mine:
                out[k] = (b.to(compute_dtype(b.dtype)) + float(scale) * self._fn(k)).to(b.dtype)
            else:
                out[k] = b.clone()
        return out

    def __repr__(self) -> str:
        n = sum(_numel(s) for s in self._shapes.values())
        return f"TaskVector({len(self._keys)} tensors, {n} parameters)"


def _diff(pre: Checkpoint, ft: Checkpoint, key: str) -> torch.Tensor:
    dt = compute_dtype(pre.dtype(key))
    return ft.get(key).to(dt) - pre.get(key).to(dt)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
