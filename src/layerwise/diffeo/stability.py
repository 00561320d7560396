"""Relative stability toward diffeomorphisms: D_f, G_f and R_f = D_f / G_f of any torch model, per layer.

Petrini, Favero, Geiger, Wyart, NeurIPS 2021, eqs. (5)-(7). For test images x, a maximum-entropy diffeo
``tau`` at temperature T and Gaussian noise ``eta`` rescaled per image so that ``||eta|| = ||tau x - x||``::

    D_f = E_x ||f(tau x) - f(x)||^2 / E_{x,z} ||f(x) - f(z)||^2
    G_f = E_x ||f(x + eta) - f(x)||^2 / E_{x,z} ||f(x) - f(z)||^2
    R_f = D_f / G_f

``f`` is the output of any module of the model, picked by its name in ``model.named_modules()``; the empty
name ``""`` is the model itself (its output, the logits: the default).

Estimators: ``"mean"`` is the paper's definition (averages; the denominator over all distinct pairs,
computed from running sums without storing features). ``"median"`` replaces each average by a median over
images (and the denominator by the median over all distinct pairs, which needs the clean features of the
layer: N x D floats kept on the CPU). The authors' code takes medians too, but per output coordinate and
then sums them; our per-image median is the robust version of the same ratio.

>>> import torch
>>> from layerwise.diffeo import relative_stability
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
>>> res = relative_stability(model, torch.rand(64, 3, 16, 16), layers=["", "0"], c=3, seed=0,
...                          progress=False)
>>> sorted(res), round(res["0"].R, 6)              # the identity (Flatten) has R = 1 exactly
(['', '0'], 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..errors import ParameterError, ParameterTypeError
from ._checks import check_choice, check_float, check_images, check_int, generator_of
from .fields import sample_fields, temperature_for_displacement
from .transform import MODES, deform, matched_noise

__all__ = ["Stability", "relative_stability", "ESTIMATORS"]

ESTIMATORS = ("mean", "median")


@dataclass(frozen=True)
class Stability:
    """Stabilities of one layer.

    Attributes
    ----------
    layer : module name (``""`` = the model's output).
    D, G, R : D_f, G_f and R_f = D_f / G_f (R is nan when G_f = 0).
    diffeo_sq, noise_sq : numerators, ``E ||f(tau x) - f(x)||^2`` and ``E ||f(x + eta) - f(x)||^2``
        (or their medians).
    pair_sq : denominator ``E_{x != z} ||f(x) - f(z)||^2`` (or its median).
    estimator, c, T, n_images, n_repeats : the settings used.
    """

    layer: str
    D: float
    G: float
    R: float
    diffeo_sq: float
    noise_sq: float
    pair_sq: float
    estimator: str
    c: int
    T: float
    n_images: int
    n_repeats: int

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-serialisable)."""
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    # 0 / 0 -> 0: a layer that does not move at all is perfectly stable (e.g. a constant model).
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def _pair_median(features: torch.Tensor, block: int = 256) -> float:
    """Median of ``||f_i - f_j||^2`` over pairs i < j; features (N, D), computed in row blocks."""
    n = features.shape[0]
    parts = []
    for start in range(0, n, block):
        rows = features[start:start + block]  # (b, D)
        d2 = torch.cdist(rows, features).pow(2)  # (b, N)
        i = torch.arange(start, start + rows.shape[0])[:, None]
        parts.append(d2[torch.arange(n)[None, :] > i])  # keep j > i
    return float(torch.cat(parts).median())


class _Recorder:
    """Forward hooks that keep the latest output of each named module."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            valid = [name for name in modules if name][:20]
            raise ParameterError(f"layers {missing} not found in the model; valid names are '' (the model's "
                                 f"output) and its modules, e.g. {valid}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = next((o for o in output if isinstance(o, torch.Tensor)), None)
            if not isinstance(output, torch.Tensor):
                raise ParameterTypeError(f"layers: the output of module {name!r} is not a tensor "
                                         f"({type(output).__name__}); pick another layer")
            self.outputs[name] = output.detach().flatten(1).to(torch.float64)  # (B, D)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def relative_stability(
    model: torch.nn.Module,
    images: torch.Tensor,
    layers: Sequence[str] | None = None,
    c: int = 3,
    T: float | None = None,
    n_repeats: int = 1,
    estimator: str = "mean",
    *,
    mode: str = "bilinear",
    batch_size: int = 128,
    seed: int | torch.Generator | None = 0,
    progress: bool = True,
) -> dict[str, Stability]:
    """Measure D_f, G_f and R_f of ``model`` on ``images`` at one or more layers.

    Parameters
    ----------
    model : any ``torch.nn.Module`` taking a batch (B, C, H, W). Used as is: call ``model.eval()`` first
        if it has dropout or batch norm; gradients are off.
    images : (N, C, H, W) floating tensor, N >= 2, on the model's device (the paper uses ~500 test images).
    layers : module names from ``model.named_modules()``; ``""`` (default) is the model's output.
    c : cutoff of the diffeos (>= 1; the paper uses 3, 5, 15).
    T : temperature (>= 0). Default: the T whose asymptotic typical displacement is 1 pixel,
        ``4 / (pi n^2 ln c)`` with n = min(H, W) (needs c >= 2).
    n_repeats : independent diffeo and noise draws per image.
    estimator : ``"mean"`` (the paper's averages) or ``"median"`` (see the module docstring).
    mode : interpolation of the diffeos, ``"bilinear"`` or ``"nearest"``.
    batch_size : images per forward pass; memory is O(batch_size) activations (plus, for the median,
        the clean features N x D of each requested layer).
    seed : int, CPU ``torch.Generator`` or None. The same seed and batch_size give the same numbers.
    progress : show a tqdm progress bar.

    Returns
    -------
    dict mapping each layer name to its :class:`Stability`.
    """
    if not isinstance(model, torch.nn.Module):
        raise ParameterTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    images = check_images("images", images)
    n, _, h, w = images.shape
    if n < 2:
        raise ParameterError(f"images must hold at least 2 images (the denominator compares pairs), got {n}")
    if layers is None:
        layers = [""]
    if isinstance(layers, str) or not all(isinstance(name, str) for name in layers) or not layers:
        raise ParameterError(f"layers must be a non-empty list of module names, got {layers!r}")
    layers = list(dict.fromkeys(layers))
    c = check_int("c", c, low=1)
    T = temperature_for_displacement(min(h, w), c, 1.0) if T is None else check_float("T", T, low=0.0)
    n_repeats = check_int("n_repeats", n_repeats, low=1)
    estimator = check_choice("estimator", estimator, ESTIMATORS)
    mode = check_choice("mode", mode, MODES)
    batch_size = check_int("batch_size", batch_size, low=1)
    gen = generator_of(seed)

    recorder = _Recorder(model, layers)
    # Running sums (mean) or per-image values and clean features (median), per layer.
    sum_sq = {k: 0.0 for k in layers}  # sum_i ||f(x_i)||^2
    sum_f: dict[str, torch.Tensor] = {}  # sum_i f(x_i)
    clean: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    diffeo_sq: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    noise_sq: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    n_batches = math.ceil(n / batch_size)
    bar = tqdm(total=n_batches * n_repeats, desc="relative stability", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                x = images[start:start + batch_size]  # (B, C, H, W)
                model(x)
                f0 = dict(recorder.outputs)  # (B, D) per layer
                for k in layers:
                    sum_sq[k] += float((f0[k] ** 2).sum())
                    sum_f[k] = f0[k].sum(0) + sum_f.get(k, 0.0)
                    if estimator == "median":
                        clean[k].append(f0[k].float().cpu())
                for _ in range(n_repeats):
                    fields = sample_fields(x.shape[0], h, w, c, T, gen, dtype=x.dtype, device=x.device)
                    xd = deform(x, fields, mode=mode)  # tau x
                    xn = x + matched_noise(x, xd, gen)  # x + eta, ||eta|| = ||tau x - x||
                    model(xd)
                    fd = dict(recorder.outputs)
                    model(xn)
                    fn = recorder.outputs
                    for k in layers:
                        diffeo_sq[k].append(((fd[k] - f0[k]) ** 2).sum(1).cpu())  # (B,)
                        noise_sq[k].append(((fn[k] - f0[k]) ** 2).sum(1).cpu())  # (B,)
                    bar.update(1)
    finally:
        recorder.remove()
        bar.close()

    results = {}
    for k in layers:
        d_vals = torch.cat(diffeo_sq[k])  # (N * n_repeats,)
        g_vals = torch.cat(noise_sq[k])
        if estimator == "mean":
            d_num, g_num = float(d_vals.mean()), float(g_vals.mean())
            # sum_{i != j} ||f_i - f_j||^2 = 2 N sum_i ||f_i||^2 - 2 ||sum_i f_i||^2
            pair = (2 * n * sum_sq[k] - 2 * float((sum_f[k] ** 2).sum())) / (n * (n - 1))
            pair = max(pair, 0.0)  # rounding can leave -0 for a constant layer
        else:
            d_num, g_num = float(d_vals.median()), float(g_vals.median())
            pair = _pair_median(torch.cat(clean[k]))
        R = d_num / g_num if g_num > 0 else math.nan
        results[k] = Stability(
            layer=k, D=_ratio(d_num, pair), G=_ratio(g_num, pair), R=R, diffeo_sq=d_num, noise_sq=g_num,
            pair_sq=pair, estimator=estimator, c=c, T=T, n_images=n, n_repeats=n_repeats,
        )
    return results
