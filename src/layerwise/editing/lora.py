"""LoRA adapters (PEFT folders) as merge inputs, read lazily as ``base + scaling * B @ A``.

A PEFT LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``) with, per adapted module ``M``, ``base_model.model.M.lora_A.weight`` ``(r, in)`` and
``base_model.model.M.lora_B.weight`` ``(out, r)`` (``lora_embedding_A`` ``(r, num_embeddings)`` /
``lora_embedding_B`` ``(dim, r)`` for embeddings). Its task vector on the base weight ``M.weight`` is

``delta = scaling * B @ A``,  ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``),

transposed for ``fan_in_fan_out`` layers (GPT-2's ``Conv1D``) and for embeddings; ``rank_pattern`` /
``alpha_pattern`` override ``r`` / ``lora_alpha`` per module (Hu et al., ICLR 2022, "LoRA: Low-Rank
Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685; the file layout of
https://github.com/huggingface/peft).

:class:`LoraCheckpoint` presents the adapted model as an ordinary :class:`~.checkpoints.Checkpoint` with the
base's keys, shapes and dtypes: every read of a slice of an adapted weight reads that slice of the base and
forms only the rows of ``B @ A`` it covers, so the dense adapted model never exists in memory. Unsupported
adapters (DoRA, trained biases, ``modules_to_save``, convolution LoRA) are refused with the reason. The
base layer peft saves with adapted embeddings (``save_embedding_layers``) replaces the base's weight. Reading
adapters needs no peft (only safetensors); peft (extra ``lora``) is used by the tests to build adapters.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoints import Checkpoint, open_checkpoint

__all__ = ["ADAPTER_CONFIG", "is_lora_adapter", "LoraCheckpoint", "open_lora"]

ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PAIRS = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}
_BASE_LAYER = re.compile(r"^(?:base_model\.model\.)?(.+)\.base_layer\.weight$")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$"
)


def is_lora_adapter(path: Any) -> bool:
    """True if ``path`` is a folder holding ``adapter_config.json`` (a PEFT adapter)."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: a key matches the module name or a dotted suffix."""
    for pat, value in (patterns or {}).items():
        if module == pat or module.endswith("." + pat) or re.fullmatch(rf"(.*\.)?{pat}", module):
            return value
    return default


