"""Decoding-time editing: M3ID against visual hallucination, M3ID + DPO, and hallucination metrics.

>>> from layerwise.decoding import M3IDLogitsProcessor, m3id_generate, m3id_scores, chair, pope_metrics

transformers (extra ``hf``) and trl (extra ``dpo``) are imported only by the functions that need them.
"""

from .dpo import build_preference_pairs, first_sentence, first_words, train_dpo
from .generate import m3id_custom_generate, m3id_generate, unconditional_inputs
from .m3id import M3IDLogitsProcessor, m3id_scores, m3id_weight
from .metrics import SynonymTable, chair, extract_objects, parse_yes_no, pope_metrics
from .reliance import RelianceResult, plot_reliance, visual_reliance

__all__ = [
    "M3IDLogitsProcessor",
    "m3id_scores",
    "m3id_weight",
    "m3id_generate",
    "m3id_custom_generate",
    "unconditional_inputs",
    "build_preference_pairs",
    "first_sentence",
    "first_words",
    "train_dpo",
    "SynonymTable",
    "chair",
    "extract_objects",
    "parse_yes_no",
    "pope_metrics",
    "visual_reliance",
    "RelianceResult",
    "plot_reliance",
]
