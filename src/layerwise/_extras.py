"""Optional extras: which modules each one provides, and a fast check that names the extra to install.

The check uses :func:`importlib.util.find_spec`, which looks a module up without importing it, so a command
can check all its extras in milliseconds before it loads anything or starts working.

>>> from layerwise._extras import EXTRAS
>>> EXTRAS["dpo"]
('trl', 'datasets', 'transformers')
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from .errors import MissingExtraError, ParameterError

__all__ = ["EXTRAS", "missing_modules", "require_extras"]

# extra name (pyproject [project.optional-dependencies]) -> top-level modules it must make importable.
EXTRAS: dict[str, tuple[str, ...]] = {
    "hf": ("transformers", "PIL"),
    "diffusion": ("diffusers", "transformers"),
    "dpo": ("trl", "datasets", "transformers"),
    "vision": ("timm", "open_clip"),
    "data": ("sklearn", "PIL"),
    "dask": ("dask", "distributed"),
    "slurm": ("submitit",),
    "lora": ("peft", "transformers"),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module with __spec__ None
        return False


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty when the extra is installed)."""
    if extra not in EXTRAS:
        raise ParameterError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    return [m for m in EXTRAS[extra] if not _importable(m)]


def require_extras(extras: Iterable[str], what: str) -> None:
    """Raise :class:`MissingExtraError` naming the first extra of ``extras`` that is not installed.

    Parameters
    ----------
    extras : names of extras (keys of :data:`EXTRAS`), e.g. ``("hf", "dpo")``.
    what : what needs them, for the message (e.g. ``"experiment m3id"``).
    """
    for extra in extras:
        missing = missing_modules(extra)
        if missing:
            raise MissingExtraError(
                f"{what} needs the optional extra {extra!r} (missing module {', '.join(missing)}): "
                f"install it with pip install 'layerwise[{extra}]'"
            )
