"""Forward-backward measurements on real diffusion models (text and images).

The same observables as the RHM experiments (:mod:`layerwise.hierarchy.observables`: C(r), chi,
correlation length) on a masked diffusion language model (:mod:`.text`) and on a ``diffusers`` image model
with changes measured in a vision encoder's patch-embedding space (:mod:`.images`). Heavy libraries
(transformers, diffusers) are imported only when a checkpoint is loaded (extras ``hf`` / ``diffusion``).
"""

from .images import (
    ImageLevelResult,
    denoise_from,
    hf_patch_encoder,
    image_forward_backward,
    load_unet_and_scheduler,
)
from .runner import run_images, run_text
from .text import MaskedLMDenoiser, TokenMasking, passages_from_text, text_forward_backward

__all__ = [
    "TokenMasking",
    "MaskedLMDenoiser",
    "passages_from_text",
    "text_forward_backward",
    "ImageLevelResult",
    "denoise_from",
    "image_forward_backward",
    "hf_patch_encoder",
    "load_unet_and_scheduler",
    "run_text",
    "run_images",
]
