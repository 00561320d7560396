"""Decoding-time editing: M3ID and VCD against visual hallucination, M3ID + DPO, hallucination metrics and
the POPE / CHAIR runners.

>>> from layerwise.decoding import M3IDLogitsProcessor, m3id_generate, m3id_scores, chair, pope_metrics

transformers (extra ``hf``) and trl (extra ``dpo``) are imported only by the functions that need them.
"""

from .benchmarks import DECODERS, decode, run_chair, run_pope
from .dpo import build_preference_pairs, first_sentence, first_words, train_dpo
from .generate import contrastive_loop, m3id_custom_generate, m3id_generate, unconditional_inputs
from .m3id import M3IDLogitsProcessor, m3id_scores, m3id_weight
from .metrics import SynonymTable, chair, extract_objects, parse_yes_no, pope_metrics
from .reliance import RelianceResult, plot_reliance, visual_reliance
from .vcd import diffusion_noise, vcd_custom_generate, vcd_generate, vcd_scores

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
    "contrastive_loop",
    "vcd_scores",
    "vcd_generate",
    "vcd_custom_generate",
    "diffusion_noise",
    "DECODERS",
    "decode",
    "run_pope",
    "run_chair",
]
