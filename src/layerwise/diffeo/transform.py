"""Apply displacement fields to images, noise of matched norm, and the ``RandomDiffeo`` augmentation.

:func:`deform` is the deterministic application (one ``grid_sample`` for the whole batch);
:class:`RandomDiffeo` draws the fields (torchvision-v2 style: ``make_params`` draws, ``forward`` applies).

>>> import torch
>>> from layerwise.diffeo import RandomDiffeo, deform, sample_fields
>>> x = torch.rand(8, 3, 32, 32)
>>> y = deform(x, sample_fields(8, 32, 32, c=5, T=1e-3, seed=0))
>>> aug = RandomDiffeo(c=5, T_range=(1e-4, 3e-3), generator=0)
>>> aug(x[0]).shape                                  # (C, H, W) works too
torch.Size([3, 32, 32])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .._resources import check_memory
from ..errors import ParameterError, ParameterTypeError
from ._checks import check_choice, check_float, check_images, check_int, generator_of
from .fields import sample_fields

__all__ = ["deform", "matched_noise", "RandomDiffeo"]

MODES = ("bilinear", "nearest")


def deform(images: torch.Tensor, fields: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Deform each image by its own displacement field: ``out(p) = image(p - tau(p))``.

    Sampling points that fall outside the image are clamped to its border (``padding_mode="border"``),
    as in the authors' code; ``align_corners=True`` puts the border pixel centres at the ends of [0, 1],
    where the fields of :func:`sample_fields` vanish.

    Parameters
    ----------
    images : (N, C, H, W) floating tensor (any channel count, float32/float64, any device).
    fields : (N, 2, H, W) displacement in pixels (``[:, 0]`` horizontal, ``[:, 1]`` vertical), e.g. from
        :func:`layerwise.diffeo.sample_fields`; converted to the dtype and device of ``images``.
    mode : ``"bilinear"`` (default, the paper's) or ``"nearest"``.

    Returns
    -------
    (N, C, H, W) tensor, same dtype and device as ``images``.
    """
    images = check_images("images", images)
    mode = check_choice("mode", mode, MODES)
    n, _, h, w = images.shape
    if not isinstance(fields, torch.Tensor):
        raise ParameterTypeError(f"fields must be a torch.Tensor (N, 2, H, W), got {type(fields).__name__}")
    if tuple(fields.shape) != (n, 2, h, w):
        raise ParameterError(f"fields must have shape (N, 2, H, W) = {(n, 2, h, w)} to match images, got "
                             f"{tuple(fields.shape)}")
    check_memory(images.element_size() * n * h * w * (images.shape[1] + 8),
                 f"deforming {n} images of {tuple(images.shape[1:])}", images.device)
    fields = fields.to(dtype=images.dtype, device=images.device)
    kw = {"dtype": images.dtype, "device": images.device}
    xs = torch.arange(w, **kw)  # pixel columns
    ys = torch.arange(h, **kw)  # pixel rows
    # Source pixel coordinates p - tau(p), mapped to [-1, 1] (align_corners=True: pixel 0 -> -1, last -> 1).
    gx = (xs[None, None, :] - fields[:, 0]) * (2.0 / (w - 1)) - 1.0  # (N, H, W)
    gy = (ys[None, :, None] - fields[:, 1]) * (2.0 / (h - 1)) - 1.0  # (N, H, W)
    grid = torch.stack([gx, gy], dim=-1)  # (N, H, W, 2), (x, y) order as grid_sample wants
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=True)


