"""Weight disentanglement error (Ortiz-Jimenez, Favero, Frossard, NeurIPS 2023, Eq. 4 / Fig. 3).

For two tasks with task vectors ``tau1, tau2`` and input distributions ``D1, D2``::

    xi(a1, a2) = sum_{t=1,2} E_{x ~ D_t} dist(f_t(x; theta0 + a_t tau_t), f_t(x; theta0 + a1 tau1 + a2 tau2))

``dist`` is ``1[argmax differs]`` for classifiers (prediction disagreement) and the Euclidean distance of
the outputs for regressors; ``f_t`` is the network followed by task ``t``'s head (the papers' frozen
per-task classification heads). ``xi = 0`` means that adding ``a2 tau2`` leaves task 1's function untouched
on ``D1`` and vice versa: the task vectors are disentangled.

The linearized model (:mod:`.linearize`) is linear in its weights, so its outputs over the whole grid come
from two jvps per data set: ``f_lin(theta0 + a1 tau1 + a2 tau2) = f0 + a1 J tau1 + a2 J tau2``.

Example
-------
>>> net = torch.nn.Linear(2, 3)
>>> tau = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
>>> r = disentanglement_error(net, None, tau, tau, torch.randn(8, 2), torch.randn(8, 2), [0.0, 1.0])
>>> float(r.xi[0, 0])
0.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..editing.task_vector import TaskVector
from ..errors import InputDataError, ParameterError, ParameterTypeError
from .linearize import check_task_vector, linearized_jvp

__all__ = ["DisentanglementResult", "disentanglement_error", "check_grid"]

KINDS = ("classification", "regression")


@dataclass(frozen=True)
class DisentanglementResult:
    """``xi`` over the grid.

    Attributes
    ----------
    a1, a2 : (G1,), (G2,) the coefficients.
    xi : (G1, G2) the error ``xi[i, j] = xi(a1[i], a2[j])`` (sum of the two task terms; for classifiers
        each term is a fraction in [0, 1], so ``xi`` is in [0, 2]).
    per_task : (2, G1, G2) the two terms.
    kind : "classification" or "regression"; linearized : whether ``f_lin`` was used.
    """

    a1: torch.Tensor
    a2: torch.Tensor
    xi: torch.Tensor
    per_task: torch.Tensor
    kind: str
    linearized: bool

    def mean(self) -> float:
        """Average of ``xi`` over the grid (one number for tables)."""
        return float(self.xi.mean())


def check_grid(grid: Any, name: str = "grid") -> torch.Tensor:
    """A non-empty, strictly increasing 1-D sequence of finite coefficients, as float64 (G,)."""
    try:
        values = torch.as_tensor(grid, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ParameterTypeError(f"{name} must be a 1-D sequence of numbers, got {grid!r}") from None
    if values.ndim != 1 or values.numel() == 0:
        raise ParameterError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ParameterError(f"{name} must hold finite numbers, got {values.tolist()}")
    if values.numel() > 1 and not bool((values[1:] > values[:-1]).all()):
        raise ParameterError(f"{name} must be strictly increasing, got {values.tolist()}")
    return values


def _check_data(data: Any, name: str) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise ParameterTypeError(f"{name} must be a tensor of inputs (N, ...), got {type(data).__name__}")
    if data.ndim < 1 or data.shape[0] == 0:
        raise InputDataError(f"{name} must be a non-empty batch of inputs (N, ...), got {tuple(data.shape)}")
    return data


Fn = Callable[[torch.Tensor], torch.Tensor]


def _batched(fn: Fn, x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    outs = []
    for i in range(0, x.shape[0], batch):
        try:
            outs.append(fn(x[i : i + batch]))
        except RuntimeError as err:
            if i > 0:
                raise
            raise InputDataError(
                f"{name} of shape {tuple(x.shape)} does not fit the model: {str(err).splitlines()[0]}"
            ) from None
    return torch.cat(outs)


def _dist(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distance of outputs (..., N, C) -> (..., N)."""
    if kind == "classification":
        return (a.argmax(-1) != b.argmax(-1)).to(torch.float64)
    return torch.linalg.vector_norm((a - b).to(torch.float64), dim=-1)


