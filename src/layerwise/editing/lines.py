"""LiNeS: layer-increasing network scaling of task vectors (Wang et al., ICLR 2025,
https://arxiv.org/abs/2410.17146).

The update of residual block ``i`` (0-based, among ``L`` blocks) is scaled by
``lambda(i) = alpha + beta * i / (L - 1)`` (Eq. 1); parameters outside the blocks (embeddings, first/last
norms, heads) get ``alpha``. Shallow layers, which hold general features, keep little of the update; deep
layers keep more.

- single task: ``beta = 1 - alpha``, so the last block keeps its full update;
- multi-task: applied to a merged vector ``tau_MTL`` with ``alpha = (||sum_t tau_t||_1 / ||tau_MTL||_1) / T``
  (1/T for task arithmetic) and ``beta`` tuned on validation data.

Block discovery
---------------
A key belongs to a block when a path segment named ``resblocks`` (open_clip/OpenAI CLIP), ``layers``,
``layer``, ``h``, ``block`` (Hugging Face), ``blocks`` (timm) is followed by an integer segment; the first
such segment from the left decides (``visual.transformer.resblocks.3.mlp.0.weight`` is in block 3, and a
head's ``mlp.0.weight`` is in no block: ``mlp`` is not a block container). Integer segments before the
container take part in the ordering (timm ConvNeXt ``stages.1.blocks.2`` comes after every block of stage
0). Models with a different layout pass ``pattern``, a regular expression whose first group captures the
block index, e.g. ``r"^features\\.(\\d+)\\."`` or ``r"^(\\d+)\\."`` for a plain ``nn.Sequential``.

Several towers: the block list is found per *tower*, the key prefix before the index with integers
replaced by ``*`` (CLIP: ``visual.transformer.resblocks.`` and ``transformer.resblocks.``; an
encoder-decoder: ``encoder.layer.`` and ``decoder.layer.``). Depth is assigned per tower: each tower's
blocks run from ``alpha`` (its first block) to ``alpha + beta`` (its last), because each tower is a network
of its own whose input side holds the general features. A tower with one block gets ``alpha + beta``.

Example
-------
>>> keys = ["embed.weight", "layers.0.w", "layers.0.mlp.0.weight", "layers.1.w", "layers.2.w", "head.w"]
>>> scales = lines_scales(keys, alpha=0.2, beta=0.8)
>>> [round(scales[k], 2) for k in keys]
[0.2, 0.2, 0.2, 0.6, 1.0, 0.2]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .._validation import check_float
from ..errors import ParameterError
from .task_vector import TaskVector

__all__ = [
    "BLOCK_CONTAINERS",
    "BlockLayout",
    "discover_blocks",
    "lines_scales",
    "lines_table",
    "format_lines_table",
    "apply_lines",
    "multitask_alpha",
    "single_task_beta",
]

BLOCK_CONTAINERS = ("resblocks", "layers", "layer", "h", "blocks", "block")
_DEFAULT = re.compile(r"(?:^|\.)(?:" + "|".join(BLOCK_CONTAINERS) + r")\.(\d+)(?=\.|$)")
_INT_SEGMENT = re.compile(r"(?<![^.])\d+(?=\.)")


@dataclass(frozen=True)
class BlockLayout:
    """Which block each key is in.

    Attributes
    ----------
    depth : dict key -> (tower, depth index) for keys inside a block; keys outside blocks are absent.
    towers : dict tower -> number of blocks ``L`` of that tower.
    keys : all keys, in the order given.
    """

    depth: Mapping[str, tuple[str, int]]
    towers: Mapping[str, int]
    keys: tuple[str, ...]


def discover_blocks(keys: Iterable[str], pattern: str | None = None) -> BlockLayout:
    """Find residual blocks and their depth from parameter names (see the module docstring).

    Raises ``ValueError`` when no key is inside a block (LiNeS would reduce to a uniform scaling).
    """
    keys = tuple(keys)
    regex = _DEFAULT if pattern is None else _compile(pattern)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key in keys:
        m = regex.search(key)
        if m is None:
            continue
        prefix = key[: m.start(1)]
        order = tuple(int(s) for s in _INT_SEGMENT.findall(prefix)) + (int(m.group(1)),)
        found[key] = (_INT_SEGMENT.sub("*", prefix), order)
    if not found:
        how = (
            "the default containers " + ", ".join(BLOCK_CONTAINERS)
            if pattern is None
            else f"pattern {pattern!r}"
        )
        raise ParameterError(
            f"no residual blocks found with {how} in keys such as {list(keys[:4])}; "
            "pass pattern=<regex whose first group captures the block index>"
        )
    per_tower: dict[str, list[tuple[int, ...]]] = {}
    for tower, order in found.values():
        per_tower.setdefault(tower, []).append(order)
    ranks = {t: {o: i for i, o in enumerate(sorted(set(orders)))} for t, orders in per_tower.items()}
    depth = {k: (tower, ranks[tower][order]) for k, (tower, order) in found.items()}
    return BlockLayout(depth=depth, towers={t: len(r) for t, r in ranks.items()}, keys=keys)


def _compile(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ParameterError(f"pattern must be a regular expression, got {pattern!r} ({err})") from None
    if regex.groups < 1:
        raise ParameterError(f"pattern must have a group capturing the block index, got {pattern!r}")
    return regex


def _scale(alpha: float, beta: float, i: int, num_blocks: int) -> float:
    return alpha + beta * (i / (num_blocks - 1) if num_blocks > 1 else 1.0)


def lines_scales(
    keys: Iterable[str] | BlockLayout, alpha: float, beta: float, *, pattern: str | None = None
) -> dict[str, float]:
    """``{key: lambda}``: ``alpha + beta * i / (L - 1)`` in block ``i`` of ``L``; ``alpha`` outside blocks."""
    alpha = check_float("alpha", alpha)
    beta = check_float("beta", beta)
    layout = keys if isinstance(keys, BlockLayout) else discover_blocks(keys, pattern)
    out = {}
    for k in layout.keys:
        if k in layout.depth:
            tower, i = layout.depth[k]
            out[k] = _scale(alpha, beta, i, layout.towers[tower])
        else:
            out[k] = alpha
    return out


def lines_table(layout: BlockLayout, alpha: float, beta: float) -> list[dict]:
    """One row per (tower, block): ``tower, block, num_blocks, scale, tensors``; plus the outside row."""
    rows: dict[tuple[str, int], int] = {}
    for tower, i in layout.depth.values():
        rows[(tower, i)] = rows.get((tower, i), 0) + 1
    table = [
        {
            "tower": "(outside blocks)",
            "block": None,
            "num_blocks": None,
            "scale": alpha,
            "tensors": len(layout.keys) - len(layout.depth),
        }
    ]
    for (tower, i), count in sorted(rows.items()):
        n = layout.towers[tower]
        table.append(
            {
                "tower": tower,
                "block": i,
                "num_blocks": n,
                "scale": _scale(alpha, beta, i, n),
                "tensors": count,
            }
        )
    return table


def format_lines_table(table: Sequence[Mapping]) -> str:
    """The table of :func:`lines_table` as aligned text."""
    width = max(len(str(r["tower"])) for r in table)
    lines = [f"{'tower':<{width}}  {'block':>5}  {'scale':>8}  {'tensors':>7}"]
    for r in table:
        block = "-" if r["block"] is None else f"{r['block']}/{r['num_blocks'] - 1}"
        lines.append(f"{r['tower']:<{width}}  {block:>5}  {r['scale']:>8.4f}  {r['tensors']:>7}")
    return "\n".join(lines)


def single_task_beta(alpha: float) -> float:
    """``beta = 1 - alpha``: the last block keeps its full update (single-task LiNeS)."""
    return 1.0 - check_float("alpha", alpha)


def apply_lines(
    task_vector: TaskVector | Mapping[str, torch.Tensor],
    alpha: float,
    beta: float | None = None,
    *,
    pattern: str | None = None,
) -> TaskVector:
    """Scale a task vector (or a merged one) block by block; ``beta=None`` means single task, ``1 - alpha``.

    Returns a lazy :class:`TaskVector`; a mapping of tensors is wrapped with ``TaskVector.from_tensors``.
    """
    tv = task_vector if isinstance(task_vector, TaskVector) else TaskVector.from_tensors(task_vector)
    beta = single_task_beta(alpha) if beta is None else beta
    scales = lines_scales(tv.keys(), alpha, beta, pattern=pattern)
    return tv.map(lambda k, t: t * scales[k])


def multitask_alpha(task_vectors: Sequence[TaskVector], merged: TaskVector) -> float:
    """``alpha = (||sum_t tau_t||_1 / ||tau_merged||_1) / T`` (LiNeS, multi-task)."""
    if not task_vectors:
        raise ValueError("task_vectors must not be empty")
    merged_l1 = merged.norm(1)
    if merged_l1 == 0:
        raise ValueError(
            "the merged task vector is zero; alpha = ||sum tau||_1 / ||tau_merged||_1 is undefined"
        )
    return sum(task_vectors).norm(1) / merged_l1 / len(task_vectors)
