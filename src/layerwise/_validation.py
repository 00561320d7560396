"""Argument checks at the public boundary. Every error names the parameter, what is allowed and what came.

Errors are :class:`~layerwise.errors.ParameterError` (a ``ValueError``) and
:class:`~layerwise.errors.ParameterTypeError` (a ``TypeError``), so the ``layerwise`` command prints them as
one line and callers catching ``ValueError``/``TypeError`` keep working.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch

from .errors import ParameterError, ParameterTypeError

__all__ = ["check_int", "check_float", "check_choice", "check_seed", "make_generator", "SEED_MAX"]

SEED_MAX = (1 << 63) - 1
"""Largest seed accepted: seeds are integers in ``[0, 2**63)`` (what ``torch.Generator.manual_seed`` and
numpy take without wrapping around)."""


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as int if it is an integer in ``[low, high]``; else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParameterTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ParameterError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_float(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """Return ``value`` as float if it is a finite real in ``[low, high]`` (``(low, high]`` if low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterTypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        value = float("inf") if value > 0 else float("-inf")
    bad = value != value or value in (float("inf"), float("-inf"))
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or value > high
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        raise ParameterError(f"{name} must be a finite number in {bracket}{lo}, {hi}], got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``; else raise naming ``name`` and the valid choices."""
    choices = list(choices)
    try:
        ok = value in choices
    except TypeError:  # e.g. an unhashable or incomparable value
        ok = False
    if not ok:
        raise ParameterError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_seed(seed: Any, name: str = "seed") -> int:
    """Return ``seed`` as int if it is an integer in ``[0, 2**63)``; else raise naming ``name``."""
    return check_int(name, seed, low=0, high=SEED_MAX)


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """Turn ``seed`` (an int, an existing CPU generator, or None for a fresh random seed) into a generator."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(check_seed(seed))
    return gen
