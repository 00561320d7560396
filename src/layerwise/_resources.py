"""Memory checks before allocation: refuse a request the machine cannot hold, with the estimate.

A request that cannot fit (an RHM whose data have ``2**40`` tokens each, a rule table of ``10**10`` rules)
would otherwise grow until the operating system kills the process, or fail deep inside torch's allocator.
The library estimates what it is about to allocate and calls :func:`check_memory` first, which compares
the estimate with the memory available now (``MemAvailable`` of ``/proc/meminfo`` on Linux; the free
memory of the CUDA device for CUDA work) and raises :class:`~layerwise.errors.ResourceError` naming the
request, the estimate and what is available.

Sizes can be astronomically large (``s**L`` tokens for large ``L``), so estimates are exact Python ints
and :func:`format_bytes` prints them without overflowing a float.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ResourceError

__all__ = ["available_memory", "check_memory", "format_bytes"]

# Fallback when the available memory cannot be read: refuse only what no current machine holds.
_FALLBACK_BYTES = 1 << 40
# Requests up to this size are not checked (no need to read /proc/meminfo for them).
_ALWAYS_FITS = 1 << 26


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: Any = None) -> int:
    """Bytes of memory available for new allocations now.

    CPU: ``MemAvailable`` from ``/proc/meminfo`` (Linux); elsewhere the physical memory reported by
    ``os.sysconf``; if neither can be read, 1 TiB (only absurd requests are refused then). A CUDA
    ``device`` (a ``torch.device`` or a string such as ``"cuda:0"``): the free memory of that device.
    """
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    value = _meminfo_available()
    if value is not None:
        return value
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_BYTES


def format_bytes(n: int | float) -> str:
    """``n`` bytes as a short human string (``"160 GB"``, ``"8.8 TB"``; ``"about 2^1003 B"`` when huge)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
    if n < 1000:
        return f"{n} B"
    if n.bit_length() > 1000:  # beyond float range (and str() of huge ints): give the power of two
        return f"about 2^{n.bit_length() - 1} B"
    exp = min((len(str(n)) - 1) // 3, len(units) - 1)
    value = n / 1000**exp
    return f"{value:.3g} {units[exp]}" if value < 1e6 else f"{value:.3e} {units[exp]}"


def check_memory(n_bytes: int, what: str, device: Any = None) -> None:
    """Raise :class:`ResourceError` if ``n_bytes`` exceed the memory available on ``device`` (CPU default).

    Parameters
    ----------
    n_bytes : the estimated peak of the allocation about to be made (an exact int; may be astronomical).
    what : the request, for the message (e.g. ``"RHM(v=8, ...).sample(n=10)"``).
    device : where the memory will be allocated (None: the CPU).
    """
    n_bytes = int(n_bytes)
    if n_bytes <= _ALWAYS_FITS:
        return
    available = available_memory(device)
    if n_bytes > available:
        raise ResourceError(
            f"{what} would need about {format_bytes(n_bytes)} of memory, but only "
            f"{format_bytes(available)} is available; reduce the sizes"
        )
