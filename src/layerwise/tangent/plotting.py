"""Plot helpers for editing results (matplotlib imported lazily; pass an ``Axes`` or get a new figure).

>>> import torch
>>> from layerwise.tangent.disentanglement import DisentanglementResult
>>> g = torch.linspace(-1, 1, 3, dtype=torch.float64)
>>> r = DisentanglementResult(g, g, torch.zeros(3, 3), torch.zeros(2, 3, 3), "classification", False)
>>> ax = plot_disentanglement(r, title="xi")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ParameterError
from .disentanglement import DisentanglementResult

__all__ = ["plot_disentanglement"]


def plot_disentanglement(
    result: DisentanglementResult | torch.Tensor,
    a1: torch.Tensor | None = None,
    a2: torch.Tensor | None = None,
    *,
    ax: Any = None,
    title: str = "",
    vmax: float | None = None,
    cmap: str = "viridis",
    colorbar: bool = True,
) -> Any:
    """Heat map of ``xi(a1, a2)``: ``a1`` on the horizontal axis, ``a2`` vertical (as in the paper's Fig. 3).

    Parameters
    ----------
    result : a :class:`~layerwise.tangent.disentanglement.DisentanglementResult`, or a (G1, G2) tensor
        (e.g. an average over seeds) together with ``a1`` (G1,) and ``a2`` (G2,).
    ax : matplotlib Axes (a new figure when None). vmax : colour-scale maximum (shared across panels).
    Returns the Axes.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(result, DisentanglementResult):
        xi, a1, a2 = result.xi, result.a1, result.a2
    else:
        xi = torch.as_tensor(result)
        if a1 is None or a2 is None:
            raise ParameterError("a1 and a2 are required when result is a tensor")
    a1, a2 = torch.as_tensor(a1, dtype=torch.float64), torch.as_tensor(a2, dtype=torch.float64)
    if xi.shape != (a1.numel(), a2.numel()):
        raise ParameterError(
            f"xi must have shape (len(a1), len(a2)) = {(a1.numel(), a2.numel())}, got {tuple(xi.shape)}"
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3.4))

    def edges(a: torch.Tensor) -> list[float]:
        if a.numel() == 1:
            return [float(a[0]) - 0.5, float(a[0]) + 0.5]
        mid = ((a[1:] + a[:-1]) / 2).tolist()
        return [2 * float(a[0]) - mid[0], *mid, 2 * float(a[-1]) - mid[-1]]

    mesh = ax.pcolormesh(
        edges(a1), edges(a2), xi.T.double().numpy(), cmap=cmap, vmin=0.0, vmax=vmax, shading="flat"
    )
    ax.set_xlabel("alpha_1")
    ax.set_ylabel("alpha_2")
    ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(mesh, ax=ax, label="xi (disagreement)")
    return ax
