"""Statistics that data-dependent merges need, computed on a few of the user's batches.

- :func:`collect_regmean_stats`: for every ``nn.Linear`` the Gram matrix ``G = X^T X`` (in, in) of its inputs
  (rows of all positions of all batches; float64), and the number of rows ``n`` (RegMean, Jin et al. 2023).
- :func:`collect_fisher`: the diagonal empirical Fisher of every parameter, the mean over batches of the
  squared gradient of ``loss_fn(model, batch)`` (Fisher merging, Matena & Raffel 2022). With batches of one
  example this is the per-example empirical Fisher of the paper; larger batches square the batch-mean
  gradient (cheaper, a coarser estimate).

A batch is passed to the model as ``model(batch)`` for a tensor, ``model(*batch)`` for a tuple or list and
``model(**batch)`` for a mapping. Both functions leave the model's mode and gradients as they found them.
:func:`save_statistics` / :func:`load_statistics` keep them in one safetensors file per model.

Example
-------
>>> import torch
>>> lin = torch.nn.Linear(2, 1, bias=False)
>>> stats = collect_regmean_stats(lin, [torch.tensor([[1.0, 0.0], [1.0, 2.0]])])
>>> stats["weight"].tolist(), stats.counts["weight"]
([[2.0, 2.0], [2.0, 4.0]], 2)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError, InputDataError, ParameterError, ParameterTypeError

__all__ = [
    "Statistics",
    "collect_regmean_stats",
    "collect_fisher",
    "save_statistics",
    "load_statistics",
]

_COUNT = "__count__."


class Statistics(dict):
    """``name -> tensor`` (a Gram matrix per linear weight, or a Fisher per parameter), with ``kind``
    (``"regmean"`` or ``"fisher"``) and ``counts`` (rows or batches behind each entry)."""

    def __init__(self, data: Mapping[str, torch.Tensor], kind: str, counts: Mapping[str, int]) -> None:
        super().__init__(data)
        self.kind = kind
        self.counts = dict(counts)


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise ParameterTypeError(
        f"batches must yield tensors, tuples/lists or mappings of model inputs, got {type(batch).__name__}"
    )


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ParameterTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


@torch.no_grad()
def collect_regmean_stats(
    model: nn.Module, batches: Iterable[Any], *, modules: Sequence[str] | None = None
) -> Statistics:
    """Gram matrices of the inputs of the model's linear layers over ``batches``.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode (restored afterwards) on each batch, without gradients.
    batches : iterable
        Model inputs (see the module docstring); labels are not needed.
    modules : names of ``nn.Linear`` sub-modules, optional
        Default: every ``nn.Linear``.

    Returns
    -------
    Statistics
        ``"<module>.weight" -> G`` (in, in) float64, ``G = sum over rows x x^T`` of the layer's inputs
        (every leading dimension flattened into rows); ``counts`` the number of rows.
    """
    _check_model(model)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if modules is not None:
        unknown = [m for m in modules if m not in linear]
        if unknown:
            raise ParameterError(f"modules: not nn.Linear sub-modules of the model: {unknown[:5]}")
        linear = {n: linear[n] for n in modules}
    if not linear:
        raise ParameterError("model has no nn.Linear layer: RegMean merges linear layers")
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            x = args[0].detach().reshape(-1, module.in_features).double()  # (rows, in)
            key = f"{name}.weight" if name else "weight"
            grams[key] = grams.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linear.items()]
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        for batch in batches:
            _call(model, batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise InputDataError("batches is empty: RegMean needs at least one batch of inputs")
    return Statistics(grams, "regmean", counts)


def collect_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    names: Sequence[str] | None = None,
) -> Statistics:
    """Diagonal empirical Fisher: mean over ``batches`` of ``grad(loss_fn(model, batch))**2``.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode (restored afterwards); its ``.grad`` fields are restored too.
    batches : iterable
        Whatever ``loss_fn`` takes (inputs and labels).
    loss_fn : callable ``(model, batch) -> scalar tensor``
        E.g. the mean cross-entropy of the model's predictions on the batch (the log-likelihood of the
        labels); for the Fisher of the model's own predictive distribution, sample the labels from it.
    names : parameter names, optional
        Default: every parameter that requires gradients.

    Returns
    -------
    Statistics
        ``name -> F`` (the parameter's shape, float32 or the parameter's dtype if wider); ``counts`` the
        number of batches.
    """
    _check_model(model)
    if not callable(loss_fn):
        raise ParameterTypeError(f"loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if names is not None:
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ParameterError(f"names: not trainable parameters of the model: {unknown[:5]}")
        params = {n: params[n] for n in names}
    if not params:
        raise ParameterError("model has no trainable parameter")
    saved = {n: (None if p.grad is None else p.grad.clone()) for n, p in params.items()}
    fisher = {
        n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in params.items()
    }
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ParameterError("loss_fn must return a scalar tensor")
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().to(fisher[n].dtype) ** 2
            n_batches += 1
    finally:
        for n, p in params.items():
            p.grad = saved[n]
        model.train(was_training)
    if n_batches == 0:
        raise InputDataError("batches is empty: the Fisher needs at least one batch")
    return Statistics(
        {n: f / n_batches for n, f in fisher.items()}, "fisher", dict.fromkeys(fisher, n_batches)
    )


def save_statistics(stats: Statistics, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``stats`` to one safetensors file, atomically (kind and counts in the header)."""
    from safetensors.torch import save_file

    from ..._io import atomic_path, check_output_file

    if not isinstance(stats, Statistics):
        raise ParameterTypeError(f"stats must be Statistics, got {type(stats).__name__}")
    target = check_output_file(path, overwrite=overwrite)
    meta = {"format": "pt", "layerwise_statistics": stats.kind}
    meta.update({_COUNT + k: str(int(v)) for k, v in stats.counts.items()})
    with atomic_path(target) as tmp:
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp), metadata=meta)


def load_statistics(path: str | os.PathLike, kind: str | None = None) -> Statistics:
    """Read a file written by :func:`save_statistics` (``kind`` checked when given)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            data = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable statistics file: {str(err).splitlines()[0]}") from None
    found = meta.get("layerwise_statistics")
    if found not in ("regmean", "fisher"):
        raise CheckpointError(f"{path}: not a layerwise statistics file (no layerwise_statistics header)")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path}: holds {found} statistics, {kind} needed")
    counts = {k[len(_COUNT) :]: int(v) for k, v in meta.items() if k.startswith(_COUNT)}
    return Statistics(data, found, counts)
