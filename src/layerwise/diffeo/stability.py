"""Relative stability toward diffeomorphisms: D_f, G_f and R_f = D_f / G_f of any torch model, per layer.

Petrini, Favero, Geiger, Wyart, NeurIPS 2021, eqs. (5)-(7). For test images x, a maximum-entropy diffeo
``tau`` at temperature T and Gaussian noise ``eta`` rescaled per image so that ``||eta|| = ||tau x - x||``::

    D_f = E_x ||f(tau x) - f(x)||^2 / E_{x,z} ||f(x) - f(z)||^2
    G_f = E_x ||f(x + eta) - f(x)||^2 / E_{x,z} ||f(x) - f(z)||^2
    R_f = D_f / G_f

``f`` is the output of any module of the model, picked by its name in ``model.named_modules()``; the empty
name ``""`` is the model itself (its output, the logits: the default).

Noise norm: ``noise_norm="mean"`` (default) is the paper's: every noise vector has the same norm, the mean
of ``||tau x - x||`` over the images and draws; ``"per_image"`` matches each noise vector to its own image's
diffeo change. In the linear regime the two G_f differ by ``E[n^2] / E[n]^2`` (``n = ||tau x - x||``).
``noise_basis`` draws the noise inside a subspace (the in-support control, see
:mod:`layerwise.diffeo.support`).

Estimators: ``"mean"`` is the paper's definition (averages; the denominator over all distinct pairs,
computed from running sums without storing features). ``"median"`` replaces each average by a median over
images (and the denominator by the median over all distinct pairs, which needs the clean features of the
layer: N x D floats kept on the CPU). The authors' code takes medians too, but per output coordinate and
then sums them; our per-image median is the robust version of the same ratio.

>>> import torch
>>> from layerwise.diffeo import relative_stability
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
>>> res = relative_stability(model, torch.rand(64, 3, 16, 16), layers=["", "0"], c=3, seed=0,
...                          noise_norm="per_image", progress=False)
>>> sorted(res), round(res["0"].R, 6)   # the identity (Flatten) with per-image noise norms: R = 1 exactly
(['', '0'], 1.0)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .._resources import check_memory
from ..errors import InputDataError, ParameterError, ParameterTypeError, ResourceError
from ._checks import check_choice, check_float, check_images, check_int, generator_of
from .fields import sample_fields, temperature_for_displacement, temperature_range
from .transform import MODES, deform

__all__ = ["Stability", "relative_stability", "ESTIMATORS", "NOISE_NORMS"]

ESTIMATORS = ("mean", "median")
NOISE_NORMS = ("mean", "per_image")


@dataclass(frozen=True)
class Stability:
    """Stabilities of one layer.

    Attributes
    ----------
    layer : module name (``""`` = the model's output).
    D, G, R : D_f, G_f and R_f = D_f / G_f.
    diffeo_sq, noise_sq : numerators, ``E ||f(tau x) - f(x)||^2`` and ``E ||f(x + eta) - f(x)||^2``
        (or their medians).
    pair_sq : denominator ``E_{x != z} ||f(x) - f(z)||^2`` (or its median).
    estimator, c, T, n_images, n_repeats, noise_norm : the settings used.
    noise_rank : dimension of the noise subspace (``noise_basis``), None for isotropic noise.
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
    noise_norm: str = "mean"
    noise_rank: int | None = None

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-serialisable)."""
        return asdict(self)


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



_ROUNDOFF = 64.0  # changes below 64 machine epsilons (relative) are round-off, not signal


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps


def _check_T(T: float | None, size: int, c: int, allow_below_T_min: bool) -> float:
    if T is None:
        return temperature_for_displacement(size, c, 1.0)
    T = check_float("T", T, low=0.0)
    t_min = temperature_range(size, c)[0] if c >= 2 else None
    shown = f"T_min = 1 / (pi n^2 ln c) = {t_min:.3g} for n = {size}, c = {c}" if t_min else "c = 1"
    if T == 0.0:
        raise ParameterError(f"T must be > 0: at T = 0 the diffeo is the identity, D_f = G_f = 0 and R_f is "
                             f"0/0 ({shown})")
    if t_min is not None and T < t_min and not allow_below_T_min:
        raise ParameterError(f"T = {T:.3g} is below {shown} (typical displacement under half a pixel); "
                             "use T >= T_min, or allow_below_T_min=True (CLI: --allow-below-T-min) to "
                             "measure sub-pixel diffeos")
    return T


def _check_basis(basis: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor | None:
    if basis is None:
        return None
    d = images[0].numel()
    if not isinstance(basis, torch.Tensor) or basis.dim() != 2 or basis.shape[1] != d or basis.shape[0] < 1:
        shape = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
        raise ParameterError(f"noise_basis must be a tensor (k, C*H*W) = (k, {d}) with k >= 1, got {shape}")
    basis = basis.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(basis).all()):
        raise ParameterError("noise_basis holds NaN or inf")
    gram = basis @ basis.T
    if float((gram - torch.eye(len(basis), dtype=torch.float64)).abs().max()) > 1e-6:
        raise ParameterError("noise_basis must have orthonormal rows (e.g. from principal_subspace)")
    return basis


def _check_finite_images(images: torch.Tensor) -> None:
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite.flatten(1)).any(1).sum())
        raise InputDataError(f"images: {bad} of {len(images)} images hold NaN or inf values")
    flat = images.flatten(1)
    if bool((flat.amax(1) == flat.amin(1)).all()):
        raise InputDataError("images: every image is constant (one value per image): a diffeo does not "
                             "change a flat image, so D_f and G_f are 0 and R_f is 0/0")
    if bool((flat == flat[:1]).all()):
        raise InputDataError("images: all images are identical: the denominator E||f(x) - f(z)||^2 is 0")


def _check_finite_model(model: torch.nn.Module) -> None:
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ParameterError(f"model: {kind} {name!r} holds NaN or inf values")


def _forward(model: torch.nn.Module, recorder: _Recorder, x: torch.Tensor,
             what: str) -> dict[str, torch.Tensor]:
    model(x)
    out = dict(recorder.outputs)
    for name, f in out.items():
        if not bool(torch.isfinite(f).all()):
            shown = repr(name) if name else "'' (the output)"
            raise ParameterError(f"model: layer {shown} gives NaN or inf on {what} (finite inputs): the "
                                 "model produces non-finite values")
    return out


def _check_time(elapsed: float, n_steps: int, max_seconds: float, n: int, n_repeats: int) -> None:
    estimate = 2.0 * elapsed * n_steps  # sweep 1 and sweep 2 cost about the same
    if estimate > max_seconds:
        raise ResourceError(f"relative stability of {n} images x {n_repeats} repeats would take about "
                            f"{_duration(estimate)} (first batch: {elapsed:.2g} s), over the limit of "
                            f"{_duration(max_seconds)}; reduce n_repeats or the number of images, or raise "
                            "the limit (max_seconds; CLI: --max-hours)")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    if seconds < 86400 * 3:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} days"


def _check_change(norms: torch.Tensor, images: torch.Tensor, T: float, h: int, w: int, c: int) -> None:
    """Refuse when the diffeos move the images by round-off only (T too small for the dtype)."""
    scale = float(images.flatten(1).to(torch.float64).norm(dim=1).mean())
    change = float(norms.mean())
    if change <= _ROUNDOFF * _eps(images.dtype) * scale:
        t_min = f"; T_min = {temperature_range(min(h, w), c)[0]:.3g}" if c >= 2 else ""
        raise ParameterError(f"T = {T:.3g}: the diffeos change the images by round-off only (mean "
                             f"||tau x - x|| / ||x|| = {change / scale:.2g} in {images.dtype}), so D_f, G_f "
                             f"and R_f would measure round-off{t_min}; use a larger T")


def _noise(x: torch.Tensor, size: torch.Tensor, gen: torch.Generator,
           basis: torch.Tensor | None) -> torch.Tensor:
    """Gaussian noise, isotropic (in the span of ``basis`` if given), of norm ``size[b]`` per image."""
    b = x.shape[0]
    if basis is None:
        z = torch.randn(x.shape, generator=gen, dtype=torch.float64).flatten(1)  # (B, D)
    else:
        z = torch.randn(b, basis.shape[0], generator=gen, dtype=torch.float64) @ basis  # (B, D)
    z = z * (size.to(torch.float64) / z.norm(dim=1)).reshape(-1, 1)
    return z.reshape(x.shape).to(dtype=x.dtype, device=x.device)


def _pair(estimator: str, n: int, sum_sq: float, sum_f: torch.Tensor, clean: list[torch.Tensor]) -> float:
    """The denominator E_{x != z} ||f(x) - f(z)||^2 (mean) or its median, over all N images."""
    if estimator == "mean":
        # sum_{i != j} ||f_i - f_j||^2 = 2 N sum_i ||f_i||^2 - 2 ||sum_i f_i||^2
        pair = (2 * n * sum_sq - 2 * float((sum_f**2).sum())) / (n * (n - 1))
        return max(pair, 0.0)  # rounding can leave -0 for a constant layer
    return _pair_median(torch.cat(clean))


def _check_layer(name: str, pair: float, mean_sq: float) -> None:
    shown = repr(name) if name else "'' (the output)"
    if pair <= (_ROUNDOFF * _eps(torch.float32)) ** 2 * mean_sq or pair == 0.0:
        raise ParameterError(f"model: layer {shown} is constant on these images (its outputs differ by "
                             "round-off only), so D_f and G_f are 0/0; pick another layer or check the model")


def relative_stability(
    model: torch.nn.Module,
    images: torch.Tensor,
    layers: Sequence[str] | None = None,
    c: int = 3,
    T: float | None = None,
    n_repeats: int = 1,
    estimator: str = "mean",
    *,
    noise_norm: str = "mean",
    noise_basis: torch.Tensor | None = None,
    mode: str = "bilinear",
    batch_size: int = 128,
    seed: int | torch.Generator | None = 0,
    allow_below_T_min: bool = False,
    max_seconds: float | None = None,
    progress: bool = True,
) -> dict[str, Stability]:
    """Measure D_f, G_f and R_f of ``model`` on ``images`` at one or more layers.

    Parameters
    ----------
    model : any ``torch.nn.Module`` taking a batch (B, C, H, W). Used as is: call ``model.eval()`` first
        if it has dropout or batch norm; gradients are off. Its parameters and buffers must be finite.
    images : (N, C, H, W) floating tensor, N >= 2, finite, on the model's device (the paper uses ~500 test
        images). Not all images may be constant (a diffeo does not move a flat image) or identical.
    layers : module names from ``model.named_modules()``; ``""`` (default) is the model's output.
    c : cutoff of the diffeos (>= 1; the paper uses 3, 5, 15).
    T : temperature (> 0). Default: the T whose asymptotic typical displacement is 1 pixel,
        ``4 / (pi n^2 ln c)`` with n = min(H, W) (needs c >= 2). A T below ``T_min = 1 / (pi n^2 ln c)``
        (typical displacement under half a pixel) is refused unless ``allow_below_T_min``; a T whose
        diffeos move the images by round-off only is always refused.
    n_repeats : independent diffeo and noise draws per image.
    estimator : ``"mean"`` (the paper's averages) or ``"median"`` (see the module docstring).
    noise_norm : ``"mean"`` (default, the paper's): every noise vector has the norm
        ``mean_x ||tau x - x||`` over all images and draws; ``"per_image"``: each noise vector has the norm
        of its own image's diffeo change. For a linear model the two G_f differ by
        ``E[n^2] / E[n]^2`` with ``n = ||tau x - x||`` (about 1.07 on natural images).
    noise_basis : optional (k, C*H*W) tensor with orthonormal rows: the noise is drawn isotropically
        inside their span (e.g. :func:`layerwise.diffeo.principal_subspace` of the training images: the
        in-support control) instead of over every pixel direction.
    mode : interpolation of the diffeos, ``"bilinear"`` or ``"nearest"``.
    batch_size : images per forward pass; memory is O(batch_size) activations (plus, for the median,
        the clean features N x D of each requested layer).
    seed : int, CPU ``torch.Generator`` or None. The same seed and batch_size give the same numbers.
    allow_below_T_min : accept 0 < T < T_min (sub-pixel diffeos, as in the paper's low-T curves).
    max_seconds : refuse (``ResourceError``, with the estimate) when the time measured on the first batch
        extrapolates beyond this many seconds. None: no limit.
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
    T = _check_T(T, min(h, w), c, allow_below_T_min)
    n_repeats = check_int("n_repeats", n_repeats, low=1)
    estimator = check_choice("estimator", estimator, ESTIMATORS)
    noise_norm = check_choice("noise_norm", noise_norm, NOISE_NORMS)
    mode = check_choice("mode", mode, MODES)
    batch_size = check_int("batch_size", batch_size, low=1)
    if max_seconds is not None:
        max_seconds = check_float("max_seconds", max_seconds, low=0.0, low_open=True)
    basis = _check_basis(noise_basis, images)
    _check_finite_images(images)
    _check_finite_model(model)
    # Per-draw values kept on the CPU: diffeo and noise numerators per layer, and the change norms.
    check_memory(8 * n * n_repeats * (2 * len(layers) + 1),
                 f"relative stability of {n} images x {n_repeats} repeats x {len(layers)} layer(s)")
    gen = generator_of(seed)

    recorder = _Recorder(model, layers)
    sum_sq = {k: 0.0 for k in layers}  # sum_i ||f(x_i)||^2
    sum_f: dict[str, torch.Tensor] = {}  # sum_i f(x_i)
    clean: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    diffeo_sq: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    noise_sq: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    norms: list[torch.Tensor] = []  # ||tau x - x|| per (batch, repeat), each (B,)
    starts = list(range(0, n, batch_size))
    bar = tqdm(total=2 * len(starts) * n_repeats, desc="relative stability", disable=not progress,
               leave=False)
    clock = time.perf_counter()
    try:
        with torch.no_grad():
            # Sweep 1: clean features (denominator) and diffeos (D_f numerator, change norms).
            for b, start in enumerate(starts):
                x = images[start:start + batch_size]  # (B, C, H, W)
                f0 = _forward(model, recorder, x, "the clean images")
                for k in layers:
                    sum_sq[k] += float((f0[k] ** 2).sum())
                    sum_f[k] = f0[k].sum(0) + sum_f.get(k, 0.0)
                    if estimator == "median":
                        if b == 0:
                            check_memory(4 * n * f0[k].shape[1], f"the clean features of layer {k!r} "
                                         "(estimator='median')")
                        clean[k].append(f0[k].float().cpu())
                for _ in range(n_repeats):
                    fields = sample_fields(x.shape[0], h, w, c, T, gen, dtype=x.dtype, device=x.device)
                    xd = deform(x, fields, mode=mode)  # tau x
                    norms.append((xd - x).flatten(1).norm(dim=1).to("cpu", torch.float64))
                    fd = _forward(model, recorder, xd, "the deformed images")
                    for k in layers:
                        diffeo_sq[k].append(((fd[k] - f0[k]) ** 2).sum(1).cpu())  # (B,)
                    bar.update(1)
                    if b == 0 and max_seconds is not None and len(norms) == 1:
                        _check_time(time.perf_counter() - clock, len(starts) * n_repeats, max_seconds,
                                    n, n_repeats)
            all_norms = torch.cat(norms)  # (N * n_repeats,)
            _check_change(all_norms, images, T, h, w, c)
            pairs = {k: _pair(estimator, n, sum_sq[k], sum_f[k], clean[k]) for k in layers}
            for k in layers:  # before the noise sweep: a constant layer makes every ratio 0/0
                _check_layer(k, pairs[k], sum_sq[k] / n)
            target = float(all_norms.mean())  # the paper's: one norm for every noise vector
            # Sweep 2: noise of the chosen norm (G_f numerator), on the same clean features.
            draw = 0
            for start in starts:
                x = images[start:start + batch_size]
                f0 = _forward(model, recorder, x, "the clean images")
                for _ in range(n_repeats):
                    size = norms[draw] if noise_norm == "per_image" else torch.full((x.shape[0],), target,
                                                                               dtype=torch.float64)
                    draw += 1
                    xn = x + _noise(x, size, gen, basis)  # x + eta
                    fn = _forward(model, recorder, xn, "the noisy images")
                    for k in layers:
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
        else:
            d_num, g_num = float(d_vals.median()), float(g_vals.median())
        pair = pairs[k]
        if g_num <= (_ROUNDOFF * _eps(torch.float32)) ** 2 * sum_sq[k] / n or g_num == 0.0:
            shown = repr(k) if k else "'' (the output)"
            raise ParameterError(f"model: layer {shown} does not respond to the noise beyond round-off "
                                 f"(G_f = {g_num / pair:.2g}), so R_f is undefined")
        results[k] = Stability(
            layer=k, D=d_num / pair, G=g_num / pair, R=d_num / g_num, diffeo_sq=d_num, noise_sq=g_num,
            pair_sq=pair, estimator=estimator, c=c, T=T, n_images=n, n_repeats=n_repeats,
            noise_norm=noise_norm, noise_rank=None if basis is None else basis.shape[0],
        )
    return results
