"""Input distributions for teacher-student experiments, as samplers ``sampler(n, generator) -> inputs``.

>>> import torch
>>> X = patch_spheres(16, 4)(5, torch.Generator().manual_seed(0))
>>> X.shape, bool(torch.allclose(X.view(5, 4, 4).norm(dim=-1), torch.ones(5, 4, dtype=torch.float64)))
(torch.Size([5, 16]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ParameterError
from ._checks import check_int

__all__ = ["hypercube", "sphere", "patch_spheres"]

Sampler = Callable[[int, torch.Generator], torch.Tensor]


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not dims:
        raise ParameterError("shape must have at least one dimension")
    return tuple(check_int(f"shape[{i}]", v, low=1) for i, v in enumerate(dims))


def hypercube(shape: int | Sequence[int]) -> Sampler:
    """Uniform on ``[0, 1]^shape``: ``(n, *shape)`` float64 (``shape = d`` for rings, ``(h, w)`` for tori)."""
    dims = _shape(shape)

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(n, *dims, generator=generator, dtype=torch.float64)

    return sample


def sphere(d: int) -> Sampler:
    """Uniform on the unit sphere ``S^{d-1}``: ``(n, d)`` float64."""
    d = check_int("d", d, low=1)

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
        return x / x.norm(dim=1, keepdim=True)

    return sample


def patch_spheres(d: int, s: int) -> Sampler:
    """``d / s`` independent patches of ``s`` consecutive coordinates, each uniform on ``S^{s-1}``:
    ``(n, d)`` float64 (the input space of the ICML 2023 hierarchical kernels)."""
    d, s = check_int("d", d, low=1), check_int("s", s, low=1)
    if d % s:
        raise ParameterError(f"s must divide d={d}, got s={s}")

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(n, d // s, s, generator=generator, dtype=torch.float64)  # (n, patches, s)
        return (x / x.norm(dim=-1, keepdim=True)).reshape(n, d)

    return sample
