"""The paper's figure 1: one image under diffeos of increasing temperature, next to noise of equal norm.

>>> import torch
>>> from layerwise.diffeo import sample_grid
>>> g = sample_grid(torch.rand(3, 32, 32), c=5, temperatures=[1e-4, 1e-3], seed=0)
>>> g["deformed"].shape, g["noisy"].shape
(torch.Size([2, 3, 32, 32]), torch.Size([2, 3, 32, 32]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .._resources import check_memory
from ..errors import ParameterError
from ._checks import check_int, generator_of
from .fields import centre_displacement_rms, sample_fields, temperature_range
from .transform import deform, matched_noise

__all__ = ["log_temperatures", "sample_grid", "plot_sample_grid"]


def log_temperatures(size: int, c: int, steps: int) -> list[float]:
    """``steps`` temperatures log-spaced over ``[T_min, T_max]`` (:func:`temperature_range`)."""
    steps = check_int("steps", steps, low=1)
    t_min, t_max = temperature_range(size, c)
    lo, hi = math.log(t_min), math.log(t_max)
    if steps == 1:
        return [math.exp(0.5 * (lo + hi))]
    return [math.exp(lo + (hi - lo) * k / (steps - 1)) for k in range(steps)]


def sample_grid(
    image: torch.Tensor, c: int, temperatures: Sequence[float], seed: int | torch.Generator | None = 0,
    mode: str = "bilinear",
) -> dict[str, Any]:
    """Deform one image (C, H, W) at each temperature and add noise of the same norm.

    Returns
    -------
    dict with ``deformed`` and ``noisy`` (K, C, H, W) for K temperatures, ``temperatures`` (list),
    ``displacement_px`` (exact rms displacement at the centre, pixels, from :func:`centre_displacement_rms`)
    and ``norm`` (K,) of ``deformed - image``.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ParameterError(f"image must be a floating tensor (C, H, W), got {shape}")
    temps = [float(t) for t in temperatures]
    if not temps:
        raise ParameterError("temperatures must hold at least one temperature, got none")
    c = check_int("c", c, low=1)
    gen = generator_of(seed)
    n_ch, h, w = image.shape
    k = len(temps)
    # batch, deformed, noisy, noise (float32), fields in float64 (einsum and scaling), grid_sample's grid,
    # the figure's float64 RGBA copies, and the sine coefficients.
    check_memory(k * h * w * (4 * 4 * n_ch + 8 * 2 * 3 + 4 * 2 * 3 + 8 * 4 * 2) + 16 * k * c * c + 24 * c * c,
                 f"a sample grid of {k} temperature(s) for a {n_ch} x {h} x {w} image with cutoff c = {c}")
    batch = image.unsqueeze(0).expand(len(temps), -1, -1, -1).contiguous()  # (K, C, H, W)
    fields = sample_fields(len(temps), h, w, c, torch.tensor(temps, dtype=torch.float64), gen,
                           dtype=image.dtype, device=image.device)
    deformed = deform(batch, fields, mode=mode)
    noisy = batch + matched_noise(batch, deformed, gen)
    return {
        "deformed": deformed,
        "noisy": noisy,
        "temperatures": temps,
        "displacement_px": [centre_displacement_rms(min(h, w), c, t) for t in temps],
        "norm": (deformed - batch).flatten(1).norm(dim=1),
    }


def plot_sample_grid(image: torch.Tensor, grid: dict[str, Any], title: str | None = None):
    """A matplotlib figure: the original, then row 1 the diffeos and row 2 the noisy images (same norms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(grid["temperatures"])
    fig, axes = plt.subplots(2, k + 1, figsize=(1.9 * (k + 1), 4.3), squeeze=False)

    lo, hi = float(image.min()), float(image.max())  # every panel on the original's scale

    def show(ax, img):
        arr = img.detach().float().cpu()
        arr = ((arr - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
        if arr.shape[0] == 1:
            ax.imshow(arr[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(arr[:3].permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])

    show(axes[0, 0], image)
    axes[0, 0].set_title("original", fontsize=8)
    axes[1, 0].axis("off")
    for j in range(k):
        show(axes[0, j + 1], grid["deformed"][j])
        show(axes[1, j + 1], grid["noisy"][j])
        axes[0, j + 1].set_title(f"T={grid['temperatures'][j]:.1e}\ndelta={grid['displacement_px'][j]:.2g}px",
                                 fontsize=8)
        axes[1, j + 1].set_title(f"||eta||={float(grid['norm'][j]):.3g}", fontsize=8)
    axes[0, 1].set_ylabel("diffeo tau x", fontsize=8)
    axes[1, 1].set_ylabel("x + eta (same norm)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
