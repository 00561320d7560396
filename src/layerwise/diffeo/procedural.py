"""An offline image world whose classes are invariant to smooth deformations (pure torch, seeded).

Each image shows one shape on a textured background. The class is a topological or counting property that
a small diffeomorphism cannot change: a filled disk, a ring (one hole), two separate blobs, three separate
blobs, a bar, a cross. Position, size, orientation, stroke width, the foreground and background intensities
(smooth random fields) and a fine texture with a natural-image-like 1/f spectrum are drawn per image, so
the images fill every pixel direction (unlike upscaled digits, which span 64 of them) and a net must learn
the shape, not the pixels. The edges are soft (about 0.6 px), so the images are smooth enough for bilinear
diffeos.

>>> x, y = procedural_shapes(12, size=32, seed=0)
>>> tuple(x.shape), x.dtype, sorted(set(y.tolist())) == list(range(len(PROCEDURAL_CLASSES)))
((12, 1, 32, 32), torch.float32, True)
"""

from __future__ import annotations

import math

import torch

from .._resources import check_memory
from ._checks import check_int, generator_of

__all__ = ["PROCEDURAL_CLASSES", "procedural_shapes"]

PROCEDURAL_CLASSES = ("disk", "ring", "two blobs", "three blobs", "bar", "cross")

_EDGE = 0.04  # soft edge width, in units of half the image side (0.64 px at 32 px)


def _smooth_field(n: int, size: int, gen: torch.Generator, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n, size, size) sums of 3 random plane waves of 0.5-2 cycles per side, scaled to [-1, 1]."""
    field = torch.zeros(n, size, size, dtype=torch.float64)
    for _ in range(3):
        freq = (0.5 + 1.5 * torch.rand(n, 2, generator=gen, dtype=torch.float64)) * math.pi  # radians/unit
        sign = torch.where(torch.rand(n, 2, generator=gen) < 0.5, -1.0, 1.0).double()
        phase = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
        arg = (freq[:, 0] * sign[:, 0])[:, None, None] * u + (freq[:, 1] * sign[:, 1])[:, None, None] * v
        field += torch.cos(arg + phase[:, None, None])
    return field / 3.0


def _texture(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(n, size, size) Gaussian texture with a 1/f amplitude spectrum, unit standard deviation."""
    white = torch.randn(n, size, size, generator=gen, dtype=torch.float64)
    spec = torch.fft.rfft2(white)
    fy = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
    radius = (fx**2 + fy**2).sqrt()
    radius[0, 0] = 1.0
    spec = spec / radius * (radius > 0)
    spec[:, 0, 0] = 0.0
    tex = torch.fft.irfft2(spec, s=(size, size))
    return tex / tex.flatten(1).std(1).clamp_min(1e-12)[:, None, None]


def _soft(x: torch.Tensor) -> torch.Tensor:
    """Soft indicator of ``x > 0`` with an edge of width _EDGE."""
    return torch.sigmoid(x / _EDGE)


def _disk(u: torch.Tensor, v: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
          r: torch.Tensor) -> torch.Tensor:
    d = ((u - cx[:, None, None]) ** 2 + (v - cy[:, None, None]) ** 2).sqrt()
    return _soft(r[:, None, None] - d)


def _bar(a: torch.Tensor, b: torch.Tensor, half_length: torch.Tensor,
         half_width: torch.Tensor) -> torch.Tensor:
    return _soft(half_length[:, None, None] - a.abs()) * _soft(half_width[:, None, None] - b.abs())


def procedural_shapes(
    n: int, size: int = 32, seed: int | torch.Generator | None = 0, channels: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` images of the procedural shape world and their labels.

    Parameters
    ----------
    n : number of images (>= 1); the labels cycle through the classes (balanced up to one), shuffled.
    size : side in pixels (>= 8).
    seed : int, CPU ``torch.Generator`` or None. The same seed gives the same images.
    channels : 1 (grayscale) or 3 (the same picture tinted by a random colour per image).

    Returns
    -------
    images : (n, channels, size, size) float32 in [0, 1].
    labels : (n,) int64 in ``range(len(PROCEDURAL_CLASSES))`` (see :data:`PROCEDURAL_CLASSES`).
    """
    n = check_int("n", n, low=1)
    size = check_int("size", size, low=8)
    channels = check_int("channels", channels, low=1, high=3)
    if channels == 2:
        from ..errors import ParameterError

        raise ParameterError("channels must be 1 or 3, got 2")
    check_memory(8 * 12 * n * size * size, f"procedural_shapes(n={n}, size={size})")
    gen = generator_of(seed)
    k = len(PROCEDURAL_CLASSES)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    grid = torch.linspace(-1, 1, size, dtype=torch.float64)
    v, u = torch.meshgrid(grid, grid, indexing="ij")  # v down the rows, u along the columns

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    cx, cy = uniform(-0.3, 0.3), uniform(-0.3, 0.3)
    r = uniform(0.4, 0.62)  # overall extent of the shape
    theta = uniform(0.0, math.pi)
    width = uniform(0.1, 0.16)  # half the stroke width
    dx, dy = torch.cos(theta), torch.sin(theta)
    a = (u - cx[:, None, None]) * dx[:, None, None] + (v - cy[:, None, None]) * dy[:, None, None]
    b = -(u - cx[:, None, None]) * dy[:, None, None] + (v - cy[:, None, None]) * dx[:, None, None]

    masks = torch.zeros(n, size, size, dtype=torch.float64)
    for label in range(k):
        idx = (labels == label).nonzero().flatten()
        if len(idx) == 0:
            continue
        ui, vi = u.expand(len(idx), -1, -1), v.expand(len(idx), -1, -1)
        cxi, cyi, ri, wi, ti = cx[idx], cy[idx], r[idx], width[idx], theta[idx]
        name = PROCEDURAL_CLASSES[label]
        if name == "disk":
            m = _disk(ui, vi, cxi, cyi, 0.75 * ri)
        elif name == "ring":
            d = ((ui - cxi[:, None, None]) ** 2 + (vi - cyi[:, None, None]) ** 2).sqrt()
            m = _soft(wi[:, None, None] - (d - 0.8 * ri[:, None, None]).abs())
        elif name in ("two blobs", "three blobs"):
            count = 2 if name == "two blobs" else 3
            offset, radius = (0.8, 0.45) if count == 2 else (0.85, 0.38)
            m = torch.zeros(len(idx), size, size, dtype=torch.float64)
            for j in range(count):
                phi = ti + 2 * math.pi * j / count
                m = torch.maximum(m, _disk(ui, vi, cxi + offset * ri * torch.cos(phi),
                                           cyi + offset * ri * torch.sin(phi), radius * ri))
        elif name == "bar":
            m = _bar(a[idx], b[idx], ri, wi)
        else:  # cross
            m = torch.maximum(_bar(a[idx], b[idx], ri, wi), _bar(b[idx], a[idx], ri, wi))
        masks[idx] = m
    background = 0.25 + 0.12 * _smooth_field(n, size, gen, u, v)
    foreground = 0.72 + 0.12 * _smooth_field(n, size, gen, u, v)
    picture = background + (foreground - background) * masks + 0.06 * _texture(n, size, gen)
    picture = picture.clamp(0.0, 1.0).unsqueeze(1)  # (n, 1, size, size)
    if channels == 3:
        tint = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=gen, dtype=torch.float64)
        picture = picture * tint
    return picture.to(torch.float32), labels
