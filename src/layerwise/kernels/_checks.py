"""Argument checks shared by the kernel functions (errors name the parameter, allowed and received values).

Private helpers: the public functions call them once, where work starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._resources import check_memory
from .._validation import check_choice, check_float, check_int
from ..errors import InputDataError, ParameterError, ParameterTypeError

__all__ = ["DEFAULT_DTYPE", "DEFAULT_BLOCK_ELEMENTS", "as_data", "as_pair", "block_rows", "blocked_gram",
           "check_choice", "check_float", "check_int"]

DEFAULT_DTYPE = torch.float64

# Elements (not bytes) of the main per-block temporary: 2**18 float64 = 2 MB, so that the ~10 elementwise
# passes a block makes over it run from cache (measured: 2-3x less CPU time than 64 MB blocks).
DEFAULT_BLOCK_ELEMENTS = 2**18


def as_data(name: str, value: Any, *, ndim: int | None, dtype: torch.dtype | None,
            device: torch.device | str | None = None) -> torch.Tensor:
    """``value`` as a finite float tensor with ``ndim`` dimensions (any if None; float64 unless ``dtype``)."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ParameterTypeError(f"{name} must be a tensor or an array, got {type(value).__name__}") \
                from err
    if value.dtype == torch.bool or value.is_complex():
        raise ParameterTypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ParameterError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.ndim == 0 or value.shape[0] == 0:
        raise ParameterError(f"{name} must hold at least one point, got shape {tuple(value.shape)}")
    target = DEFAULT_DTYPE if dtype is None else dtype
    value = value.to(device=device if device is not None else value.device, dtype=target)
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ParameterError(f"{name} must be finite, got NaN or inf at {bad} entries")
    return value


def as_pair(X: Any, Y: Any, *, ndim: int, dtype: torch.dtype | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate X and the optional Y (same trailing shape, moved to X's device)."""
    X = as_data("X", X, ndim=ndim, dtype=dtype)
    if Y is None:
        return X, None
    Y = as_data("Y", Y, ndim=ndim, dtype=X.dtype, device=X.device)
    if Y.shape[1:] != X.shape[1:]:
        raise ParameterError(
            f"Y must have the trailing shape of X {tuple(X.shape[1:])}, got {tuple(Y.shape[1:])}")
    return X, Y


def block_rows(block_size: int | None, elements_per_row: int) -> int:
    """Rows per block: ``block_size`` if given, else as many as fit :data:`DEFAULT_BLOCK_ELEMENTS`."""
    if block_size is not None:
        return check_int("block_size", block_size, low=1)
    return max(1, DEFAULT_BLOCK_ELEMENTS // max(1, elements_per_row))


def blocked_gram(
    fn: Callable[[slice, slice], torch.Tensor], n: int, m: int | None, rows: int, *,
    dtype: torch.dtype, device: torch.device, max_abs: float | None = None,
) -> torch.Tensor:
    """Fill an (n, m) Gram matrix block of rows by block of rows: ``out[r, c] = fn(r, c)`` for slices.

    With ``m is None`` the matrix is (n, n) and symmetric: each block computes only the columns from its
    first row on, and is mirrored into the lower triangle (half the work).

    On CPU with ``torch.get_num_threads() > 1``, blocks are spread over that many Python threads, each
    running torch single-threaded (intra-op threads are set to 1 during the call and restored after): the
    blocks are small and independent, and per-operation OpenMP parallelism on small tensors mostly spins
    at barriers, badly so when the cores are shared. Blocks write disjoint parts of ``out``.

    The (n, m) output's memory is checked before it is allocated (``ResourceError`` with the estimate), and
    a result with NaN or inf entries (finite inputs so large that squared norms or products overflow
    ``dtype``; ``max_abs`` is the largest input magnitude, for the message) raises ``InputDataError``.
    """
    cols = n if m is None else m
    check_memory(n * cols * torch.empty((), dtype=dtype).element_size(),
                 f"a {n} x {cols} Gram matrix ({dtype})", device)
    out = _fill(fn, n, m, rows, dtype=dtype, device=device)
    # A NaN or inf entry makes the sum non-finite (a cheap reduction); only then look entry by entry (an
    # overflowing sum of finite entries is not an error).
    if not math.isfinite(float(out.sum())) and not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        size = f" (largest |input| {max_abs:.3g})" if max_abs is not None else ""
        raise InputDataError(
            f"the Gram matrix has {bad} NaN or inf entries although the inputs are finite: the inputs are "
            f"too large for {dtype}{size}, their squared norms or inner products overflow; rescale the "
            "inputs (and a Laplace/Gaussian sigma with them)")
    return out


def _fill(
    fn: Callable[[slice, slice], torch.Tensor], n: int, m: int | None, rows: int, *,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    out = torch.empty(n, n if m is None else m, dtype=dtype, device=device)
    starts = list(range(0, n, rows))

    def run(i0: int) -> None:
        i1 = min(n, i0 + rows)
        if m is not None:
            out[i0:i1] = fn(slice(i0, i1), slice(0, m))
            return
        block = fn(slice(i0, i1), slice(i0, n))  # (i1 - i0, n - i0)
        out[i0:i1, i0:] = block
        out[i1:, i0:i1] = block[:, i1 - i0:].T
        # The diagonal sub-block is computed as a whole: make it exactly symmetric.
        diag = out[i0:i1, i0:i1]
        out[i0:i1, i0:i1] = (diag + diag.T) / 2

    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(starts) == 1:
        for i0 in starts:
            run(i0)
        return out
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(run, starts))  # re-raises the first error
    finally:
        torch.set_num_threads(threads)
    return out
