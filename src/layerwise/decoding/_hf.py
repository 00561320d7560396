"""Small private helpers shared by the decoding modules: lazy imports and the transformers forward calls.

transformers 5.24 renamed the forward keyword ``past_key_values`` to ``cache`` (the old name is deprecated);
:func:`forward_step` finds the name the model accepts once, so the same code runs on 5.x before and after.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any

import torch

from ..errors import InputDataError, MissingExtraError

__all__ = ["require", "cache_kwarg", "forward_step", "positions_from_mask", "output_cache", "model_source",
           "read_rgb_image"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError(
            f"{module} is needed here; install it with `pip install 'layerwise[{extra}]'`"
        ) from err


def _looks_like_path(name: str) -> bool:
    """True when ``name`` cannot be a Hugging Face repo id (``name`` or ``owner/name``): it is a path."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1:
        return True
    return any(not part or not all(c.isalnum() or c in "-_." for c in part) for part in name.split("/"))


def model_source(path: Any, what: str = "model") -> str:
    """``path`` checked before transformers sees it: an existing local folder (returned as given), or a
    string that can only be a hub repo id (``name`` or ``owner/name``, not present locally).

    A local path that does not exist (``./ckpt``, ``path/to/mlm``, ``/abs/dir``, ``~/x``) raises
    InputDataError "folder not found" without any network access; an existing file that is not a folder
    raises too.
    """
    import os
    from pathlib import Path

    if not isinstance(path, str | os.PathLike) or not str(path).strip():
        raise InputDataError(f"{what} must be a folder path or a hub id, got {path!r}")
    name = str(path)
    local = Path(name).expanduser()
    if local.is_dir():
        return name
    if local.exists():
        raise InputDataError(f"{what} {name!r} is a file, not a folder (the folder save_pretrained wrote)")
    if isinstance(path, os.PathLike) or _looks_like_path(name):
        raise InputDataError(f"{what} folder not found: {name!r} (no such local folder; not a hub id)")
    return name


def read_rgb_image(path: Any) -> Any:
    """A PIL RGB image from ``path``; a missing or unreadable file, or one over Pillow's decompression-bomb
    limit (``PIL.Image.MAX_IMAGE_PIXELS``; both the warning and the error), raises InputDataError."""
    import warnings
    from pathlib import Path

    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise InputDataError(f"image {str(path)!r} does not exist or is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputDataError(f"image {str(path)!r} is too large to decode safely (a decompression bomb?): "
                             f"{err}") from None
    except OSError as err:
        raise InputDataError(f"cannot read image {str(path)!r}: {err}") from None


_FORWARD_INFO: dict[type, tuple[str, bool]] = {}


def _forward_info(model: Any) -> tuple[str, bool]:
    # inspect.signature costs ~50 us: look it up once per model class, not once per decoding step.
    key = type(model)
    if key not in _FORWARD_INFO:
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        _FORWARD_INFO[key] = (name, "logits_to_keep" in params)
    return _FORWARD_INFO[key]


def cache_kwarg(model: Any) -> str:
    """The forward keyword carrying the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return _forward_info(model)[0]


def output_cache(out: Any) -> Any:
    """The KV cache in a model output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``cumsum(mask) - 1`` (0 on padding): left-padded rows then start at position 0.

    attention_mask: (batch, length) of 0/1 -> (batch, length) long.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def forward_step(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any,
    **extra: Any,
) -> tuple[torch.Tensor, Any]:
    """One forward pass returning ``(last-position logits (batch, vocab) float32, new cache)``.

    ``cache=None`` starts a fresh cache owned by the caller (never the one ``generate`` holds).
    ``attention_mask`` covers the cached tokens plus ``input_ids``; ``position_ids`` only ``input_ids``.
    """
    name, keeps_logits = _forward_info(model)
    kwargs = {name: cache, **extra}
    if keeps_logits:
        kwargs["logits_to_keep"] = 1  # only the last position is needed: skip the LM head elsewhere
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        return_dict=True,
        **kwargs,
    )
    return out.logits[:, -1].float(), output_cache(out)
