"""Tangent-space fine-tuning: linearized models, weight disentanglement, and the task-arithmetic protocols.

>>> from layerwise.tangent import LinearizedModel, finetune, disentanglement_error  # doctest: +SKIP

Submodules: ``linearize`` (the first-order expansion of a model around its pre-trained weights),
``finetune`` (non-linear or linearized fine-tuning under a frozen head), ``disentanglement`` (the weight
disentanglement error), ``evaluation`` (the validation searches of the task-arithmetic and LiNeS
protocols), ``workflow`` (``layerwise finetune``), ``clip`` (Hugging Face CLIP encoders and zero-shot
heads), ``toy_models`` and ``toy_tasks`` (CPU-scale encoders and tasks), ``plotting``.

This package builds on :mod:`layerwise.editing` (task vectors, checkpoints); ``editing`` never imports it.
"""

from .disentanglement import disentanglement_error
from .finetune import FinetuneConfig, finetune
from .linearize import LinearizedModel

__all__ = [
    "LinearizedModel",
    "disentanglement_error",
    "FinetuneConfig",
    "finetune",
]
