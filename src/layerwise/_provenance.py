"""Where a result came from: layerwise version, git commit, machine, time. Recorded with every experiment run.

>>> info = provenance()
>>> sorted(info) == ["git_commit", "git_dirty", "layerwise_version", "machine", "python", "torch",
...                  "transformers"]
True
>>> "cpu_capability" in info["machine"]  # the vector ISA of torch's kernels: float results depend on it
True
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["provenance", "machine_info", "git_commit", "utc_now"]


def utc_now() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_commit(path: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``path`` (default: this package), or ``(None, None)``.

    Only a checkout whose top folder contains ``pyproject.toml`` counts (an installed wheel inside some
    other repository must not report that repository's commit). ``dirty`` ignores untracked files.
    """
    root = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (commit or None), bool(status.strip())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores (all and usable by this process), load average, GPU (if torch sees one)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    gpu = None
    torch = sys.modules.get("torch")  # only report a GPU when torch is already imported (no slow import here)
    if torch is not None:
        try:
            if torch.cuda.is_available():
                gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        except Exception:  # noqa: BLE001 - a broken CUDA setup must not stop a CPU run from being recorded
            gpu = None
    isa = None  # the vector instruction set torch's CPU kernels use: float results depend on it
    if torch is not None:
        try:
            isa = torch.backends.cpu.get_cpu_capability()
        except Exception:  # noqa: BLE001 - older torch: leave it out
            isa = None
    return {
        "cpu": _cpu_name(),
        "cpu_capability": isa,
        "numerics_env": {k: os.environ[k] for k in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
                         if k in os.environ},
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average_1_5_15min": load,
        "gpu": gpu,
        "system": f"{platform.system()} {platform.release()}",
    }


def provenance() -> dict[str, Any]:
    """Version, commit and machine of the current process (see :func:`machine_info`)."""
    from . import __version__

    commit, dirty = git_commit()
    torch = sys.modules.get("torch")
    transformers = sys.modules.get("transformers")
    return {
        "layerwise_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None),
        "transformers": getattr(transformers, "__version__", None),
        "machine": machine_info(),
    }