def matched_noise(
    images: torch.Tensor, deformed: torch.Tensor, seed: int | torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise ``eta`` rescaled per image so that ``||eta_b|| = ||deformed_b - images_b||``.

    The norm is over (C, H, W); ``images + eta`` is the noisy image. This is the per-image matching
    (``relative_stability(..., noise_norm="per_image")``); the paper's G_f gives every noise vector the
    *mean* of these norms over the data (the default of :func:`layerwise.diffeo.relative_stability`).

    Parameters
    ----------
    images, deformed : (N, C, H, W) tensors of the same shape.
    seed : int, CPU ``torch.Generator`` or None. Noise is drawn on the CPU (same numbers on every device).

    Returns
    -------
    eta : (N, C, H, W), dtype and device of ``images``.
    """
    images = check_images("images", images, min_size=1)
    if not isinstance(deformed, torch.Tensor) or deformed.shape != images.shape:
        shape = tuple(deformed.shape) if isinstance(deformed, torch.Tensor) else type(deformed).__name__
        raise ParameterError(f"deformed must be a tensor of the shape of images {tuple(images.shape)}, "
                             f"got {shape}")
    gen = generator_of(seed)
    eta = torch.randn(images.shape, generator=gen, dtype=images.dtype).to(images.device)
    target = (deformed - images).flatten(1).norm(dim=1)  # (N,)
    norm = eta.flatten(1).norm(dim=1)  # (N,)
    return eta * (target / norm).reshape(-1, 1, 1, 1)


class RandomDiffeo(torch.nn.Module):
    """Random maximum-entropy diffeomorphism, one independent field per image (data augmentation).

    Callable on (C, H, W) or (N, C, H, W) tensors (floating, or integer such as uint8: then the result is
    rounded back to the input dtype); composable with ``torch.nn.Sequential`` or torchvision's ``Compose``.

    Parameters
    ----------
    c : cutoff (>= 1).
    T : fixed temperature (>= 0). Exactly one of ``T`` and ``T_range`` must be given.
    T_range : ``(T_low, T_high)``: each image draws its temperature log-uniformly in this range
        (``T_low > 0``); e.g. :func:`layerwise.diffeo.temperature_range`.
    mode : interpolation, ``"bilinear"`` or ``"nearest"``.
    generator : int seed, CPU ``torch.Generator`` or None. The transform keeps it and advances it at every
        call, so a seeded transform gives the same sequence of deformations. (DataLoader workers each get
        a copy of the same state: seed per worker, e.g. in ``worker_init_fn``, if that matters.)

    Example
    -------
    >>> aug = RandomDiffeo(c=3, T=1e-3, generator=0)
    >>> params = aug.make_params(torch.zeros(2, 1, 16, 16))
    >>> sorted(params)
    ['T', 'fields']
    """

    def __init__(
        self,
        c: int = 3,
        T: float | None = None,
        T_range: tuple[float, float] | None = None,
        mode: str = "bilinear",
        generator: int | torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.c = check_int("c", c, low=1)
        if (T is None) == (T_range is None):
            raise ParameterError(f"give exactly one of T and T_range, got T={T!r}, T_range={T_range!r}")
        self.T = None if T is None else check_float("T", T, low=0.0)
        if T_range is not None:
            try:
                lo, hi = (float(v) for v in T_range)
            except (TypeError, ValueError):
                raise ParameterError(f"T_range must be a pair (T_low, T_high), got {T_range!r}") from None
            lo = check_float("T_range[0]", lo, low=0.0, low_open=True)
            hi = check_float("T_range[1]", hi, low=lo)
            T_range = (lo, hi)
        self.T_range = T_range
        self.mode = check_choice("mode", mode, MODES)
        self.generator = generator_of(generator)

    def make_params(self, images: torch.Tensor) -> dict[str, Any]:
        """Draw per-image temperatures (N,) and fields (N, 2, H, W) for a batch ``images`` (N, C, H, W)."""
        n, _, h, w = images.shape
        if self.T_range is None:
            T = torch.full((n,), self.T, dtype=torch.float64)
        else:
            lo, hi = self.T_range
            u = torch.rand(n, generator=self.generator, dtype=torch.float64)
            T = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))  # log-uniform in [lo, hi]
        dtype = images.dtype if images.is_floating_point() else torch.float32
        fields = sample_fields(n, h, w, self.c, T, self.generator, dtype=dtype, device=images.device)
        return {"T": T, "fields": fields}

    def transform(
        self, images: torch.Tensor, params: dict[str, Any], mode: str | None = None
    ) -> torch.Tensor:
        """Apply drawn ``params`` to (N, C, H, W) ``images``: the same diffeos can deform an image batch and
        its masks (``mode="nearest"`` for labels)."""
        return deform(images, params["fields"], mode=self.mode if mode is None else mode)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Deform (C, H, W) or (N, C, H, W) images, one independent diffeo per image."""
        if not isinstance(images, torch.Tensor):
            raise ParameterTypeError(f"images must be a torch.Tensor (C, H, W) or (N, C, H, W), got "
                                     f"{type(images).__name__}")
        if images.dim() not in (3, 4):
            raise ParameterError(f"images must be (C, H, W) or (N, C, H, W), got shape {tuple(images.shape)}")
        batch = images if images.dim() == 4 else images.unsqueeze(0)
        x = batch if batch.is_floating_point() else batch.to(torch.float32)
        out = self.transform(x, self.make_params(x))
        if not batch.is_floating_point():
            info = torch.iinfo(batch.dtype)
            out = out.round().clamp(info.min, info.max).to(batch.dtype)
        return out if images.dim() == 4 else out.squeeze(0)

    def extra_repr(self) -> str:
        """The settings shown by ``repr``: cutoff, temperature (or its range), interpolation."""
        temp = f"T={self.T}" if self.T is not None else f"T_range={self.T_range}"
        return f"c={self.c}, {temp}, mode={self.mode!r}"
