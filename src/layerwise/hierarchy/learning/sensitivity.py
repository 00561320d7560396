"""Synonymic sensitivity of a network's layers, and the correlation estimate of the sample complexity.

Cagnetta, Petrini, Tomasini, Favero, Wyart, PRX 14, 031001 (2024).

Synonymic sensitivity of layer ``k`` to exchanges at level ``l``::

    S_{k,l} = E_x ||f_k(x) - f_k(P_l x)||^2 / E_{x,y} ||f_k(x) - f_k(y)||^2

where ``P_l x`` is :meth:`layerwise.hierarchy.RHM.resample_level` (``level = l``): the symbols at levels
``<= l`` are kept, every rule choice from level ``l`` down is re-drawn and the input regenerated. So
``level = L - 1`` swaps each input s-tuple for a random synonym, and ``level = 0`` keeps only the class.
``x`` and ``y`` are independent data. A layer that has learned the grammar up to level ``l`` is invariant to
``P_l`` (``S ~ 0``); the raw input is not. The paper numbers layers from the input and levels from the bottom
and reports ``S_{2,1}`` (second layer, synonyms of the input-level tuples): for a
:class:`~layerwise.hierarchy.learning.HierarchicalCNN` that is ``layers=["layers.1"]`` with ``level = L - 1``.

Correlation estimate of ``P*``: the class-conditional frequency of the tuple at one input patch deviates
from its class average by a relative amount ``sigma`` (:func:`~layerwise.hierarchy.statistics.
relative_fluctuation`); measured from ``P`` data it is ``sqrt(sigma**2 + noise**2)``, the noise being what
the same statistic gives with the labels shuffled (``~ sqrt(v m n_c / P)``). The signal emerges from the
noise (measured / noise = sqrt(2)) at ``P ~ n_c m**L``, the paper's sample complexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..._validation import check_float, check_int, make_generator
from ..rhm import RHM, RHMSample, one_hot
from ..statistics import empirical_tuple_class_frequencies, relative_fluctuation, tuple_class_frequencies

__all__ = [
    "default_layers",
    "layer_outputs",
    "synonymic_sensitivity",
    "CorrelationEstimate",
    "correlation_curve",
    "correlation_sample_complexity",
]

INPUT, OUTPUT = "input", "output"


def default_layers(model: nn.Module) -> list[str]:
    """``input``, the model's numbered hidden layers (``layers.k`` or ``blocks.k``) and ``output``."""
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] in ("layers", "blocks") and parts[1].isdigit():
            names.append(name)
    return [INPUT, *names, OUTPUT]


