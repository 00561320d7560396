"""Argument checks at the public boundary. Every error names the parameter, what is allowed and what came."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["check_int", "check_float", "check_choice", "make_generator"]


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as int if it is an integer in ``[low, high]``; else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_float(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """Return ``value`` as float if it is a finite real in ``[low, high]`` (``(low, high]`` if low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    bad = value != value or value in (float("inf"), float("-inf"))
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or value > high
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a finite number in {bracket}{lo}, {hi}], got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """Turn ``seed`` (an int, an existing CPU generator, or None for a fresh random seed) into a generator."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(check_int("seed", seed, low=0))
    return gen
