"""NTK and NNGP of deep tree-like CNNs (filter = stride), Cagnetta, Favero, Wyart (ICML 2023).

Architecture: ``L`` convolutional layers with non-overlapping filters of sizes ``s_1, ..., s_L`` (stride =
filter size), ReLU, infinitely many channels, and a linear readout over the remaining positions (dense on
the flattened last layer). The input ``x`` in ``R^d`` (``d`` divisible by ``s_1 ... s_L``) is cut into
``d / s_1`` patches; in the paper each lies on the unit sphere ``S^{s_1 - 1}``, here any input is allowed.

Recursion (``k0``, ``k1``: arc-cosine functions of :mod:`.base`; ``D_l(x, p) = Sigma_l(x, x)`` at position
``p``; ``kappa_1(S; Dx, Dy) = sqrt(Dx Dy) k1(S / sqrt(Dx Dy))``, ``kappa_0 = k0(S / sqrt(Dx Dy))``)::

    Sigma_0(p) = Theta_0(p) = <x_p, y_p>                                  (p: the d/s_1 input patches)
    Sigma_l(p) = mean_{c child of p} kappa_1(Sigma_{l-1}(c))               l = 1, ..., L
    Theta_l(p) = mean_{c child of p} kappa_0(Sigma_{l-1}(c)) Theta_{l-1}(c) + Sigma_l(p)

where the children of a position at layer ``l < L`` are the ``s_{l+1}`` positions it covers, and the
last step (``l = L``, the readout) averages over all ``d / (s_1 ... s_L)`` remaining positions. NNGP =
``Sigma_L``, NTK = ``Theta_L``. For unit-norm patches every ``D_l = 1`` and this is the recursion of the
design note. It equals the kernels neural-tangents computes for ``stax.serial(Conv(s_1, stride s_1,
W_std=1) on x * sqrt(s_1), Relu, [Conv(s_l, stride s_l, W_std=sqrt(2)), Relu]..., Flatten,
Dense(W_std=sqrt(2)))`` without biases. With ``filters=(d,)`` it is :func:`.base.ntk_relu` / ``nngp_relu``.

Computation: the recursion runs on normalised statistics (cosines ``Sigma / sqrt(Dx Dy)`` and
``Theta / sqrt(Dx Dy)``), so the first layer is one batched product of unit-norm patches and the norms
enter only through per-point weights ``sqrt(D_child / D_parent)``, skipped when they are all 1 within
1e-13 (inputs whose patches have equal norms, as in the paper). Blocks of rows against all columns; per
block the statistics are ``(positions, rows, cols)`` tensors, so memory is O(rows x N x d/s_1), never
``(N, N)`` per position. ``Y is None`` computes one triangle.

>>> import torch
>>> X = torch.randn(5, 16, dtype=torch.float64)
>>> hierarchical_kernel(X, None, filters=(4, 4)).shape
torch.Size([5, 5])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ParameterError, ParameterTypeError
from ._checks import as_pair, block_rows, blocked_gram, check_choice, check_int

__all__ = ["hierarchical_kernel", "check_filters"]

_TINY = float(torch.finfo(torch.float64).tiny)


def check_filters(filters: Any, d: int) -> tuple[int, ...]:
    """``filters`` as a tuple of positive ints whose product divides ``d``; else a ParameterError."""
    if isinstance(filters, (str, bytes)) or not isinstance(filters, Sequence) or len(filters) == 0:
        raise ParameterTypeError(f"filters must be a non-empty sequence of ints, got {filters!r}")
    out = tuple(check_int(f"filters[{i}]", f, low=1) for i, f in enumerate(filters))
    if d % math.prod(out):
        raise ParameterError(
            f"filters must have a product dividing the input dimension d={d}, got {out} (product "
            f"{math.prod(out)})"
        )
    return out


def _snap_negated_(s: torch.Tensor) -> torch.Tensor:
    """Negated cosines ``s = -t``: clamp to [-1, 1] and snap those within 16 ulps of -1 to -1 (in place)."""
    return s.clamp_(-1.0, 1.0).masked_fill_(s < -1.0 + 16 * torch.finfo(s.dtype).eps, -1.0)


def _step(s: torch.Tensor, T: torch.Tensor | None, wx: torch.Tensor | None, wy: torch.Tensor | None,
          children: int, theta0: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer on normalised statistics, (positions, rows, cols) at the children -> at the parents.

    ``s`` are the *negated* cosines ``-Sigma / sqrt(Dx Dy)`` at the children (so that ``arccos(s)`` is
    ``pi - theta = pi k0`` directly, without a negation pass), ``T`` the normalised ``Theta / sqrt(Dx Dy)``
    (None for the NNGP; ``theta0=True``: ``T`` is the cosine ``-s`` itself, at the first layer). With
    ``w = sqrt(D_child / D_parent)`` per point and position (``wx`` (positions, rows, 1), ``wy``
    (positions, 1, cols); None when all are 1)::

        t_parent = mean_c wx wy k1(t_c)          T_parent = mean_c wx wy k0(t_c) T_c + t_parent

    Returns the negated ``t_parent`` and ``T_parent``; the inputs are overwritten.
    """
    n_pos, rows, cols = s.shape
    shape = (n_pos // children, children, rows, cols)
    u = torch.arccos(s)  # pi - theta = pi k0(t)
    k1 = torch.sin(u).addcmul_(u, s, value=-1.0)  # pi k1(t) = sin(theta) + (pi - theta) t
    if wx is not None:
        k1.mul_(wx).mul_(wy)
        u.mul_(wx).mul_(wy)
    scale = 1.0 / (math.pi * children)
    s_parent = k1.view(shape).sum(1).mul_(-scale)  # -t_parent
    if T is None and not theta0:
        return s_parent, None
    if theta0:  # T = t = -s
        theta = u.mul_(s).view(shape).sum(1).mul_(-scale)
    else:
        theta = u.mul_(T).view(shape).sum(1).mul_(scale)
    return s_parent, theta.sub_(s_parent)


def _unit_patches(X: torch.Tensor, n0: int, s1: int) -> torch.Tensor:
    """(n, n0, s1) patches of X scaled to unit norm (zero patches stay zero)."""
    p = X.view(X.shape[0], n0, s1)
    norm = p.norm(dim=-1, keepdim=True)
    return p / torch.where(norm > 0, norm, torch.ones_like(norm))


# Weights within this distance of 1 are treated as 1 (a relative change at round-off level, 1e-13).
_UNIFORM = 1e-13


def _weights(dx: torch.Tensor, dz: torch.Tensor, children: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``sqrt(D_child / D_parent)`` for both sides, (positions, points); None if all are 1 (equal norms)."""
    out = []
    for diag in (dx, dz):
        parent = diag.view(-1, children, diag.shape[-1]).mean(1, keepdim=True).expand(-1, children, -1)
        parent = parent.reshape(diag.shape)
        out.append(torch.where(parent > 0, diag / parent.clamp_min(_TINY), torch.zeros_like(diag)).sqrt())
    if all(bool(((w - 1).abs() <= _UNIFORM).all()) for w in out):
        return None
    return out[0], out[1]


def hierarchical_kernel(
    X: torch.Tensor,
    Y: torch.Tensor | None,
    filters: Sequence[int],
    kind: str = "ntk",
    *,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """NTK or NNGP of the tree CNN with filter sizes ``filters`` (filter = stride), row-blocked.

    Parameters
    ----------
    X : (n, d) inputs, ``d`` divisible by ``prod(filters)``; the first layer sees ``d / s_1`` patches.
    Y : (m, d) inputs or None for ``Y = X`` (symmetric, one triangle computed).
    filters : ``(s_1, ..., s_L)``, L >= 1.
    kind : ``"ntk"`` (neural tangent kernel) or ``"nngp"`` (random-feature / Gaussian-process kernel).
    dtype : computation dtype, float64 by default; the device is X's.
    block_size : rows per block (default: from a fixed memory budget).

    Returns
    -------
    (n, m) Gram matrix.
    """
    kind = check_choice("kind", kind, ("ntk", "nngp"))
    X, Y = as_pair(X, Y, ndim=2, dtype=dtype)
    d = X.shape[1]
    filters = check_filters(filters, d)
    n0 = d // filters[0]
    # Children per step: s_2, ..., s_L, then all remaining positions (the readout).
    steps = [*filters[1:], d // math.prod(filters)]
    Z = X if Y is None else Y
    # Diagonals D_l (positions at level l, points): D_0 = squared patch norms; D_l = mean over the
    # children of D_{l-1} (because k1(1) = 1).
    dx = [X.view(X.shape[0], n0, filters[0]).square().sum(-1).T]  # (n0, n)
    dz = dx if Y is None else [Z.view(Z.shape[0], n0, filters[0]).square().sum(-1).T]
    for diag in (dx,) if Y is None else (dx, dz):
        for children in steps[:-1]:
            diag.append(diag[-1].view(-1, children, diag[-1].shape[-1]).mean(1))
    ux = _unit_patches(X, n0, filters[0]).transpose(0, 1)  # (n0, n, s_1)
    # (n0, s_1, m)
    uz = ux.transpose(1, 2) if Y is None else _unit_patches(Z, n0, filters[0]).permute(1, 2, 0)
    ux = -ux  # negated: the first product gives -cos directly
    weights = [_weights(a, b, children) for a, b, children in zip(dx, dz, steps, strict=True)]
    scale_x, scale_z = dx[-1].mean(0).sqrt(), dz[-1].mean(0).sqrt()  # sqrt(D_L): (n,), (m,)

    def block(r: slice, c: slice) -> torch.Tensor:
        # (n0, rows, cols) negated cosines of the patches (ux holds the negated unit patches)
        s = _snap_negated_(torch.bmm(ux[:, r], uz[:, :, c]))
        T = None  # normalised Theta_0 = Sigma_0 / sqrt(Dx Dy) = the cosine = -s (theta0 below)
        for level, children in enumerate(steps):
            w = weights[level]
            a, b = (None, None) if w is None else (w[0][:, r, None], w[1][:, None, c])
            s, T = _step(s, T, a, b, children, theta0=level == 0 and kind == "ntk")
            if level < len(steps) - 1:
                s = _snap_negated_(s)
        out = T[0] if kind == "ntk" else s[0].neg_()  # (rows, cols): one position is left after the readout
        return out.mul_(scale_x[r, None]).mul_(scale_z[None, c])

    m = None if Y is None else Y.shape[0]
    rows = block_rows(block_size, n0 * Z.shape[0])
    max_abs = max(float(X.abs().max()), 0.0 if Y is None else float(Y.abs().max()))
    return blocked_gram(block, X.shape[0], m, rows, dtype=X.dtype, device=X.device, max_abs=max_abs)
