"""Readers for CLIP fine-tunes laid out as FusionBench publishes them.

FusionBench (https://github.com/tanganke/fusion_bench) publishes one Hugging Face ``CLIPVisionModel`` folder
per task, named ``<model>_<task>`` (``clip-vit-base-patch32_sun397``,
``clip-vit-base-patch32_stanford-cars``, ...): a ``config.json`` with ``model_type: clip_vision_model`` and
the weights (``model.safetensors``) under ``vision_model.*``, the same names as in the full ``CLIPModel``
(transformers >= 5 writes them without the prefix; both are read). Only the image tower was fine-tuned; the
text tower and the ``visual_projection`` come from the pre-trained ``CLIPModel`` (``openai/clip-vit-*``).

- :data:`EIGHT_TASKS`: the task-arithmetic protocol's tasks, by their FusionBench names (SUN397, Cars,
  RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD).
- :func:`find_finetuned`: ``{task: folder}`` from a folder holding such downloads.
- :func:`read_clip_vision`: the ``vision_model.*`` tensors of one folder (``CLIPVisionModel`` or a whole
  ``CLIPModel``), read lazily from safetensors (or ``torch.load(weights_only=True)`` for ``.bin``), checked
  against the config's ``model_type``; no transformers import, no remote code.

Example
-------
>>> sorted(EIGHT_TASKS)[:3]
['dtd', 'eurosat', 'gtsrb']
>>> split_folder_name("clip-vit-base-patch32_stanford-cars")
('clip-vit-base-patch32', 'stanford-cars')
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..editing.checkpoints import open_checkpoint
from ..errors import CheckpointError, InputDataError

__all__ = [
    "EIGHT_TASKS",
    "TASK_DISPLAY_NAMES",
    "split_folder_name",
    "find_finetuned",
    "read_clip_vision",
    "check_against",
]

EIGHT_TASKS: tuple[str, ...] = (
    "sun397",
    "stanford-cars",
    "resisc45",
    "eurosat",
    "svhn",
    "gtsrb",
    "mnist",
    "dtd",
)
TASK_DISPLAY_NAMES: dict[str, str] = {
    "sun397": "SUN397",
    "stanford-cars": "Cars",
    "resisc45": "RESISC45",
    "eurosat": "EuroSAT",
    "svhn": "SVHN",
    "gtsrb": "GTSRB",
    "mnist": "MNIST",
    "dtd": "DTD",
}
_VISION_TYPES = ("clip_vision_model", "clip")


def split_folder_name(name: str) -> tuple[str, str] | None:
    """``"<model>_<task>" -> (model, task)`` (model names hold no underscore); None if there is none."""
    model, sep, task = name.partition("_")
    return (model, task) if sep and model and task else None


def find_finetuned(root: str | os.PathLike, model: str | None = None) -> dict[str, Path]:
    """``{task: folder}`` for the ``<model>_<task>`` folders (with a ``config.json``) in ``root``.

    Parameters
    ----------
    root : folder holding the downloads
    model : keep only this model's folders (e.g. ``"clip-vit-base-patch32"``); required when ``root`` holds
        several models' fine-tunes
    """
    folder = Path(root)
    if not folder.is_dir():
        raise InputDataError(f"fine-tuned models folder not found: {folder}")
    found: dict[str, dict[str, Path]] = {}
    for sub in sorted(folder.iterdir()):
        parts = split_folder_name(sub.name)
        if parts is None or not sub.is_dir() or not (sub / "config.json").is_file():
            continue
        found.setdefault(parts[0], {})[parts[1]] = sub
    if model is not None:
        if model not in found:
            raise InputDataError(
                f"{folder}: no '{model}_<task>' folders with a config.json (models found: {sorted(found)})"
            )
        return found[model]
    if len(found) != 1:
        raise InputDataError(
            f"{folder}: expected the '<model>_<task>' folders of one model, found models {sorted(found)}; "
            "name the model"
        )
    return next(iter(found.values()))


def read_clip_vision(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``vision_model.*`` tensors of a ``CLIPVisionModel`` (or ``CLIPModel``) folder.

    Returns
    -------
    dict
        ``"vision_model...." -> tensor``, the names of the full ``CLIPModel``'s image tower.
    """
    path = Path(folder)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json (a Hugging Face CLIPVisionModel folder is expected)")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(f"{cfg}: unreadable config ({err})") from None
    if model_type not in _VISION_TYPES:
        raise CheckpointError(
            f"{path}: config.json model_type is {model_type!r}, expected one of {list(_VISION_TYPES)}"
        )
    with open_checkpoint(path) as ck:
        names = ck.keys()
        if model_type == "clip" or any(k.startswith("vision_model.") for k in names):
            keys = {k: k for k in names if k.startswith("vision_model.")}
        else:  # transformers >= 5 saves CLIPVisionModel without the ``vision_model.`` prefix
            keys = {k: f"vision_model.{k}" for k in names}
        if not keys:
            raise CheckpointError(f"{path}: no vision_model.* tensors (names look like {names[:3]})")
        return {new: ck.read(k).reshape(ck.shape(k)).clone() for k, new in keys.items()}


def check_against(
    tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a fine-tune, checked against the pre-trained image tower (names and
    shapes); integer buffers (``position_ids`` of older exports) are dropped."""
    tensors = {k: v for k, v in tensors.items() if v.is_floating_point()}
    missing = sorted(
        k
        for k in reference
        if k.startswith("vision_model.") and reference[k].is_floating_point() and k not in tensors
    )
    extra = sorted(k for k in tensors if k not in reference)
    if missing or extra:
        raise CheckpointError(
            f"{source}: does not match the pre-trained image tower (missing {missing[:4]}, unexpected "
            f"{extra[:4]}); another model size?"
        )
    bad = [k for k in tensors if tuple(tensors[k].shape) != tuple(reference[k].shape)]
    if bad:
        raise CheckpointError(f"{source}: shapes differ from the pre-trained model for {bad[:4]}")
    return tensors
