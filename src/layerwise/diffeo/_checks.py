"""Argument checks for ``layerwise.diffeo``: every failure is a ParameterError naming the parameter."""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_choice, check_float, check_int, make_generator
from ..errors import ParameterError, ParameterTypeError

__all__ = ["check_int", "check_float", "check_choice", "check_images", "check_temperature", "generator_of"]


def generator_of(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from ``seed`` (int, generator, or None for fresh entropy)."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ParameterError(f"seed must be a CPU torch.Generator (draws are made on the CPU), got "
                                 f"one on {seed.device}")
        return seed
    return make_generator(seed)


def check_images(name: str, images: Any, *, min_size: int = 2) -> torch.Tensor:
    """``images`` must be a floating tensor of shape (N, C, H, W) with H, W >= ``min_size``."""
    if not isinstance(images, torch.Tensor):
        raise ParameterTypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got "
                                 f"{type(images).__name__}")
    if images.dim() != 4:
        raise ParameterError(f"{name} must be a 4-D tensor (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ParameterTypeError(f"{name} must be a floating tensor (float32/float64), got {images.dtype}")
    if images.shape[-1] < min_size or images.shape[-2] < min_size:
        raise ParameterError(f"{name} must have height and width >= {min_size}, got shape "
                             f"{tuple(images.shape)}")
    return images


def check_temperature(T: Any, n: int | None = None) -> float | torch.Tensor:
    """T is a finite float >= 0, or a 1-D tensor of ``n`` such values (one per image)."""
    if isinstance(T, torch.Tensor):
        if T.dim() == 0:
            return check_float("T", float(T), low=0.0)
        if T.dim() != 1 or (n is not None and T.shape[0] != n):
            raise ParameterError(f"T must be a number or a 1-D tensor with one temperature per image ({n}), "
                                 f"got shape {tuple(T.shape)}")
        if not bool(torch.isfinite(T).all()) or bool((T < 0).any()):
            raise ParameterError(f"T must be finite and >= 0, got min {float(T.min())}, max {float(T.max())}")
        return T
    return check_float("T", T, low=0.0)
