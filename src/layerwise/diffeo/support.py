"""The principal subspace of a set of images: where "in-support" noise for the G_f control lives.

Isotropic noise spreads its norm over every pixel direction. When the data occupy a low-dimensional
subspace (8 x 8 digits upscaled to 16 x 16 span at most 64 of the 256 pixel directions), most of that noise
points where no training image ever varies, and a trained net can simply ignore it, so G_f collapses for a
reason that has nothing to do with diffeomorphisms. The control draws the noise inside the span of the
data's leading principal components instead (``relative_stability(..., noise_basis=basis)``).

>>> import torch
>>> x = torch.rand(50, 1, 8, 8) @ torch.ones(1, 8, 8)     # rank-1 rows: a low-dimensional image set
>>> basis = principal_subspace(x, variance=0.99)
>>> basis.shape[1], bool((basis @ basis.T - torch.eye(len(basis))).abs().max() < 1e-10)
(64, True)
"""

from __future__ import annotations

import torch

from ..errors import InputDataError, ParameterError
from ._checks import check_float, check_images, check_int

__all__ = ["principal_subspace"]


def principal_subspace(images: torch.Tensor, k: int | None = None, variance: float = 0.99) -> torch.Tensor:
    """Orthonormal basis (k, C*H*W), float64, of the leading principal directions of ``images``.

    Parameters
    ----------
    images : (N, C, H, W) floating tensor, N >= 2 (e.g. the training images).
    k : number of directions; default: the fewest whose principal components carry at least ``variance``
        of the total variance of the centred images.
    variance : fraction in (0, 1] used when ``k`` is None.

    Returns
    -------
    Tensor (k, C*H*W) on the CPU, rows orthonormal (the right singular vectors of the centred data, in
    order of decreasing singular value).
    """
    images = check_images("images", images, min_size=1)
    n = images.shape[0]
    if n < 2:
        raise ParameterError(f"images must hold at least 2 images to span a subspace, got {n}")
    variance = check_float("variance", variance, low=0.0, high=1.0, low_open=True)
    flat = images.detach().to("cpu", torch.float64).flatten(1)  # (N, D)
    centred = flat - flat.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # vh (min(N, D), D)
    power = s**2
    total = float(power.sum())
    rank = int((s > s[0] * 1e-10).sum()) if total > 0 else 0
    if rank == 0:
        raise InputDataError("images: all images are identical, they span no subspace")
    if k is None:
        cumulative = torch.cumsum(power, 0) / total
        k = int((cumulative < variance - 1e-12).sum()) + 1
    k = check_int("k", k, low=1, high=rank)
    return vh[:k].contiguous()
