"""``tokenizer_source: union``: merge models whose tokenizers differ, on the union of their vocabularies.

The output tokenizer is the base's with every token of the other models that it lacks appended (mergekit's
``build_union_tokenizer``): first the ordinary vocabulary tokens, model by model (base first, then the models
in the order listed) and, within a model, by increasing id; then the added tokens (special tokens such as a
pad token) in the same order, the first model's settings winning. Tokens whose id is beyond a model's
``vocab_size`` (``config.json``) are ignored. mergekit walks each tokenizer's vocabulary in dictionary order,
which is not fixed, so the ids of new tokens may differ from mergekit's; the row of every token string is
the same.

Every vocabulary tensor (a 2-D floating tensor outside the residual blocks whose rows are the model's
vocabulary: embeddings, output head) of every model, base included, is presented with one row per output
token, looked up by token string. A checkpoint lacking a token gets the row mergekit gives it
(``PermutedVocabulary``): the row of the only checkpoint that has it; else the base's row if the base has
it; else the mean of the rows of the checkpoints that have it (summed in order, then divided); zero if no
checkpoint has it. A token only one fine-tune brought therefore keeps that fine-tune's row in the merge.

Reading tokenizers needs ``transformers`` (extra ``hf``); nothing is downloaded and no remote code runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ParameterError
from .checkpoints import Checkpoint
from .lines import discover_blocks
from .model_card import TOKENIZER_FILES  # the files replaced by the union tokenizer

__all__ = [
    "UnionVocabulary",
    "PermutedCheckpoint",
    "build_union_vocabulary",
    "union_checkpoints",
    "vocabulary_keys",
    "write_tokenizer",
]


def _load_tokenizer(folder: Path, what: str) -> Any:
    from .._extras import require_extras

    require_extras(["hf"], "tokenizer_source: union")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(folder), use_fast=True, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"tokenizer_source union: cannot read the tokenizer of {what} {folder}: {err}"
        ) from None


def _vocab_size(folder: Path, tokenizer: Any) -> int:
    """``vocab_size`` of the folder's ``config.json`` (any depth: a text sub-config), else the tokenizer's."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return len(tokenizer)

    def find(node: Any) -> int | None:
        if isinstance(node, dict):
            v = node.get("vocab_size")
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            for sub in node.values():
                got = find(sub)
                if got is not None:
                    return got
        return None

    found = find(cfg)
    return len(tokenizer) if found is None else found


@dataclass
class UnionVocabulary:
    """The union vocabulary: the output tokenizer, its ``vocab`` (token -> id, ``size`` tokens) and, per
    checkpoint (base first), ``perms[i][new_id]`` = the row of that token in checkpoint ``i`` or -1."""

    tokenizer: Any
    vocab: dict[str, int]
    perms: list[torch.Tensor]
    sizes: list[int]

    @property
    def size(self) -> int:
        """Number of tokens (rows) of the output vocabulary."""
        return len(self.vocab)

    def defaults(self) -> dict[int, tuple[str, list[int]]]:
        """``{new_id: (rule, checkpoints)}`` for every token some checkpoint lacks (see the module doc):
        ``("donor", [i])``, ``("base", [0])``, ``("mean", [i, j, ...])`` or ``("zero", [])``."""
        present = torch.stack([p >= 0 for p in self.perms])  # (C, V)
        out: dict[int, tuple[str, list[int]]] = {}
        for tid in torch.nonzero(~present.all(dim=0)).flatten().tolist():
            have = torch.nonzero(present[:, tid]).flatten().tolist()
            if len(have) == 1:
                out[tid] = ("donor", have)
            elif not have:
                out[tid] = ("zero", [])
            elif have[0] == 0:
                out[tid] = ("base", [0])
            else:
                out[tid] = ("mean", have)
        return out


def build_union_vocabulary(folders: Sequence[str | os.PathLike | None]) -> UnionVocabulary:
    """The union vocabulary of the tokenizers in ``folders`` (base first). A ``None`` entry (a LoRA adapter,
    a folder without a tokenizer) uses the base's tokenizer."""
    base_folder = Path(folders[0])
    base_tok = _load_tokenizer(base_folder, "the base model")
    toks, sizes = [], []
    for i, f in enumerate(folders):
        if f is None or (
            i > 0
            and not (Path(f) / "tokenizer_config.json").is_file()
            and not (Path(f) / "tokenizer.json").is_file()
        ):
            toks.append(base_tok)
            sizes.append(_vocab_size(base_folder, base_tok))
            continue
        tok = base_tok if i == 0 else _load_tokenizer(Path(f), f"models[{i - 1}]")
        toks.append(tok)
        sizes.append(_vocab_size(Path(f), tok))
    if any(idx >= sizes[0] for idx in base_tok.get_vocab().values()):
        raise ParameterError(
            f"tokenizer_source union: the base tokenizer of {base_folder} has ids beyond its vocab_size "
            f"{sizes[0]}; unsupported"
        )
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in zip(toks, sizes, strict=True):
        special = {info.content for info in tok.added_tokens_decoder.values()}
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < size and token not in special:
                plain.setdefault(token)
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx < size and info.content not in added:
                added[info.content] = info
    out = _load_tokenizer(base_folder, "the base model")  # a fresh copy to extend
    base_vocab = base_tok.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    vocab = out.get_vocab()
    perms = []
    for tok, size in zip(toks, sizes, strict=True):
        own = tok.get_vocab()
        p = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, new_id in vocab.items():
            old = own.get(token, -1)
            if 0 <= old < size:
                p[new_id] = old
        perms.append(p)
    return UnionVocabulary(out, vocab, perms, sizes)


