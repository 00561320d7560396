"""Weight averaging ("model soup", Wortsman et al., ICML 2022): ``sum_t w_t theta_t / sum_t w_t``.

In task-vector form the average of the models is ``theta_0 + sum_t w_t tau_t / sum_t w_t`` for any reference
``theta_0``; without a base model the driver uses the first model as the reference.
"""

from __future__ import annotations

import torch

from ...errors import ParameterError
from ._common import WEIGHT
from .registry import register_merge_method


def _check_weights(glob, per_model) -> None:
    """The weights are divided by their sum: it must not be 0 (checked before any tensor is read)."""
    total = sum(mp["weight"] for mp in per_model)
    if total == 0:
        raise ParameterError(
            f"average: the models' weights sum to 0 ({[mp['weight'] for mp in per_model]}); "
            "the mean sum_t w_t theta_t / sum_t w_t is undefined"
        )


@register_merge_method(
    "average",
    params=[WEIGHT],
    reference="https://arxiv.org/abs/2203.05482",
    needs_base=False,
    description="weighted mean of the models' weights (base model optional)",
    validate=_check_weights,
)
def average(deltas: torch.Tensor, *, weight: torch.Tensor) -> torch.Tensor:
    """``deltas`` (T, n), ``weight`` (T,) -> weighted mean (n,). The weights must not sum to 0."""
    total = float(weight.sum())
    if total == 0:
        raise ParameterError("average: the model weights sum to 0")
    return (weight @ deltas) / total
