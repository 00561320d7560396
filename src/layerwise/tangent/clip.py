"""The real-model path: a Hugging Face CLIP image encoder with zero-shot heads built from class names.

As in the papers, only the image tower (``vision_model`` + ``visual_projection``) is fine-tuned, under the
frozen zero-shot head of each task: the normalized average text embedding of ``template.format(class)``
over a few prompt templates, scaled by CLIP's ``logit_scale``. The encoder's state-dict keys are those of
``CLIPModel`` (``vision_model.encoder.layers.{i}...``), so LiNeS finds its blocks and ``layerwise merge``
merges its fine-tunes. Attention runs in the "eager" implementation, which forward-mode differentiation
(the linearized model) supports.

Requires the ``hf`` extra (transformers). Images are read with Pillow (``data`` extra) from one folder per
class (``root/<class name>/*.png|jpg|...``).

Example
-------
>>> clip, tokenizer = load_clip("openai/clip-vit-base-patch32")          # doctest: +SKIP
>>> encoder = ClipImageEncoder(clip)                                     # doctest: +SKIP
>>> head = zeroshot_head(clip, tokenizer, ["cat", "dog"])  # (N, D) -> (N, 2)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputDataError, MissingExtraError, ParameterError
from .toy_models import PrototypeHead

__all__ = [
    "DEFAULT_TEMPLATES",
    "ClipImageEncoder",
    "load_clip",
    "zeroshot_head",
    "ImageFolder",
    "preprocess_settings",
]

DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "an image of a {}.")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - hf extra installed in CI
        raise MissingExtraError("the CLIP path needs transformers: pip install 'layerwise[hf]'") from err
    return transformers


def load_clip(path: str | os.PathLike, *, local_files_only: bool = False) -> tuple[nn.Module, Any]:
    """``(CLIPModel, tokenizer)`` from a local folder or a hub id (``trust_remote_code`` stays off; eager
    attention so that the linearized model can differentiate through it)."""
    tf = _transformers()
    try:
        model = tf.CLIPModel.from_pretrained(
            str(path), attn_implementation="eager", local_files_only=local_files_only
        )
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise ParameterError(
            f"model.path: cannot load a CLIP model and tokenizer from {path!s}: {str(err).splitlines()[0]}"
        ) from None
    return model.eval(), tokenizer


class ClipImageEncoder(nn.Module):
    """``pixel_values (N, 3, H, W) -> visual_projection(vision_model(x).pooler_output)`` (N, D).

    Holds (not copies) the ``vision_model`` and ``visual_projection`` of a ``CLIPModel``; its state-dict
    keys match the CLIP checkpoint's (``vision_model.*``, ``visual_projection.*``).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        if not (hasattr(clip, "vision_model") and hasattr(clip, "visual_projection")):
            raise ParameterError(f"clip must be a transformers CLIPModel, got {type(clip).__name__}")
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


@torch.no_grad()
def zeroshot_head(
    clip: nn.Module, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> PrototypeHead:
    """The zero-shot classification head: for each class the normalized mean over templates of the
    normalized text embeddings, as a frozen cosine head with CLIP's logit scale."""
    if not classnames:
        raise ParameterError("classnames must not be empty")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ParameterError(f"templates must each contain '{{}}' (the class name), got {list(templates)}")
    protos = []
    for name in classnames:
        batch = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
        out = clip.text_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        emb = torch.nn.functional.normalize(clip.text_projection(out.pooler_output), dim=-1)  # (T, D)
        protos.append(emb.mean(0))
    scale = float(clip.logit_scale.exp()) if hasattr(clip, "logit_scale") else 100.0
    return PrototypeHead(torch.stack(protos), scale=scale)


def preprocess_settings(path: str | os.PathLike | None, image_size: int) -> dict[str, Any]:
    """Resize/crop size and normalization from ``preprocessor_config.json`` in a model folder (CLIP
    defaults otherwise)."""
    settings = {"size": image_size, "mean": CLIP_MEAN, "std": CLIP_STD}
    cfg = Path(path) / "preprocessor_config.json" if path is not None else None
    if cfg is not None and cfg.is_file():
        raw = json.loads(cfg.read_text())
        settings["mean"] = tuple(raw.get("image_mean", CLIP_MEAN))
        settings["std"] = tuple(raw.get("image_std", CLIP_STD))
    return settings


class ImageFolder(torch.utils.data.Dataset):
    """Images in ``root/<class>/``: resized (shorter side, bicubic), center-cropped to ``size``, RGB,
    normalized; ``(pixel_values (3, size, size), label)``. Classes are the given names (folder names) in
    order, or the sorted sub-folders."""

    def __init__(
        self,
        root: str | os.PathLike,
        size: int,
        classes: Sequence[str] | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        try:
            from PIL import Image  # noqa: F401
        except ImportError as err:  # pragma: no cover
            raise MissingExtraError("reading images needs Pillow: pip install 'layerwise[data]'") from err
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputDataError(f"image folder not found: {self.root}")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.classes = list(classes) if classes is not None else folders
        missing = [c for c in self.classes if c not in folders]
        if missing or not self.classes:
            raise InputDataError(
                f"{self.root}: expected one sub-folder per class; missing {missing or 'all'} "
                f"(found {folders[:10]})"
            )
        self.items = [
            (p, i)
            for i, c in enumerate(self.classes)
            for p in sorted((self.root / c).iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.items:
            raise InputDataError(f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[i]
        try:
            with warnings.catch_warnings():
                # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that: refuse both, before
                # decoding (a small file can declare billions of pixels)
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as src:
                    im = src.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise InputDataError(f"{path}: image too large to decode safely (a decompression bomb?): {err}") \
                from None
        except OSError as err:
            raise InputDataError(f"{path}: unreadable image ({err})") from None
        try:
            with im:
                w, h = im.size
                s = self.size / min(w, h)
                im = im.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except OSError as err:
            raise InputDataError(f"{path}: unreadable image ({err})") from None
        x = data.reshape(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std, label
