"""Local and convolutional kernels on rings (1-D) and tori (2-D) (Favero, Cagnetta, Wyart, NeurIPS 2021).

For an input ``x`` with periodic boundaries and its ``|P|`` patches ``x_i`` (``s`` consecutive coordinates
on a ring of ``d`` sites, or ``s x s`` squares on an ``h x w`` torus; one patch per site, so ``|P| = d`` or
``h w``), and a base kernel ``C`` (:mod:`layerwise.kernels.base`)::

    K_LC(x, y) = (1/|P|)   sum_i   C(x_i, y_i)          (local: one filter per position)
    K_CN(x, y) = (1/|P|^2) sum_i,j C(x_i, y_j)          (convolutional: shared filter, translation-invariant)

so that ``K_CN(x, y) = (1/|P|) sum_r K_LC(x, T_r y)`` over the translations ``T_r`` of the ring or torus.

Computation (:mod:`._patches`): Gram matrices are filled in blocks of rows (one triangle only when
``Y is None``). Within a block, the statistic the base kernel needs (distance, cosine or inner product) for
all patch pairs is one batched matrix product (vectorised over patch shifts); the base kernel is applied
in place. Temporaries are ``(|P|, rows, N)`` (local) or ``(rows, |P|, N, |P|)`` (conv) with ``rows`` set by a
fixed budget (2**18 elements, 2 MB in float64, so the passes run from cache), so memory is
O(rows x N): never a ``(|P|, N, N)`` tensor.

>>> import torch
>>> X = torch.rand(6, 8, dtype=torch.float64)
>>> K = local_kernel(X, None, s=2, base="laplace", sigma=2.0)
>>> K.shape, bool(torch.equal(K, K.T))
(torch.Size([6, 6]), True)
"""

from __future__ import annotations

from typing import Any

import torch

from ._checks import as_pair, check_choice, check_int
from ._patches import gram, patch_index
from .base import BaseKernel, get_base_kernel

__all__ = ["patch_index", "local_kernel", "conv_kernel"]


def _kernel(X: Any, Y: Any, s: Any, base: str | BaseKernel, dims: Any, dtype: torch.dtype | None,
            block_size: int | None, params: dict[str, Any], conv: bool) -> torch.Tensor:
    kernel = get_base_kernel(base)
    fn = kernel.bind(params)
    dims = check_choice("dims", dims, (1, 2))
    X, Y = as_pair(X, Y, ndim=1 + dims, dtype=dtype)
    shape = tuple(X.shape[1:])
    s = check_int("s", s, low=1, high=min(shape))
    idx = patch_index(shape, s).to(X.device)
    Xf = X.reshape(X.shape[0], -1)  # (n, D), D = d or h w
    Yf = None if Y is None else Y.reshape(Y.shape[0], -1)
    return gram(fn, kernel.kind, Xf, Yf, idx, conv=conv, block_size=block_size)


def local_kernel(
    X: torch.Tensor,
    Y: torch.Tensor | None,
    s: int,
    base: str | BaseKernel = "laplace",
    dims: int = 1,
    *,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    **params: Any,
) -> torch.Tensor:
    """Local kernel ``K_LC(x, y) = mean_i C(x_i, y_i)`` over the periodic patches of rings or tori.

    Parameters
    ----------
    X : (n, d) ring inputs (``dims=1``) or (n, h, w) torus inputs (``dims=2``).
    Y : (m, ...) inputs with X's trailing shape, or None for ``Y = X`` (symmetric, half the work).
    s : patch size: ``s`` sites on a ring, ``s x s`` on a torus (1 <= s <= d, or <= min(h, w)).
    base : base-kernel name (``"laplace"``, ``"ntk_relu"``, ``"nngp_relu"``, ``"gaussian"`` or one
        registered by the user) or a :class:`~layerwise.kernels.base.BaseKernel`.
    dims : 1 (rings) or 2 (tori).
    dtype : computation dtype, float64 by default; the device is X's (Y is moved there).
    block_size : rows per block (default: from the memory budget).
    **params : parameters of the base kernel, e.g. ``sigma`` for Laplace (the paper takes ``sigma = s``).

    Returns
    -------
    (n, m) Gram matrix (exactly symmetric when ``Y is None``).
    """
    return _kernel(X, Y, s, base, dims, dtype, block_size, params, conv=False)


def conv_kernel(
    X: torch.Tensor,
    Y: torch.Tensor | None,
    s: int,
    base: str | BaseKernel = "laplace",
    dims: int = 1,
    *,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    **params: Any,
) -> torch.Tensor:
    """Convolutional kernel ``K_CN(x, y) = mean_{i,j} C(x_i, y_j)`` over all pairs of periodic patches.

    Parameters and returns as :func:`local_kernel`. Equals :func:`local_kernel` averaged over the
    translations of ``y`` (so it is translation-invariant in each argument); costs ``|P|`` times as much.
    """
    return _kernel(X, Y, s, base, dims, dtype, block_size, params, conv=True)
