"""Model Stock (Jang, Yun, Han, ECCV 2024, "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522).

Per tensor (a layer), with the task vectors ``delta_t = w_t - w_0`` of ``N >= 2`` fine-tuned models and the
mean pairwise cosine ``cos(theta)`` between them (over the whole tensor; norms clamped below at 1e-6 as in
mergekit), the merge moves from the base towards the average by the ratio (Eq. 8 of the paper)

``t = N cos(theta) / (1 + (N - 1) cos(theta))``:  ``w_H = t * mean_t w_t + (1 - t) w_0``,

i.e. the merged task vector is ``t * mean_t delta_t``. The driver supplies the Gram matrix of the task
vectors over the whole tensor (``inputs=("gram",)``).
"""

from __future__ import annotations

import torch

from ...errors import ParameterError
from .registry import register_merge_method

__all__ = ["model_stock", "model_stock_ratio"]


def model_stock_ratio(gram: torch.Tensor) -> float:
    """``t = N cos / (1 + (N - 1) cos)`` from the Gram matrix (N, N) of the task vectors of one tensor."""
    g = gram.double()
    n = g.shape[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append(float((g[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)))
    c = sum(cos) / len(cos)
    return n * c / (1 + (n - 1) * c)


def _at_least_two(glob, per_model) -> None:
    if len(per_model) < 2:
        raise ParameterError(
            f"model_stock needs at least two fine-tuned models besides the base, got {len(per_model)}"
        )


@register_merge_method(
    "model_stock",
    params=[],
    inputs=("gram",),
    reference="https://arxiv.org/abs/2403.19522",
    description="Model Stock: average moved toward the base by the angle-based ratio of each tensor",
    validate=_at_least_two,
)
def model_stock(deltas: torch.Tensor, *, gram: torch.Tensor) -> torch.Tensor:
    """``deltas`` (N, n), ``gram`` (N + 1, N + 1) of [base, deltas] -> ``t * mean(deltas)`` (n,)."""
    return model_stock_ratio(gram[1:, 1:]) * deltas.mean(dim=0)