@torch.no_grad()
def disentanglement_error(
    model: nn.Module,
    theta0: Mapping[str, torch.Tensor] | None,
    tau1: TaskVector | Mapping[str, torch.Tensor],
    tau2: TaskVector | Mapping[str, torch.Tensor],
    data1: torch.Tensor,
    data2: torch.Tensor,
    grid: Sequence[float] | tuple[Sequence[float], Sequence[float]],
    *,
    linearized: bool = False,
    heads: tuple[Fn, Fn] | None = None,
    kind: str = "classification",
    batch_size: int = 512,
) -> DisentanglementResult:
    """The weight disentanglement error ``xi(a1, a2)`` on a grid (module docstring).

    Parameters
    ----------
    model : the network; its weights are replaced by ``theta0 + ...`` through ``functional_call``.
    theta0 : the pre-trained weights (a state dict with every parameter and buffer of ``model``); None uses
        the model's own.
    tau1, tau2 : task vectors over the model's parameters (ordinary ones; with ``linearized`` they are
        evaluated in the tangent space, which for vectors learned by linearized fine-tuning is their model).
    data1, data2 : (N1, ...), (N2, ...) inputs of the two tasks.
    grid : coefficients used for both ``a1`` and ``a2``, or a pair ``(grid_a1, grid_a2)``; strictly
        increasing finite numbers (the paper uses [-3, 3]).
    linearized : evaluate ``f_lin`` around ``theta0`` instead of ``f``.
    heads : per-task maps from the model's output (..., D) to the task's outputs (..., C) (frozen
        classification heads acting on the last dimension); None compares the model's outputs directly.
    kind : "classification" (``dist = 1[argmax differs]``) or "regression" (Euclidean distance).
    batch_size : inputs per forward pass.

    Returns
    -------
    DisentanglementResult with ``xi`` (G1, G2).
    """
    if not isinstance(model, nn.Module):
        raise ParameterTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kind not in KINDS:
        raise ParameterError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(grid, tuple) and len(grid) == 2 and not isinstance(grid[0], (int, float)):
        g1, g2 = check_grid(grid[0], "grid[0]"), check_grid(grid[1], "grid[1]")
    else:
        g1 = g2 = check_grid(grid)
    data1, data2 = _check_data(data1, "data1"), _check_data(data2, "data2")
    if heads is None:
        heads = (lambda z: z, lambda z: z)
    elif len(heads) != 2 or not all(callable(h) for h in heads):
        raise ParameterTypeError("heads must be a pair of callables (one per task) or None")
    state0 = dict(model.state_dict()) if theta0 is None else dict(theta0)
    params = dict(model.named_parameters())
    missing = sorted(k for k in params if k not in state0)
    if missing:
        raise ParameterError(f"theta0 lacks parameter(s) of the model: {missing[:6]}")
    params0 = {k: state0[k].detach() for k in params}
    buffers0 = {k: state0.get(k, b).detach() for k, b in model.named_buffers()}
    d1 = check_task_vector(tau1, model, name="tau1", allow_missing=True)
    d2 = check_task_vector(tau2, model, name="tau2", allow_missing=True)
    was_training = model.training
    model.eval()
    try:
        if linearized:
            per_task = _linearized_terms(
                model, params0, buffers0, d1, d2, (data1, data2), heads, g1, g2, kind, batch_size
            )
        else:
            per_task = _nonlinear_terms(
                model, params0, buffers0, d1, d2, (data1, data2), heads, g1, g2, kind, batch_size
            )
    finally:
        model.train(was_training)
    return DisentanglementResult(g1, g2, per_task.sum(0), per_task, kind, linearized)


def _nonlinear_terms(model, params0, buffers0, d1, d2, data, heads, g1, g2, kind, batch):
    def outputs(a1: float, a2: float, t: int) -> torch.Tensor:
        p = {k: v + a1 * d1[k].to(v.dtype) if k in d1 else v for k, v in params0.items()}
        p = {k: v + a2 * d2[k].to(v.dtype) if k in d2 else v for k, v in p.items()}

        def f(x):
            return heads[t](functional_call(model, {**p, **buffers0}, (x,)))

        return _batched(f, data[t], batch, f"data{t + 1}")

    per_task = torch.zeros(2, len(g1), len(g2), dtype=torch.float64)
    ref1 = [outputs(float(a), 0.0, 0) for a in g1]  # f_1(theta0 + a1 tau1) on D1
    ref2 = [outputs(0.0, float(b), 1) for b in g2]  # f_2(theta0 + a2 tau2) on D2
    for i, a in enumerate(g1):
        for j, b in enumerate(g2):
            per_task[0, i, j] = _dist(ref1[i], outputs(float(a), float(b), 0), kind).mean()
            per_task[1, i, j] = _dist(ref2[j], outputs(float(a), float(b), 1), kind).mean()
    return per_task


def _linearized_terms(model, params0, buffers0, d1, d2, data, heads, g1, g2, kind, batch):
    if not (d1 or d2):
        raise ParameterError("tau1 and tau2 are both empty")
    per_task = torch.zeros(2, len(g1), len(g2), dtype=torch.float64)
    for t, x in enumerate(data):

        def f(xb, tangent):
            return linearized_jvp(model, params0, tangent, (xb,), None, buffers0)

        f0, j1, j2 = [], [], []
        for i in range(0, x.shape[0], batch):
            xb = x[i : i + batch]
            try:
                o, a = f(xb, d1 or {k: torch.zeros_like(v) for k, v in d2.items()})
                _, b = f(xb, d2 or {k: torch.zeros_like(v) for k, v in d1.items()})
            except RuntimeError as err:
                msg = str(err).splitlines()[0]
                raise InputDataError(
                    f"data{t + 1} of shape {tuple(x.shape)} does not fit the model: {msg}"
                ) from None
            f0.append(o), j1.append(a), j2.append(b)
        f0, j1, j2 = torch.cat(f0), torch.cat(j1), torch.cat(j2)  # (N, D) each
        head = heads[t]
        a1 = g1.to(f0.dtype)[:, None, None, None]
        a2 = g2.to(f0.dtype)[None, :, None, None]
        joint = head(f0 + a1 * j1 + a2 * j2)  # (G1, G2, N, C)
        ref = head(f0 + a1[:, 0] * j1) if t == 0 else head(f0 + a2[0] * j2)  # (G1|G2, N, C)
        ref = ref[:, None] if t == 0 else ref[None, :]
        per_task[t] = _dist(ref, joint, kind).mean(-1)
    return per_task
