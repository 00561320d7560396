"""Load a Hugging Face folder (or hub id) for M3ID: a Llava-family VLM with its processor, or a causal LM.

Safe by default: ``trust_remote_code=False`` (a folder's own Python code is never run unless asked) and
weights through transformers' safetensors loading.
"""

from __future__ import annotations

from typing import Any

from ..errors import ParameterTypeError
from ._hf import model_source, require

__all__ = ["load_for_m3id"]


def load_for_m3id(
    path: str,
    *,
    vision: bool = True,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    device: str | Any = "cpu",
) -> tuple[Any, Any]:
    """Return ``(model, processor_or_tokenizer)`` from ``path``.

    Parameters
    ----------
    path : a local folder written by ``save_pretrained`` (or a hub id, downloaded by transformers). A
        path that can only be local (``./x``, ``a/b/c``, ``/abs``) and does not exist raises InputDataError
        "folder not found" before transformers is asked (no network access).
    vision : True for an image-text-to-text model (Llava family) and its processor; False for a causal LM
        and its tokenizer (text conditions, e.g. document-grounded generation).
    trust_remote_code : allow the folder's own modelling code (off by default).
    dtype : ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    device : where the model goes: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``,
        checked by :func:`layerwise._device.resolve_device` before anything is loaded.
    """
    require("transformers", "hf")
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from .._device import resolve_device
    from .._validation import check_choice

    device = resolve_device(device)
    path = model_source(path, "model")
    check_choice("dtype", dtype, ("float32", "bfloat16", "float16"))
    if not isinstance(trust_remote_code, bool):
        raise ParameterTypeError(f"trust_remote_code must be a bool, got {trust_remote_code!r}")
    kw = {"trust_remote_code": trust_remote_code}
    if vision:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype), **kw)
        processor = AutoProcessor.from_pretrained(path, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kw)
        processor = AutoTokenizer.from_pretrained(path, **kw)
    return model.to(device).eval(), processor
