"""Re-export of :func:`layerwise._device.resolve_device` (kept for older imports)."""

from __future__ import annotations

from .._device import resolve_device

__all__ = ["resolve_device"]