def layer_outputs(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` and return ``{name: (N, features) output}`` of the named modules, read with
    forward hooks (``"input"`` is ``x`` itself, ``"output"`` the model's output)."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in (INPUT, OUTPUT) and n not in modules]
    if missing:
        valid = [n for n in modules if n]
        raise ValueError(
            f"layers {missing} are not modules of the model; valid: {valid} (and 'input', 'output')")
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        if name in (INPUT, OUTPUT):
            continue

        def hook(_module, _inputs, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            seen[name] = out.detach().reshape(out.shape[0], -1)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    seen[INPUT] = x.detach().reshape(x.shape[0], -1)
    seen[OUTPUT] = out.detach().reshape(out.shape[0], -1)
    return {name: seen[name] for name in layers}


@torch.no_grad()
def synonymic_sensitivity(
    model: nn.Module,
    rhm: RHM,
    level: int,
    layers: Sequence[str] | None = None,
    *,
    n: int = 1024,
    seed: int | torch.Generator | None = 0,
    whiten: bool = False,
    batch_size: int = 1024,
) -> dict[str, float]:
    """``S_{k,level}`` of every layer ``k`` in ``layers`` (module names; default :func:`default_layers`).

    Parameters
    ----------
    model : takes one-hot inputs (N, v, d) (on the model's device and dtype) and returns logits.
    rhm : the generator of the data (its latent trees give the synonymic exchanges).
    level : the exchange level ``l`` in ``[0, L-1]`` (see the module docstring).
    layers : module names, plus ``"input"`` and ``"output"``.
    n : number of data ``x`` (and of independent ``y``) averaged over.
    seed : seed of ``x``, ``y`` and the exchanges.
    whiten : feed whitened one-hot inputs instead of plain one-hot.
    batch_size : data per forward pass.

    Returns
    -------
    dict name -> S (float; NaN where the denominator vanishes, e.g. a constant layer).
    """
    if not isinstance(rhm, RHM):
        raise TypeError(f"rhm must be an RHM, got {type(rhm).__name__}")
    level = check_int("level", level, low=0, high=rhm.L - 1)
    n = check_int("n", n, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    layers = default_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    gen = make_generator(seed)
    x = rhm.sample(n, seed=gen)
    px = rhm.resample_level(x, level, seed=gen)
    y = rhm.sample(n, seed=gen)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    was_training = model.training
    model.eval()

    def encode(sample: RHMSample, start: int) -> torch.Tensor:
        tokens = sample.tokens[start : start + batch_size]
        return one_hot(tokens, rhm.v, whiten=whiten, dtype=dtype).to(device)

    num = dict.fromkeys(layers, 0.0)
    den = dict.fromkeys(layers, 0.0)
    try:
        for start in range(0, n, batch_size):
            fx = layer_outputs(model, encode(x, start), layers)
            fp = layer_outputs(model, encode(px, start), layers)
            fy = layer_outputs(model, encode(y, start), layers)
            for name in layers:
                num[name] += float(((fx[name] - fp[name]).double() ** 2).sum())
                den[name] += float(((fx[name] - fy[name]).double() ** 2).sum())
    finally:
        model.train(was_training)
    return {name: num[name] / den[name] if den[name] > 0 else float("nan") for name in layers}


# ----------------------------------------------------------------------------------- correlations
@dataclass(frozen=True)
class CorrelationEstimate:
    """Correlation estimate of ``P*``.

    Attributes
    ----------
    P_star : the interpolated P at which measured / noise crosses ``threshold`` (``inf`` if it never does
        on the grid; the first grid point if it already does there -- then ``bracketed`` is False).
    bracketed : True when the crossing lies strictly inside the grid.
    P : the grid; measured, noise : the fluctuation with true and with shuffled labels (means over
        repeats); ratio : measured / noise; exact : the exact fluctuation of the rules (no sampling).
    threshold : the crossing level (default sqrt(2): signal = noise).
    """

    P_star: float
    bracketed: bool
    P: tuple[int, ...]
    measured: tuple[float, ...]
    noise: tuple[float, ...]
    ratio: tuple[float, ...]
    exact: float
    threshold: float


def correlation_curve(
    rhm: RHM, P_values: Sequence[int], *, patch: int = 0, n_repeats: int = 4, seed: int | torch.Generator = 0
) -> tuple[list[float], list[float]]:
    """Fluctuation of the class-conditional frequencies of the tuple at ``patch`` measured from ``P`` i.i.d.
    data, with true labels and with shuffled labels, averaged over ``n_repeats`` draws: two lists."""
    gen = make_generator(seed)
    n_repeats = check_int("n_repeats", n_repeats, low=1)
    measured, noise = [], []
    for P in P_values:
        P = check_int("P_values entry", P, low=2)
        meas = shuf = 0.0
        for _ in range(n_repeats):
            data = rhm.sample(P, seed=gen)
            meas += relative_fluctuation(
                empirical_tuple_class_frequencies(data, rhm.v, rhm.n_c, rhm.s, patch))
            perm = torch.randperm(P, generator=gen)
            shuffled = RHMSample(labels=data.labels[perm], tree=data.tree, choices=data.choices)
            shuf += relative_fluctuation(
                empirical_tuple_class_frequencies(shuffled, rhm.v, rhm.n_c, rhm.s, patch))
        measured.append(meas / n_repeats)
        noise.append(shuf / n_repeats)
    return measured, noise


def correlation_sample_complexity(
    rhm: RHM,
    P_values: Sequence[int] | None = None,
    *,
    patch: int = 0,
    n_repeats: int = 4,
    threshold: float = math.sqrt(2.0),
    seed: int | torch.Generator = 0,
) -> CorrelationEstimate:
    """Estimate ``P*`` as the number of data at which the class-tuple correlations emerge from the
    sampling noise (see the module docstring).

    ``P_values`` default: ``n_c m**L * 2**k`` for ``k = -4..4``. Returns a :class:`CorrelationEstimate`.
    """
    if P_values is None:
        base = rhm.n_c * rhm.m**rhm.L
        P_values = [max(2, round(base * 2.0**k)) for k in range(-4, 5)]
    P_values = sorted({check_int("P_values entry", p, low=2) for p in P_values})
    threshold = check_float("threshold", threshold, low=1.0, low_open=True)
    measured, noise = correlation_curve(rhm, P_values, patch=patch, n_repeats=n_repeats, seed=seed)
    ratio = [m / z if z > 0 else float("inf") for m, z in zip(measured, noise, strict=True)]
    exact = relative_fluctuation(tuple_class_frequencies(rhm, patch))
    above = [k for k, r in enumerate(ratio) if r >= threshold]
    if not above:
        p_star, bracketed = float("inf"), False
    elif above[0] == 0:
        p_star, bracketed = float(P_values[0]), False
    else:
        k = above[0]
        lo, hi = math.log(ratio[k - 1]), math.log(ratio[k])
        t = (math.log(threshold) - lo) / (hi - lo) if hi > lo else 1.0
        log_lo, log_hi = math.log(P_values[k - 1]), math.log(P_values[k])
        p_star = math.exp(log_lo + t * (log_hi - log_lo))
        bracketed = True
    return CorrelationEstimate(P_star=p_star, bracketed=bracketed, P=tuple(P_values),
                               measured=tuple(measured), noise=tuple(noise), ratio=tuple(ratio), exact=exact,
                               threshold=threshold)
