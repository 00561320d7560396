"""Resolve a user's ``device`` argument (shared by the BP denoisers)."""

from __future__ import annotations

import torch

from ..errors import ParameterError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None, default: torch.device | str = "cpu") -> torch.device:
    """``device`` as a usable ``torch.device`` (``default`` when None); ParameterError naming ``device`` for
    a malformed name or a device this machine does not have."""
    if device is None:
        return torch.device(default)
    try:
        out = torch.device(device)
        torch.empty(0, device=out)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise ParameterError(f"device must be a usable torch device such as 'cpu' or 'cuda', "
                             f"got {device!r} ({exc})") from exc
    return out