class LoraCheckpoint(Checkpoint):
    """The base checkpoint with a LoRA adapter applied, lazily (see the module docstring).

    Parameters
    ----------
    base : the base model (any :func:`~.checkpoints.open_checkpoint` source).
    adapter : a PEFT adapter folder.
    """

    def __init__(self, base: Any, adapter: str | os.PathLike) -> None:
        self.base = open_checkpoint(base, name="base_model")
        folder = Path(adapter)
        self.source = str(folder)
        try:
            cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{folder}: unreadable {ADAPTER_CONFIG}: {err}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{folder}/{ADAPTER_CONFIG}: expected a JSON object")
        self.config = cfg
        self._check_config(cfg)
        weights = next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{folder}: a LoRA adapter needs one of {list(_WEIGHT_FILES)}")
        self.adapter = open_checkpoint(weights)
        self._targets = self._map_modules(cfg)

    def _check_config(self, cfg: dict) -> None:
        where = f"{self.source}/{ADAPTER_CONFIG}"
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{where}: DoRA adapters (use_dora: true) are not supported")
        if cfg.get("bias", "none") != "none":
            raise CheckpointError(
                f"{where}: adapters with trained biases (bias: {cfg['bias']!r}) are not supported"
            )
        for key in ("r", "lora_alpha"):
            v = cfg.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise CheckpointError(f"{where}: {key} must be a positive number, got {v!r}")

    def _map_modules(self, cfg: dict) -> dict[str, tuple[str, str, float, bool]]:
        """``{base key: (A key, B key, scaling, transpose)}``; refuses keys that are not LoRA factors."""
        found: dict[str, dict[str, str]] = {}
        self._base_layers: dict[str, str] = {}  # base key -> adapter key of a saved base layer
        base_keys = self.base.keys()
        for k in self.adapter.keys():
            m = _KEY.match(k)
            saved = _BASE_LAYER.match(k)
            if m is None and saved is not None:
                # peft saves the (possibly trained) base layer of adapted embeddings: it replaces the base's
                key = self._base_key(saved.group(1), base_keys)
                if tuple(self.adapter.shape(k)) != tuple(self.base.shape(key)):
                    raise CheckpointError(
                        f"{self.source}: saved base layer {k!r} has shape {tuple(self.adapter.shape(k))}, "
                        f"the base's {key!r} {tuple(self.base.shape(key))}"
                    )
                self._base_layers[key] = k
                continue
            if m is None:
                raise CheckpointError(
                    f"{self.source}: tensor {k!r} is not a LoRA factor (modules_to_save and other full "
                    "weights in adapters are not supported)"
                )
            found.setdefault(m.group(1), {})[m.group(2)] = k
        targets = {}
        for module, parts in sorted(found.items()):
            a_name = next((a for a in _PAIRS if a in parts), None)
            if a_name is None or _PAIRS[a_name] not in parts:
                raise CheckpointError(f"{self.source}: module {module!r} lacks its lora_A/lora_B pair")
            key = self._base_key(module, base_keys)
            a_key, b_key = parts[a_name], parts[_PAIRS[a_name]]
            a_shape, b_shape = self.adapter.shape(a_key), self.adapter.shape(b_key)
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise CheckpointError(
                    f"{self.source}: module {module!r}: only linear/embedding LoRA is supported, got "
                    f"A {a_shape}, B {b_shape}"
                )
            r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
            if int(r) != a_shape[0]:
                raise CheckpointError(
                    f"{self.source}: module {module!r} has rank {a_shape[0]} but the config says r = {r}"
                )
            scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
            transpose = a_name == "lora_embedding_A" or bool(cfg.get("fan_in_fan_out"))
            out_shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
            if tuple(self.base.shape(key)) != out_shape:
                raise CheckpointError(
                    f"{self.source}: module {module!r}: B @ A gives {out_shape} but the base's {key!r} is "
                    f"{tuple(self.base.shape(key))}"
                )
            targets[key] = (a_key, b_key, float(scaling), transpose)
        if not targets:
            raise CheckpointError(f"{self.source}: the adapter holds no LoRA factors")
        return targets

    def _base_key(self, module: str, base_keys: list[str]) -> str:
        want = module + ".weight"
        if want in base_keys:
            return want
        hits = [k for k in base_keys if k.endswith("." + want) or want.endswith("." + k)]
        if len(hits) != 1:
            raise CheckpointError(
                f"{self.source}: LoRA module {module!r} matches {len(hits)} weights of the base model "
                f"{self.base.source} ({hits[:4]}); is the adapter for this base?"
            )
        return hits[0]

    # -- Checkpoint interface: the base's keys, shapes and dtypes --------------------------------------------
    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.base

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    @property
    def adapted_keys(self) -> list[str]:
        """The base keys the adapter changes."""
        return sorted(set(self._targets) | set(self._base_layers))

    def delta(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened ``scaling * B @ A`` for ``key`` (float32, or float64
        when the base is), zeros for keys the adapter does not touch."""
        n = self.base.numel(key)
        stop = n if stop is None else stop
        dt = torch.float64 if self.base.dtype(key) == torch.float64 else torch.float32
        if key not in self._targets or stop <= start:
            return torch.zeros(max(stop - start, 0), dtype=dt)
        a_key, b_key, scaling, transpose = self._targets[key]
        cols = self.base.shape(key)[1]
        r0, r1 = start // cols, (stop - 1) // cols + 1  # rows covering [start, stop)
        a = self.adapter.get(a_key).to(dt)  # (r, in)
        b = self.adapter.get(b_key).to(dt)  # (out, r)
        rows = (b @ a[:, r0:r1]).T if transpose else b[r0:r1] @ a  # (r1 - r0, cols)
        flat = rows.reshape(-1) * scaling
        return flat[start - r0 * cols : stop - r0 * cols]

    def _base_read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if key in self._base_layers:
            return self.adapter.read(self._base_layers[key], start, stop).to(self.base.dtype(key))
        return self.base.read(key, start, stop)

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        base = self._base_read(key, start, stop)
        if key not in self._targets:
            return base
        return (base.to(self.delta(key, 0, 0).dtype) + self.delta(key, start, start + base.numel())).to(
            base.dtype
        )

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        self._fill(key, out, start, None)

    def read_into_over(
        self, key: str, out: torch.Tensor, start: int, base: Checkpoint, base_chunk: torch.Tensor
    ) -> None:
        # the merge stream has just read this chunk of our base: copy it instead of reading it again
        self._fill(key, out, start, base_chunk if base is self.base else None)

    def _fill(self, key: str, out: torch.Tensor, start: int, base_chunk: torch.Tensor | None) -> None:
        if key in self._base_layers:  # a layer the adapter saved whole (modules_to_save): not the base's
            out.copy_(self._base_read(key, start, start + out.numel()))
        elif base_chunk is None:
            self.base.read_into(key, out, start)
        else:
            out.copy_(base_chunk)
        if key in self._targets:
            out += self.delta(key, start, start + out.numel()).to(out.dtype)

    def close(self) -> None:
        self.adapter.close()


def open_lora(base: Any, adapter: str | os.PathLike) -> LoraCheckpoint:
    """Open a PEFT LoRA adapter folder on top of ``base`` (see :class:`LoraCheckpoint`)."""
    return LoraCheckpoint(base, adapter)
