"""The one ``device`` option of layerwise: validation for the library and the ``--device`` flag of the CLI.

Every function with a ``device=`` argument and every command with ``--device`` goes through
:func:`resolve_device`, so a bad device is refused the same way everywhere, before any work starts:
a malformed name, a device type layerwise does not run on (``meta`` and the other types that cannot hold
real data), CUDA or MPS on a machine without them, and a CUDA index this machine does not have.

>>> resolve_device("cpu")
device(type='cpu')
>>> resolve_device(None, default="cpu")
device(type='cpu')
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .errors import ParameterError

if TYPE_CHECKING:  # torch is imported inside the functions: building the CLI parser stays light
    import torch

__all__ = ["SUPPORTED_DEVICE_TYPES", "DEVICE_HELP", "resolve_device", "add_device_argument"]

#: Device types layerwise runs on; everything else torch knows (``meta``, ``xla``, ``lazy`` ...) is refused.
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps")

#: The help text of every ``--device`` flag (see :func:`add_device_argument`).
DEVICE_HELP = ("torch device: cpu (default), cuda, cuda:N or mps; checked before any work starts "
               "(see docs/guides/devices.md)")

_NO_DATA = {"meta": "it holds shapes only, no data", "lazy": "it records a graph instead of computing"}


def _refuse(name: str, device: object, why: str) -> ParameterError:
    return ParameterError(f"{name} must be one of cpu, cuda, cuda:N, mps; got {device!r}: {why}")


def _parse(device: str | torch.device, name: str) -> torch.device:
    import torch

    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, str):
        raise _refuse(name, device, f"type {type(device).__name__} is not a device name "
                                    "(write 'cuda:0' rather than 0)")
    text = device.strip().lower()
    try:
        return torch.device(text)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise _refuse(name, device, "not a device name") from exc


def _check_available(out: torch.device, device: object, name: str) -> None:
    import torch

    if out.type == "cpu":
        if out.index not in (None, 0):
            raise _refuse(name, device, "there is one CPU device (cpu or cpu:0)")
    elif out.type == "cuda":
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise _refuse(name, device, f"CUDA is not available on this machine (torch {torch.__version__}, "
                                        f"{built}); use 'cpu'")
        count = torch.cuda.device_count()
        if out.index is not None and out.index >= count:
            raise _refuse(name, device, f"CUDA index {out.index} is out of range: this machine has {count} "
                                        f"CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif out.type == "mps":
        if not torch.backends.mps.is_available():
            raise _refuse(name, device, "MPS (Apple GPU) is not available on this machine; use 'cpu'")
        if out.index not in (None, 0):
            raise _refuse(name, device, "there is one MPS device (mps or mps:0)")
    elif out.type in _NO_DATA:
        raise _refuse(name, device, f"the {out.type!r} device cannot hold real data ({_NO_DATA[out.type]})")
    else:
        raise _refuse(name, device, f"layerwise does not run on {out.type!r} devices")


def resolve_device(device: str | torch.device | None, default: str | torch.device = "cpu", *,
                   name: str = "device", local: bool = True) -> torch.device:
    """Validate a user's device and return it as a ``torch.device``.

    Parameters
    ----------
    device : str, torch.device or None
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (case and surrounding spaces ignored), a
        ``torch.device``, or None for ``default``.
    default : str or torch.device
        The device used when ``device`` is None (validated the same way).
    name : str
        The parameter named in the error message (``"device"``, ``"--device"`` ...).
    local : bool
        True (default): the work runs on this machine, which must have the device. False: it runs on other
        machines (SLURM jobs, a remote Dask cluster), so only the name is checked here (``cuda`` is accepted
        on a login node without a GPU; ``meta``, ``cpu:1`` or a malformed name are still refused) and the
        workers check availability when they call a ``device=`` function.

    Returns
    -------
    torch.device
        A device that can hold tensors on this machine (a tiny tensor is allocated on it as a check); with
        ``local=False``, a well-formed CPU, CUDA or MPS device.

    Raises
    ------
    ParameterError
        One line naming ``name``: a malformed name, an unknown type (not str/torch.device), a device that
        cannot hold real data (``meta``, ``lazy``), a device type layerwise does not run on, CUDA/MPS where
        they are not available, or a CUDA index out of range.
    """
    import torch

    raw = default if device is None else device
    out = _parse(raw, name)
    if not local and out.type in ("cuda", "mps"):
        return out  # checked where the work runs
    _check_available(out, raw, name)
    try:
        torch.empty(0, device=out)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _refuse(name, raw, f"cannot allocate on it ({first})") from exc
    return out


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, default: str = "cpu",
                        help: str | None = None) -> argparse.Action:
    """Add the standard ``--device`` flag to an argparse parser (or argument group).

    The value stays a string; the command passes it to :func:`resolve_device` (or to a library function
    that does) before any work, so a bad device gives the CLI's one-line error and exit code 2.

    Parameters
    ----------
    parser : argparse.ArgumentParser or argument group
        Where the flag goes.
    default : str
        The default device (``"cpu"``).
    help : str, optional
        Text placed before the standard :data:`DEVICE_HELP` (e.g. what runs on the device).

    Returns
    -------
    argparse.Action
        The added action.
    """
    text = DEVICE_HELP if help is None else f"{help.rstrip('.; ')}; {DEVICE_HELP}"
    return parser.add_argument("--device", default=default, metavar="DEVICE", help=text)
