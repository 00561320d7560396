"""Patch-pair machinery shared by the full-input, local and convolutional kernels (private).

A Gram matrix ``K[a, b] = mean over patch pairs (i, j) of C(x_a[patch i], y_b[patch j])`` is filled in
blocks of rows. Per block, the statistic the base kernel depends on (squared distance, cosine, or inner
product; see :class:`layerwise.kernels.base.BaseKernel`) is computed for all needed patch pairs by one
matrix product of per-patch features:

- radial: ``[-2a, |a|^2, 1] . [b, 1, |b|^2] = |a - b|^2``;
- angular: ``a/|a| . b/|b| = cos``, the factor ``|a||b|`` applied in the reduction;
- dot: ``a . b``, with the squared norms passed alongside.

Local kernels pair patch ``i`` with patch ``i`` (a batched product over patches: ``(|P|, rows, cols)``),
convolutional ones every ``i`` with every ``j`` (``(rows, |P|, cols, |P|)``). The base kernel is applied in
place on that block and reduced to ``(rows, cols)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._checks import block_rows, blocked_gram


def snap_cosine_(t: torch.Tensor) -> torch.Tensor:
    """Clamp cosines to [-1, 1] in place, and snap those within 16 ulps (of their dtype) of 1 to exactly 1.

    A cosine computed from inner products of patches of up to ~16 coordinates carries a round-off error of
    a few ulps; snapping makes identical patches give exactly ``t = 1``, hence ``arccos(t) = 0``, instead of
    ``arccos(1 - 2 ulp) ~ 2e-8`` (float64). Values further from 1 are untouched.
    """
    return t.clamp_(-1.0, 1.0).masked_fill_(t > 1.0 - 16 * torch.finfo(t.dtype).eps, 1.0)


def patch_index(shape: tuple[int, ...], s: int) -> torch.Tensor:
    """Flat indices of the periodic patches of an input of ``shape`` (``(d,)`` ring or ``(h, w)`` torus).

    Returns
    -------
    (|P|, q) long tensor: row ``i`` lists the ``q = s`` (ring) or ``s*s`` (torus) flattened coordinates of
    the patch starting at site ``i`` (row-major on the torus); one patch per site.
    """
    if len(shape) == 1:
        (d,) = shape
        return (torch.arange(d)[:, None] + torch.arange(s)[None, :]) % d  # (d, s)
    h, w = shape
    rows = (torch.arange(h)[:, None, None, None] + torch.arange(s)[None, None, :, None]) % h  # (h, 1, s, 1)
    cols = (torch.arange(w)[None, :, None, None] + torch.arange(s)[None, None, None, :]) % w  # (1, w, 1, s)
    return (rows * w + cols).reshape(h * w, s * s)  # (h w, s s)


@dataclass
class _Features:
    left: torch.Tensor  # (n, |P|, q') features multiplied on the left
    right: torch.Tensor  # (n, |P|, q') features multiplied on the right
    sqnorm: torch.Tensor  # (n, |P|) squared patch norms
    weight: torch.Tensor | None  # (n, |P|) patch norms (angular kernels) or None


def _features(X: torch.Tensor, idx: torch.Tensor, kind: str) -> _Features:
    patches = X[:, idx]  # (n, |P|, q)
    sq = (patches * patches).sum(-1)  # (n, |P|)
    if kind == "radial":
        one = torch.ones_like(sq)[..., None]
        left = torch.cat([-2.0 * patches, sq[..., None], one], -1)  # (n, |P|, q + 2)
        right = torch.cat([patches, one, sq[..., None]], -1)
        return _Features(left, right, sq, None)
    if kind == "angular":
        norm = sq.sqrt()
        unit = patches / torch.where(norm > 0, norm, torch.ones_like(norm))[..., None]  # zero patch -> 0
        return _Features(unit, unit, sq, norm)
    return _Features(patches, patches, sq, None)


def _finish_(stat: torch.Tensor, kind: str, tol: float) -> torch.Tensor:
    """Clean the raw statistic in place: distances >= 0 (round-off -> exactly 0), cosines in [-1, 1]."""
    if kind == "radial":
        return stat.sub_(tol).clamp_min_(0.0)
    if kind == "angular":
        return snap_cosine_(stat)
    return stat


def gram(
    fn: Callable[..., torch.Tensor],
    kind: str,
    X: torch.Tensor,
    Z: torch.Tensor | None,
    idx: torch.Tensor,
    *,
    conv: bool,
    block_size: int | None,
) -> torch.Tensor:
    """Gram matrix of the local (``conv=False``) or convolutional kernel with patches ``idx``.

    X : (n, D), Z : (m, D) or None (symmetric, one triangle computed), idx : (|P|, q) flat patch indices.
    """
    fx = _features(X, idx, kind)
    fz = fx if Z is None else _features(Z, idx, kind)
    n_p = idx.shape[0]
    m = fz.left.shape[0]
    # Round-off of |a|^2 + |b|^2 - 2 a.b is a few eps (|a|^2 + |b|^2).
    tol = 8 * torch.finfo(X.dtype).eps * float(fx.sqnorm.max() + fz.sqnorm.max())

    if not conv:
        lx, rz = fx.left.transpose(0, 1), fz.right.permute(1, 2, 0)  # (|P|, n, q'), (|P|, q', m)
        sx, sz = fx.sqnorm.T, fz.sqnorm.T  # (|P|, n), (|P|, m)

        def block(r: slice, c: slice) -> torch.Tensor:
            stat = _finish_(torch.bmm(lx[:, r], rz[:, :, c]), kind, tol)  # (|P|, rows, cols)
            if kind == "dot":
                return fn(stat, sx[:, r, None], sz[:, None, c]).mean(0)
            k = fn(stat)
            if fx.weight is not None:
                k.mul_(fx.weight.T[:, r, None]).mul_(fz.weight.T[:, None, c])
            return k.mean(0)

        per_row = n_p * m
    else:

        def block(r: slice, c: slice) -> torch.Tensor:
            a, b = fx.left[r], fz.right[c]  # (rows, |P|, q'), (cols, |P|, q')
            rows, cols = a.shape[0], b.shape[0]
            stat = (a.reshape(rows * n_p, -1) @ b.reshape(cols * n_p, -1).T).view(rows, n_p, cols, n_p)
            stat = _finish_(stat, kind, tol)
            if kind == "dot":
                k = fn(stat, fx.sqnorm[r][:, :, None, None], fz.sqnorm[c][None, None])
                return k.mean(dim=(1, 3))
            k = fn(stat)  # (rows, |P|, cols, |P|)
            if fx.weight is None:
                return k.mean(dim=(1, 3))
            # sum_ij |x_i| k_ij |y_j| as one batched product over the rows, then over j.
            left = torch.bmm(fx.weight[r][:, None, :], k.view(rows, n_p, cols * n_p))  # (rows, 1, cols |P|)
            return (left.view(rows, cols, n_p) * fz.weight[c][None]).sum(-1) / (n_p * n_p)

        per_row = n_p * n_p * m
    max_abs = max(float(X.abs().max()), 0.0 if Z is None else float(Z.abs().max()))
    return blocked_gram(block, X.shape[0], None if Z is None else m, block_rows(block_size, per_row),
                        dtype=X.dtype, device=X.device, max_abs=max_abs)
