"""Per-tensor parameter values: mergekit's gradients (``weight: [0, 0.5, 1]``) and filters.

A numeric method parameter may be given, instead of one number, as

- a list ``[v_0, ..., v_{k-1}]`` (a *gradient*): block ``i`` of a tower of ``L`` blocks (found by the same
  block discovery as LiNeS, :func:`layerwise.editing.lines.discover_blocks`) gets the value at position
  ``x = i / (L - 1) * (k - 1)`` of the list, linearly interpolated between its neighbours
  (``(1 - f) v_j + f v_{j+1}``, ``j = floor(x)``, ``f = x - j``, as mergekit computes it); a tower with one
  block takes the last value; keys outside every block take the first value (mergekit's ``t = 0``);
- a list of ``{filter: SUBSTRING, value: NUMBER_OR_LIST}`` entries, ending (usually) with a ``{value: ...}``
  fallback: a tensor takes the first entry whose ``filter`` occurs in its name or is ``*`` (mergekit's
  conditional parameters, e.g. ``filter: self_attn``), then the number or gradient of that entry. A tensor
  matched by no entry and without a fallback raises.

Example
-------
>>> from layerwise.editing.lines import discover_blocks
>>> layout = discover_blocks(["embed.w", "layers.0.w", "layers.1.w", "layers.2.w"])
>>> s = parse_schedule("weight", [0.0, 1.0])
>>> [s.value("embed.w", layout), s.value("layers.1.w", layout), s.value("layers.2.w", layout)]
[0.0, 0.5, 1.0]
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import ParameterError, ParameterTypeError
from ..lines import BlockLayout

__all__ = ["Schedule", "parse_schedule", "is_schedule", "interpolate"]


def interpolate(values: Sequence[float], i: int, num_blocks: int) -> float:
    """The gradient ``values`` at block ``i`` of ``num_blocks`` (linear interpolation, see the module doc)."""
    k = len(values)
    x = (i / (num_blocks - 1) if num_blocks > 1 else 1.0) * (k - 1)
    j = int(x)
    frac = x - j
    return float((1 - frac) * values[j] + frac * values[min(k - 1, j + 1)])  # mergekit's arithmetic


@dataclass(frozen=True)
class Schedule:
    """Per-tensor values of one parameter: ``entries`` are ``(filter or None, number or numbers)``."""

    name: str
    entries: tuple[tuple[str | None, float | tuple[float, ...]], ...]

    @property
    def needs_blocks(self) -> bool:
        """True when some entry is a gradient (a list), which needs the block layout."""
        return any(isinstance(v, tuple) and len(v) > 1 for _, v in self.entries)

    def numbers(self) -> list[float]:
        """Every number in the schedule (each must pass the parameter's range check)."""
        out: list[float] = []
        for _, v in self.entries:
            out.extend(v if isinstance(v, tuple) else (v,))
        return out

    def first(self) -> float:
        """The value keys outside blocks get from the first entry (used to validate like a scalar)."""
        v = self.entries[0][1]
        return v[0] if isinstance(v, tuple) else v

    def value(self, key: str, layout: BlockLayout | None) -> float:
        """The parameter's value for tensor ``key``."""
        for filt, v in self.entries:
            if filt is not None and filt != "*" and filt not in key:
                continue
            if not isinstance(v, tuple):
                return v
            if layout is None or key not in layout.depth:
                return float(v[0])
            tower, i = layout.depth[key]
            return interpolate(v, i, layout.towers[tower])
        raise ParameterError(
            f"{self.name}: no entry applies to tensor {key!r} (filters "
            f"{[f for f, _ in self.entries if f is not None]}); add a fallback entry {{value: ...}}"
        )

    def to_data(self) -> Any:
        """Plain data as the user wrote it (for records and re-running configs)."""

        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        if len(self.entries) == 1 and self.entries[0][0] is None:
            return plain(self.entries[0][1])
        return [
            {"value": plain(v)} if f is None else {"filter": f, "value": plain(v)} for f, v in self.entries
        ]


def is_schedule(value: Any) -> bool:
    """True for a list (gradient or filter list), the form that :func:`parse_schedule` accepts."""
    return isinstance(value, (list, tuple))


def _number(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ParameterTypeError(f"{where} must be a number, got {type(v).__name__} {v!r}")
    return float(v)


def _values(where: str, v: Any) -> float | tuple[float, ...]:
    if isinstance(v, (list, tuple)):
        if not v:
            raise ParameterError(f"{where} must be a number or a non-empty list of numbers, got []")
        return tuple(_number(f"{where}[{i}]", x) for i, x in enumerate(v))
    return _number(where, v)


def parse_schedule(where: str, raw: Sequence[Any]) -> Schedule:
    """A :class:`Schedule` from a list of numbers (gradient) or of ``{filter, value}`` mappings.

    ``where`` names the parameter in error messages (``parameters.weight``, ``models[1].parameters.t``).
    """
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ParameterError(f"{where} must be a number or a non-empty list, got {raw!r}")
    if all(isinstance(x, Mapping) for x in raw):
        entries = []
        for i, e in enumerate(raw):
            bad = sorted(str(k) for k in e if k not in ("filter", "value"))
            if bad or "value" not in e:
                raise ParameterError(
                    f"{where}[{i}] must be {{filter: SUBSTRING, value: ...}} or {{value: ...}}, got {e!r}"
                )
            filt = e.get("filter")
            if filt is not None and (not isinstance(filt, str) or not filt):
                raise ParameterError(f"{where}[{i}].filter must be a non-empty string, got {filt!r}")
            entries.append((filt, _values(f"{where}[{i}].value", e["value"])))
        return Schedule(where, tuple(entries))
    if any(isinstance(x, Mapping) for x in raw):
        raise ParameterError(f"{where}: a list is either numbers (a gradient) or {{filter, value}} entries")
    return Schedule(where, ((None, _values(where, list(raw))),))


def split_schedules(
    method: Any, params: Mapping[str, Any] | None, model_params: Sequence[Mapping[str, Any] | None]
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[tuple[int | None, str], Schedule]]:
    """Separate list-valued (per-tensor) parameters from scalar ones.

    Returns ``(params, model_params, schedules)``: the first two with each list replaced by its first number
    (so that :meth:`~.registry.MergeMethod.resolve` validates them like scalars), and ``schedules`` keyed by
    ``(None, name)`` for global values and ``(model index, name)`` for per-model ones. Every number of a
    schedule is range-checked by the parameter's declaration; a list for a non-numeric parameter (one with
    choices) raises :class:`~layerwise.errors.ParameterError`.
    """
    schedules: dict[tuple[int | None, str], Schedule] = {}

    def split(where: str, idx: int | None, values: Any) -> Any:
        if not isinstance(values, Mapping):
            return values  # resolve() reports the type error
        out = dict(values)
        for name, v in values.items():
            if not is_schedule(v):
                continue
            p = method.param_index.get(name)
            if p is None:
                continue  # resolve() reports the unknown name
            if p.choices is not None:
                raise ParameterError(
                    f"{where}{name}: a list (per-layer gradient) needs a numeric parameter; {name!r} is one "
                    f"of {list(p.choices)}"
                )
            sched = parse_schedule(f"{where}{name}", v)
            for x in sched.numbers():
                p.check(x, where)
            schedules[(idx, name)] = sched
            out[name] = sched.first()
        return out

    params = split("parameters.", None, params if params is not None else {})
    model_params = [split(f"models[{i}].parameters.", i, mp or {}) for i, mp in enumerate(model_params)]
    return params, model_params, schedules


def key_values(
    method: Any,
    glob: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    raw_model_params: Sequence[Mapping[str, Any]],
    schedules: Mapping[tuple[int | None, str], Schedule],
    key: str,
    layout: BlockLayout | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The resolved ``(params, model_params)`` for tensor ``key``: every schedule evaluated at ``key``.

    A per-model parameter follows the model's own value (scalar or schedule) when the model sets it, else
    the global schedule.
    """
    g = dict(glob)
    for (idx, name), s in schedules.items():
        if idx is None and name in g:
            g[name] = s.value(key, layout)
    pm = []
    for i, mp in enumerate(per_model):
        values = dict(mp)
        for name in values:
            own = raw_model_params[i] is not None and name in raw_model_params[i]
            s = schedules.get((i, name)) if own else schedules.get((None, name))
            if s is not None:
                values[name] = s.value(key, layout)
        pm.append(values)
    return g, pm