def vocabulary_keys(checkpoints: Sequence[Checkpoint], sizes: Sequence[int]) -> list[str]:
    """Keys of the vocabulary tensors: 2-D floating tensors outside the residual blocks whose first
    dimension is the vocabulary size in the base (``checkpoints[0]``); each other checkpoint must have its
    own vocabulary size there."""
    base = checkpoints[0]
    floats = [k for k in base.keys() if base.dtype(k).is_floating_point]
    try:
        inside = set(discover_blocks(floats).depth)
    except ParameterError:
        inside = set()
    keys = [k for k in floats if k not in inside and len(base.shape(k)) == 2 and base.shape(k)[0] == sizes[0]]
    for i, (ck, size) in enumerate(zip(checkpoints, sizes, strict=True)):
        for k in keys:
            if k not in ck or ck.shape(k)[0] != size or ck.shape(k)[1:] != base.shape(k)[1:]:
                shape = ck.shape(k) if k in ck else "missing"
                raise CheckpointError(
                    f"tokenizer_source union: {ck.source} tensor {k!r} is {shape}, expected {size} rows (its "
                    f"vocab_size) of width {base.shape(k)[1:]} (checkpoint {i})"
                )
    if not keys:
        raise CheckpointError(
            f"tokenizer_source union: no embedding/output tensor with {sizes[0]} rows (the base's "
            f"vocab_size) outside the residual blocks of {base.source}"
        )
    return keys


class PermutedCheckpoint(Checkpoint):
    """Checkpoint ``index`` of ``raw`` with its vocabulary tensors on the union vocabulary (rows by token
    string; missing rows by the rules of the module docstring). Other tensors pass through."""

    def __init__(self, raw: Sequence[Checkpoint], index: int, union: UnionVocabulary, keys: Sequence[str]):
        self.raw, self.index, self.union = list(raw), index, union
        self.model = raw[index]
        self.source = self.model.source
        self.vocab_keys = set(keys)
        self._perm = union.perms[index]
        self._defaults = union.defaults()

    def keys(self) -> list[str]:
        return self.model.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.model

    def shape(self, key: str) -> tuple[int, ...]:
        shape = self.model.shape(key)
        return (self.union.size, *shape[1:]) if key in self.vocab_keys else shape

    def dtype(self, key: str) -> torch.dtype:
        return self.model.dtype(key)

    def _row(self, key: str, ck: int, row: int, width: int) -> torch.Tensor:
        return self.raw[ck].read(key, row * width, (row + 1) * width)

    def _rows(self, key: str, r0: int, r1: int, width: int) -> torch.Tensor:
        """Output rows ``[r0, r1)`` (r1 - r0, width) in this checkpoint's dtype."""
        dt = self.model.dtype(key)
        out = torch.empty(r1 - r0, width, dtype=dt)
        perm = self._perm[r0:r1].tolist()
        i = 0
        while i < len(perm):
            src = perm[i]
            if src >= 0:  # a run of consecutive source rows: one read
                j = i + 1
                while j < len(perm) and perm[j] == src + (j - i):
                    j += 1
                out[i:j] = self.model.read(key, src * width, (src + j - i) * width).view(j - i, width)
                i = j
                continue
            rule, cks = self._defaults[r0 + i]
            if rule == "zero":
                out[i] = 0
            elif rule in ("donor", "base"):
                c = cks[0]
                out[i] = self._row(key, c, int(self.union.perms[c][r0 + i]), width).to(dt)
            else:  # mean, summed in order in the promoted dtype (as mergekit), then divided
                promoted = dt
                for c in cks:
                    promoted = torch.promote_types(promoted, self.raw[c].dtype(key))
                acc = torch.zeros(width, dtype=promoted)
                for c in cks:
                    acc = acc + self._row(key, c, int(self.union.perms[c][r0 + i]), width).to(promoted)
                out[i] = (acc / len(cks)).to(dt)
            i += 1
        return out

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if key not in self.vocab_keys:
            return self.model.read(key, start, stop)
        shape = self.shape(key)
        width = 1
        for d in shape[1:]:
            width *= d
        n = shape[0] * width
        stop = n if stop is None else min(stop, n)
        if start >= stop:
            return torch.empty(0, dtype=self.model.dtype(key))
        r0, r1 = start // width, -(-stop // width)
        rows = self._rows(key, r0, r1, width).reshape(-1)
        return rows[start - r0 * width : stop - r0 * width]

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        if key not in self.vocab_keys:
            return self.model.read_into(key, out, start)
        out.copy_(self.read(key, start, start + out.numel()))

    def close(self) -> None:
        self.model.close()


def union_checkpoints(
    base: Checkpoint, models: Sequence[Checkpoint], folders: Sequence[str | os.PathLike | None]
) -> tuple[Checkpoint, list[Checkpoint], UnionVocabulary, list[str]]:
    """Wrap the base and the models (``folders``: base first, None for the base's tokenizer) on the union
    vocabulary; returns them, the union and the vocabulary keys."""
    union = build_union_vocabulary(folders)
    raw = [base, *models]
    keys = vocabulary_keys(raw, union.sizes)
    wrapped = [PermutedCheckpoint(raw, i, union, keys) for i in range(len(raw))]
    return wrapped[0], wrapped[1:], union, keys


def write_tokenizer(union: UnionVocabulary, folder: Path) -> None:
    """Replace the tokenizer files copied into ``folder`` by the union tokenizer and set ``vocab_size`` in
    its ``config.json`` (top level and sub-configs that had the base's)."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    union.tokenizer.save_pretrained(str(folder))
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return
    old = union.sizes[0]

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("vocab_size") == old:
                node["vocab_size"] = union.size
            for v in node.values():
                fix(v)

    fix(cfg)
    cfg_path.unlink()
    from .._io import write_json

    write_json(cfg_path, cfg)
