"""Vocabulary mismatches (``tokenizer_source: base``): present a model with the base's embedding rows.

A fine-tune that added tokens (a pad token, chat tokens) has embedding / output matrices with more rows
than the base; one trained with a trimmed vocabulary has fewer. With the base's tokenizer the merged model
keeps the base's vocabulary, so each such tensor of a model is viewed with the base's shape: extra rows are
dropped (truncated) and missing rows are taken from the base (their task vector is 0). Only tensors that
differ from the base in their first dimension alone are aligned; every aligned tensor is named in a
warning.

Example
-------
>>> import warnings
>>> base = {"embed.weight": torch.zeros(3, 2)}
>>> ft = {"embed.weight": torch.ones(4, 2)}
>>> with warnings.catch_warnings(record=True):
...     aligned, keys = align_vocabulary([ft], base)
>>> keys, aligned[0].get("embed.weight").shape
(['embed.weight'], torch.Size([3, 2]))
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .checkpoints import Checkpoint, open_checkpoint

__all__ = ["RowAlignedCheckpoint", "align_vocabulary", "row_mismatches"]


def row_mismatches(model: Checkpoint, base: Checkpoint) -> list[str]:
    """Keys present in both whose shapes differ in the first dimension only (vocabulary rows)."""
    out = []
    base_keys = set(base.keys())
    for k in model.keys():
        if k not in base_keys:
            continue
        a, b = model.shape(k), base.shape(k)
        if len(a) >= 1 and len(a) == len(b) and a[0] != b[0] and a[1:] == b[1:]:
            out.append(k)
    return out


class RowAlignedCheckpoint(Checkpoint):
    """``model`` seen with the base's shapes for ``keys``: rows beyond the base's dropped, missing rows
    read from the base."""

    def __init__(self, model: Checkpoint, base: Checkpoint, keys: Sequence[str]) -> None:
        self.model, self.base, self.aligned = model, base, set(keys)
        self.source = model.source

    def keys(self) -> list[str]:
        return self.model.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.model

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key) if key in self.aligned else self.model.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.model.dtype(key)

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if key not in self.aligned:
            return self.model.read(key, start, stop)
        n = self.base.numel(key)
        stop = n if stop is None else min(stop, n)
        shared = min(self.model.numel(key), n)  # rows are contiguous: the first rows' elements
        parts = []
        if start < shared:
            parts.append(self.model.read(key, start, min(stop, shared)))
        if stop > shared:
            parts.append(self.base.read(key, max(start, shared), stop).to(self.model.dtype(key)))
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.model.dtype(key))

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        if key not in self.aligned:
            return self.model.read_into(key, out, start)
        out.copy_(self.read(key, start, start + out.numel()))

    def close(self) -> None:
        self.model.close()


def align_vocabulary(models: Sequence[Any], base: Any) -> tuple[list[Checkpoint], list[str]]:
    """Wrap each model whose vocabulary rows differ from ``base``'s; warn naming the keys.

    Returns the (possibly wrapped) checkpoints and the sorted list of aligned keys.
    """
    base = open_checkpoint(base, name="base_model")
    out, changed = [], set()
    for i, m in enumerate(models):
        ck = open_checkpoint(m, name=f"models[{i}]")
        keys = row_mismatches(ck, base)
        if keys:
            details = ", ".join(f"{k!r} ({ck.shape(k)[0]} rows vs {base.shape(k)[0]})" for k in keys[:6])
            warnings.warn(
                f"tokenizer_source base: {ck.source} has a different vocabulary; its rows beyond the base's "
                f"are dropped and missing rows taken from the base in {details}"
                + (f" and {len(keys) - 6} more" if len(keys) > 6 else ""),
                stacklevel=2,
            )
            ck = RowAlignedCheckpoint(ck, base, keys)
            changed.update(keys)
        out.append(ck)
    return out, sorted(changed)
