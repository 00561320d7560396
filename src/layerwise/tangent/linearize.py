"""Linearized models: fine-tuning in the tangent space (Ortiz-Jimenez, Favero, Frossard, NeurIPS 2023,
"Task arithmetic in the tangent space", https://arxiv.org/abs/2305.12827).

The first-order Taylor expansion of a network around its pre-trained weights ``theta0``::

    f_lin(x; theta) = f(x; theta0) + J_theta f(x; theta0) (theta - theta0)

is computed with one forward-mode product (``torch.func.jvp``) through ``torch.func.functional_call``: the
network is never copied into a Jacobian. ``theta`` is trainable, so ``f_lin`` can be fine-tuned like any
module (about 2-3x the cost of a plain step). The model is evaluated in eval mode (no dropout; normalisation
layers use the buffers of ``theta0``), as in the paper.

Because ``f_lin`` is linear in ``theta``, task vectors ``tau = theta - theta0`` learned in the tangent space
add exactly: ``f_lin(x; theta0 + a1 tau1 + a2 tau2) = f0 + a1 J tau1 + a2 J tau2``. An ordinary (non-linear)
task vector can also be evaluated in ``f_lin`` (post-hoc linearization, :meth:`LinearizedModel.posthoc`).

Example
-------
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
>>> lin = LinearizedModel(net)
>>> x = torch.randn(5, 3)
>>> torch.allclose(lin(x), net(x))         # at theta0 the linearized model is the model
True
>>> tau = lin.task_vector()                # theta - theta0 (zero here), keys = net's parameter names
>>> tau.keys()[:2]
['0.weight', '0.bias']
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp

from ..editing.task_vector import TaskVector
from ..errors import CheckpointError, ParameterTypeError

__all__ = ["LinearizedModel", "linearized_jvp", "check_task_vector"]


def _params_and_buffers(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return params, buffers


def linearized_jvp(
    model: nn.Module,
    params0: Mapping[str, torch.Tensor],
    tangents: Mapping[str, torch.Tensor],
    args: tuple,
    kwargs: Mapping[str, Any] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Any, Any]:
    """``(f(x; theta0), J_theta f(x; theta0) delta)`` in one forward-mode pass.

    Parameters
    ----------
    model : the network (its own weights are not used: every parameter comes from ``params0``).
    params0 : every parameter of ``model`` at ``theta0`` (name -> tensor).
    tangents : ``delta`` for a subset of the parameters (the others are held fixed at ``theta0``).
    args, kwargs : the model's inputs.
    buffers : the model's buffers (default: its own).

    Returns
    -------
    The output and its directional derivative, with the structure of the model's output (a tensor or a
    tuple of tensors). Differentiable with respect to ``tangents``.
    """
    kwargs = dict(kwargs or {})
    buffers = dict(model.named_buffers()) if buffers is None else dict(buffers)
    names = list(tangents)
    fixed = {n: p for n, p in params0.items() if n not in tangents}

    def f(*moving: torch.Tensor) -> Any:
        return functional_call(
            model, {**fixed, **buffers, **dict(zip(names, moving, strict=True))}, args, kwargs
        )

    primals = tuple(params0[n] for n in names)
    tans = tuple(tangents[n].to(params0[n].dtype) for n in names)
    return jvp(f, primals, tans)


def _add_outputs(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a + b
    if isinstance(a, (tuple, list)):
        return type(a)(_add_outputs(x, y) for x, y in zip(a, b, strict=True))
    raise ParameterTypeError(
        f"model: a linearized model must return a tensor or a tuple of tensors, got {type(a).__name__}"
    )


def check_task_vector(
    task_vector: TaskVector | Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    name: str = "task_vector",
    allow_missing: bool = False,
) -> dict[str, torch.Tensor]:
    """Check that a task vector fits ``model``'s parameters; return it as ``{parameter name: delta}``.

    Keys must be parameter names with the parameter's shape. Buffer keys (e.g. BatchNorm running means) are
    accepted only when their delta is zero: the linearized model takes every buffer from ``theta0``. Keys
    absent from the task vector are an error unless ``allow_missing`` (then they count as zero).

    Raises
    ------
    CheckpointError
        Naming ``name`` and the offending keys (task vectors of another architecture, for instance).
    """
    tensors = task_vector.to_dict() if isinstance(task_vector, TaskVector) else dict(task_vector)
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ParameterTypeError(f"{name} must be a TaskVector or a mapping of names to tensors")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    unknown = sorted(k for k in tensors if k not in params and k not in buffers)
    if unknown:
        raise CheckpointError(
            f"{name} has {len(unknown)} key(s) that are not parameters of the model (another architecture?): "
            f"{unknown[:6]}; the model's parameters look like {list(params)[:4]}"
        )
    shapes = [
        f"{k!r}: {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in tensors.items()
        if k in params and tuple(v.shape) != tuple(params[k].shape)
    ]
    if shapes:
        raise CheckpointError(f"{name} does not match the model's parameter shapes: {shapes[:6]}")
    moved_buffers = sorted(k for k in tensors if k in buffers and bool(torch.any(tensors[k] != 0)))
    if moved_buffers:
        raise CheckpointError(
            f"{name} changes buffer(s) {moved_buffers[:6]}; the linearized model takes every buffer from "
            "theta0 (use a model without batch statistics, e.g. LayerNorm/GroupNorm)"
        )
    missing = sorted(k for k in params if k not in tensors)
    if missing and not allow_missing:
        raise CheckpointError(
            f"{name} lacks {len(missing)} parameter(s) of the model: {missing[:6]} (another architecture?)"
        )
    return {k: v for k, v in tensors.items() if k in params}


class LinearizedModel(nn.Module):
    """``f_lin(x; theta) = f(x; theta0) + J f(x; theta0) (theta - theta0)`` with trainable ``theta``.

    Parameters
    ----------
    model : nn.Module
        The network at ``theta0``. It is copied twice (``theta0``, held fixed, and ``theta``, trainable,
        initialised at ``theta0``); the caller's module is not modified. Parameters with
        ``requires_grad=False`` stay at ``theta0`` (no tangent, no gradient). The model must return a tensor
        or a tuple of tensors.

    Attributes
    ----------
    base : the copy at ``theta0`` (parameters frozen; its buffers are used in every forward pass).
    model : the copy holding ``theta`` (its parameters are this module's trainable parameters).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ParameterTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.base = copy.deepcopy(model)
        self.model = copy.deepcopy(model)
        self._trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base.eval()
        self.model.eval()

    # -- the function ------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``f(x; theta0) + J (theta - theta0)``: one jvp, differentiable in ``theta``."""
        params0, buffers0 = _params_and_buffers(self.base)
        theta = dict(self.model.named_parameters())
        tangents = {n: theta[n] - params0[n] for n in self._trainable}
        out, dout = linearized_jvp(self.base, params0, tangents, args, kwargs, buffers0)
        return _add_outputs(out, dout)

    def train(self, mode: bool = True) -> LinearizedModel:
        """Set the training flag of this wrapper only: the linearized network always runs in eval mode."""
        self.training = mode
        self.base.eval()
        self.model.eval()
        return self

    # -- task vectors -------------------------------------------------------------------------------------
    def task_vector(self) -> TaskVector:
        """``theta - theta0`` over every parameter (frozen ones are zero), as an in-memory TaskVector."""
        params0 = dict(self.base.named_parameters())
        return TaskVector.from_tensors(
            {n: (p.detach() - params0[n]).clone() for n, p in self.model.named_parameters()}
        )

    @torch.no_grad()
    def set_task_vector(
        self, task_vector: TaskVector | Mapping[str, torch.Tensor], scale: float = 1.0
    ) -> LinearizedModel:
        """Set ``theta = theta0 + scale * tau`` in place (returns self); ``tau`` is checked against the model.

        Frozen parameters (``requires_grad=False`` at construction) must have a zero delta.
        """
        deltas = check_task_vector(task_vector, self.base)
        frozen = sorted(n for n in deltas if n not in self._trainable and bool(torch.any(deltas[n] != 0)))
        if frozen:
            raise CheckpointError(f"task_vector changes frozen parameter(s) {frozen[:6]}")
        params0 = dict(self.base.named_parameters())
        for n, p in self.model.named_parameters():
            p.copy_(params0[n] + float(scale) * deltas[n].to(p.dtype))
        return self

    def theta(self) -> dict[str, torch.Tensor]:
        """The state dict of ``theta``: parameters ``theta``, buffers of ``theta0`` (keys of the model's own
        ``state_dict``), detached copies; what a fine-tuned checkpoint stores."""
        state = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
        for n, p in self.model.named_parameters():
            state[n] = p.detach().clone()
        return state

    @classmethod
    def posthoc(
        cls, model: nn.Module, task_vector: TaskVector | Mapping[str, torch.Tensor], scale: float = 1.0
    ) -> LinearizedModel:
        """Post-hoc linearization: the linearized ``model`` evaluated at ``theta0 + scale * tau`` for an
        ordinary (non-linearly fine-tuned) task vector ``tau``."""
        return cls(model).set_task_vector(task_vector, scale)

    @classmethod
    def from_checkpoints(cls, model: nn.Module, pretrained: Any, finetuned: Any) -> LinearizedModel:
        """Linearized ``model`` around the weights ``pretrained`` with ``theta`` from ``finetuned`` (paths,
        state dicts or checkpoints; e.g. a linearized fine-tune saved with :meth:`theta`, or a merge of them
        written by ``layerwise merge``). ``model`` itself is loaded with ``pretrained`` (in place)."""
        from ..editing.checkpoints import load_state_dict

        state0 = load_state_dict(pretrained)
        _load_strict(model, state0, "pretrained")
        return cls(model).set_task_vector(TaskVector(state0, finetuned))


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise CheckpointError(f"{name} does not fit the model: {' '.join(first)}") from None
