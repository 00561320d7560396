"""The merge-method registry: each method is a plain function on one chunk of stacked task vectors.

A method receives ``deltas`` of shape ``(T, n)`` (``T`` models, ``n`` elements of one tensor, float32 or
float64) and returns the merged task vector ``(n,)``. Its declared parameters arrive as keyword arguments:
per-model ones as tensors ``(T,)``, the others as Python scalars. Methods may also declare the inputs the
streaming driver prepares for them:

- ``"thresholds"``: ``(T,)`` magnitudes; entry ``t`` keeps ``|delta_t| >= thresholds[t]`` (the top-k of each
  task vector, per tensor or over the whole model, chosen by the ``density`` and ``topk`` parameters).
- ``"uniform"``: ``(T, n)`` uniform draws in [0, 1), seeded by (seed, tensor name, model, position) so that
  results do not depend on how tensors are chunked.
- ``"gram"``: ``(T + 1, T + 1)`` float64 Gram matrix of ``[base, delta_1, ..., delta_T]`` over the whole
  tensor (norms and angles for SLERP, Model Stock).
- ``"base"``: ``(n,)`` the base model's chunk.
- ``"base_given"``: True when a base model was given (False: the first model stands in as the reference,
  its task vector is 0).

A method may also declare ``ranks(values, n) -> [k_1, ..., k_K]`` (the thresholds of one model at several
ranks, ``thresholds`` then ``(T, K)``; default ``[topk_count(density, n)]``, ``thresholds`` ``(T,)``) and
``rows=True`` (every chunk holds whole rows of the tensor's last dimension; ``row_length`` is passed), and
``prepare(chunks, params, per_model, numel) -> {name: value}``: per-tensor statistics computed before the
merge pass (``chunks()`` returns a fresh iterator of ``(deltas (T, n_c), chunk inputs)`` over the tensor,
so a method may take several passes); the returned values are passed to every chunk's call.

Because every method is element-wise given these inputs, the driver can stream arbitrarily large tensors in
chunks, and a method written here works unchanged on a 2 GB embedding.

Adding a method
---------------
>>> import torch
>>> @register_merge_method(
...     "median_demo",
...     params=[Param("scale", 1.0, low=0.0, doc="multiplies the merged vector")],
...     reference="https://example.org/paper", description="element-wise median of the task vectors")
... def median_demo(deltas, *, scale):
...     return scale * deltas.median(dim=0).values  # (T, n) -> (n,)
>>> MERGE_METHODS.get("median_demo").fn(torch.tensor([[1.0], [3.0], [2.0]]), scale=1.0)
tensor([2.])
>>> _ = MERGE_METHODS.unregister("median_demo")  # (keep the doctest from registering it for good)
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..._registry import Registry
from ...errors import ParameterError, ParameterTypeError

__all__ = ["Param", "MergeMethod", "MERGE_METHODS", "register_merge_method", "REQUIRED"]

REQUIRED = object()  # default of a parameter the user must give
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def _r(value: Any) -> str:
    """A bounded repr for error messages (a YAML file can alias one list into a billion elements)."""
    return _REPR.repr(value)


_INPUTS = ("thresholds", "uniform", "gram", "base", "base_given")


@dataclass(frozen=True)
class Param:
    """A declared method parameter: default, allowed range or choices, and whether it is set per model."""

    name: str
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    per_model: bool = False
    doc: str = ""

    def check(self, value: Any, where: str = "") -> Any:
        """Return ``value`` validated; raise :class:`~layerwise.errors.ParameterError` naming the parameter.

        Numbers must be finite (ints are accepted for float parameters, booleans are not); choices match
        strictly (``0`` is not ``False``, ``1.0`` is not ``True``).
        """
        label = f"{where}{self.name}"
        if self.choices is not None:
            if not any(type(value) is type(c) and value == c for c in self.choices):
                raise ParameterError(f"{label} must be one of {list(self.choices)}, got {_r(value)}")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ParameterTypeError(f"{label} must be a number, got {type(value).__name__} {_r(value)}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if (
            not math.isfinite(value)
            or (self.low is not None and value < self.low)
            or (self.high is not None and value > self.high)
        ):
            raise ParameterError(f"{label} must be {self._range()}, got {value}")
        return value

    def _range(self) -> str:
        if self.low is None and self.high is None:
            return "a finite number"
        if self.high is None:
            return f"a finite number >= {self.low}"
        if self.low is None:
            return f"a finite number <= {self.high}"
        return f"in [{self.low}, {self.high}]"

    def describe(self) -> str:
        """One line for ``layerwise merge --list-methods``: name, scope, range or choices, default, doc."""
        rng = f"one of {list(self.choices)}" if self.choices is not None else self._range()
        default = "required" if self.default is REQUIRED else f"default {self.default!r}"
        scope = "per model" if self.per_model else "global"
        return f"{self.name} ({scope}, {rng}, {default}): {self.doc}"


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: the function, its parameters, the inputs it needs and the paper it implements."""

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    inputs: tuple[str, ...] = ()
    reference: str = ""
    description: str = ""
    needs_base: bool = True
    validate: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], None] | None = None
    ranks: Callable[[Mapping[str, Any], int], Sequence[int]] | None = None
    rows: bool = False
    prepare: Callable[..., Mapping[str, Any]] | None = None
    param_index: Mapping[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})

    def resolve(
        self, params: Mapping[str, Any] | None, model_params: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Fill defaults and validate: ``(global values, [per-model values])``.

        A per-model parameter may be set globally (applies to every model) and overridden per model.
        Checks that involve several parameters or the number of models (the method's ``validate``) run
        here too, so ``layerwise merge --dry-run`` catches everything the merge itself would refuse.
        """
        if params is not None and not isinstance(params, Mapping):
            raise ParameterTypeError(f"parameters must be a mapping, got {type(params).__name__}")
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.param_index), key=repr)
        if unknown:
            raise ParameterError(
                f"unknown parameter(s) {_r(unknown)} for merge method {self.name!r}; "
                f"valid: {sorted(self.param_index)}"
            )
        glob: dict[str, Any] = {}
        for p in self.params:
            value = params.get(p.name, p.default)
            if value is REQUIRED and not p.per_model:
                raise ParameterError(f"merge method {self.name!r} needs parameter {p.name!r}: {p.doc}")
            glob[p.name] = value if value is REQUIRED else p.check(value, "parameters.")
        per_model: list[dict[str, Any]] = []
        for i, mp in enumerate(model_params):
            if mp is not None and not isinstance(mp, Mapping):
                raise ParameterTypeError(f"models[{i}].parameters must be a mapping, got {type(mp).__name__}")
            mp = dict(mp or {})
            bad = sorted(
                (k for k in mp if k not in self.param_index or not self.param_index[k].per_model), key=repr
            )
            if bad:
                valid = sorted(p.name for p in self.params if p.per_model)
                raise ParameterError(
                    f"models[{i}].parameters: unknown or not per-model {_r(bad)} for merge method "
                    f"{self.name!r}; per-model parameters: {valid}"
                )
            values = {}
            for p in self.params:
                if p.per_model:
                    value = mp.get(p.name, glob[p.name])
                    if value is REQUIRED:
                        raise ParameterError(
                            f"models[{i}].parameters.{p.name} is required by {self.name!r}: {p.doc}"
                        )
                    values[p.name] = p.check(value, f"models[{i}].parameters.")
            per_model.append(values)
        glob = {k: v for k, v in glob.items() if not self.param_index[k].per_model}
        if self.validate is not None:
            self.validate(glob, per_model)
        return glob, per_model


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def register_merge_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    inputs: Sequence[str] = (),
    reference: str = "",
    description: str = "",
    needs_base: bool = True,
    validate: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], None] | None = None,
    ranks: Callable[[Mapping[str, Any], int], Sequence[int]] | None = None,
    rows: bool = False,
    prepare: Callable[..., Mapping[str, Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(deltas, **params) -> merged`` as merge method ``name``.

    Parameters
    ----------
    params : Param declarations (their names are the function's keyword arguments).
    inputs : subset of ``("thresholds", "uniform", "gram", "base", "base_given")`` the driver must prepare
        (also keyword arguments).
    reference : URL of the paper or code the method implements.
    needs_base : False if the method is meaningful without a base model (e.g. averaging).
    validate : optional ``validate(global_values, per_model_values)`` raising
        :class:`~layerwise.errors.ParameterError` for combinations the single ranges cannot express (an
        index into the models, weights that must not sum to 0); run by :meth:`MergeMethod.resolve`, hence
        by ``--dry-run``.
    ranks : optional ``ranks(one model's per-model values, numel) -> [k_1, ..., k_K]``: the magnitude ranks
        whose thresholds the method receives (``thresholds`` of shape ``(T, K)``).
    rows : the method needs whole rows (last dimension) in each chunk; it receives ``row_length``.
    prepare : optional ``prepare(chunks, params, per_model, numel) -> dict``: per-tensor statistics from
        passes over the tensor's chunks before it is merged (see the module docstring); the dict's entries
        become keyword arguments of ``fn``.
    """
    bad = sorted(set(inputs) - set(_INPUTS))
    if bad:
        raise ValueError(f"inputs must be among {list(_INPUTS)}, got {bad}")

    if "thresholds" in inputs and not any(p.name == "density" and p.per_model for p in params):
        raise ValueError(
            "a method with inputs 'thresholds' must declare a per-model 'density' parameter "
            "(and may declare 'topk': 'tensor' or 'global')"
        )

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        MERGE_METHODS.register(
            name,
            MergeMethod(
                name=name,
                fn=fn,
                params=tuple(params),
                inputs=tuple(inputs),
                reference=reference,
                description=description,
                needs_base=needs_base,
                validate=validate,
                ranks=ranks,
                rows=rows,
                prepare=prepare,
            ),
        )
        return fn

    return deco
