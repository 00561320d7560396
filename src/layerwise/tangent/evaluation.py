"""Accuracy, normalized accuracy, and the validation searches of the task-arithmetic and LiNeS protocols.

Every search takes an ``evaluate(coefficient)`` callable (which builds the edited model and measures it on
*validation* data) and a grid, and returns a :class:`SearchResult` with the chosen coefficient and the
score of every grid point. Ties go to the first grid point in the order given.

- Addition (Ilharco et al.; Ortiz-Jimenez et al.): ``alpha`` in ``linspace(0, 1, 21)`` maximizing the
  average normalized accuracy ``acc_t(alpha) / acc_t(fine-tuned)``.
- Negation: the ``alpha`` minimizing the target accuracy while the control task keeps at least 95% of its
  pre-trained accuracy.
- LiNeS single task (Wang et al., ICLR 2025): ``alpha`` in {1.0, 0.9, ..., 0.0} (``beta = 1 - alpha``)
  maximizing ``2 * target / target_finetuned + control / control_zeroshot``.
- LiNeS multi-task: ``beta`` from a per-method grid maximizing the average normalized accuracy.

Example
-------
>>> r = search_addition(lambda a: {"A": 0.5 + a / 4, "B": 0.9 - (a - 0.42) ** 2}, {"A": 1.0, "B": 1.0})
>>> r.best
0.55
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ParameterError, ParameterTypeError

__all__ = [
    "ADDITION_GRID",
    "NEGATION_GRID",
    "LINES_ALPHA_GRID",
    "LINES_BETA_GRIDS",
    "SearchResult",
    "accuracy",
    "normalized_accuracy",
    "grid_search",
    "search_addition",
    "search_negation",
    "search_lines_single",
    "search_lines_multi",
]

ADDITION_GRID: tuple[float, ...] = tuple(round(k / 20, 4) for k in range(21))
NEGATION_GRID: tuple[float, ...] = ADDITION_GRID
LINES_ALPHA_GRID: tuple[float, ...] = tuple(round(1.0 - k / 10, 4) for k in range(11))
LINES_BETA_GRIDS: dict[str, tuple[float, ...]] = {
    "task_arithmetic": tuple(round(k / 10, 4) for k in range(1, 11)),
    "consensus": tuple(round(k / 10, 4) for k in range(1, 11)),
    "ties": tuple(round(k / 10, 4) for k in range(1, 16)),
}


@dataclass(frozen=True)
class SearchResult:
    """The chosen grid point and every point's score (and the raw evaluation behind it)."""

    best: float
    best_score: float
    grid: tuple[float, ...]
    scores: tuple[float, ...]
    evaluations: tuple[Any, ...] = field(repr=False)
    feasible: bool = True

    @property
    def best_evaluation(self) -> Any:
        return self.evaluations[self.grid.index(self.best)]


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions: ``outputs`` logits (N, C) or labels (N,); ``labels`` (N,)."""
    if not isinstance(outputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ParameterTypeError("outputs and labels must be tensors")
    preds = outputs.argmax(-1) if outputs.ndim == 2 else outputs
    if preds.ndim != 1 or labels.ndim != 1 or preds.shape[0] != labels.shape[0] or labels.shape[0] == 0:
        raise ParameterError(
            f"outputs must be (N, C) or (N,) and labels (N,) with N > 0, got {tuple(outputs.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return float((preds == labels).double().mean())


def normalized_accuracy(acc: float, reference: float) -> float:
    """``acc / reference`` (reference: the fine-tuned accuracy, or the zero-shot one for control tasks)."""
    if not (isinstance(reference, (int, float)) and reference > 0):
        raise ParameterError(f"reference accuracy must be positive, got {reference!r}")
    return float(acc) / float(reference)


def _check_grid(grid: Sequence[float], name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(g) for g in grid)
    except (TypeError, ValueError):
        raise ParameterTypeError(f"{name} must be a sequence of numbers, got {grid!r}") from None
    if not values:
        raise ParameterError(f"{name} must not be empty")
    if not all(math.isfinite(v) for v in values):
        raise ParameterError(f"{name} must hold finite numbers, got {values}")
    if len(set(values)) != len(values):
        raise ParameterError(f"{name} must not repeat values, got {values}")
    return values


def grid_search(
    evaluate: Callable[[float], Any],
    grid: Sequence[float],
    score: Callable[[Any], float],
    *,
    name: str = "grid",
    feasible: Callable[[Any], bool] | None = None,
) -> SearchResult:
    """Evaluate every grid point; return the feasible one with the highest ``score`` (first on ties).

    When no point is feasible, the highest-scoring point is returned with ``feasible=False``.
    """
    values = _check_grid(grid, name)
    evals = tuple(evaluate(v) for v in values)
    scores = tuple(float(score(e)) for e in evals)
    ok = [feasible(e) if feasible is not None else True for e in evals]
    candidates = [i for i in range(len(values)) if ok[i]] or list(range(len(values)))
    best = max(candidates, key=lambda i: (scores[i], -i))
    return SearchResult(values[best], scores[best], values, scores, evals, feasible=any(ok))


def _mean_normalized(accs: Mapping[str, float], reference: Mapping[str, float]) -> float:
    missing = sorted(set(reference) - set(accs))
    if missing:
        raise ParameterError(f"evaluate() must return an accuracy for every task of the reference: {missing}")
    return sum(normalized_accuracy(accs[t], reference[t]) for t in reference) / len(reference)


def search_addition(
    evaluate: Callable[[float], Mapping[str, float]],
    finetuned: Mapping[str, float],
    grid: Sequence[float] = ADDITION_GRID,
) -> SearchResult:
    """``alpha`` maximizing the mean of ``acc_t(alpha) / finetuned[t]`` (evaluate -> {task: acc})."""
    if not finetuned:
        raise ParameterError("finetuned must give the fine-tuned accuracy of at least one task")
    return grid_search(evaluate, grid, lambda accs: _mean_normalized(accs, finetuned), name="grid")


def search_negation(
    evaluate: Callable[[float], tuple[float, float]],
    control_pretrained: float,
    grid: Sequence[float] = NEGATION_GRID,
    *,
    keep: float = 0.95,
) -> SearchResult:
    """``alpha`` minimizing the target accuracy with ``control >= keep * control_pretrained``.

    ``evaluate(alpha) -> (target_accuracy, control_accuracy)`` of ``theta0 - alpha tau``. The score is the
    negated target accuracy. With no feasible point the result has ``feasible=False``.
    """
    if not 0 < keep <= 1:
        raise ParameterError(f"keep must be in (0, 1], got {keep!r}")
    floor = keep * float(control_pretrained)
    return grid_search(
        evaluate,
        grid,
        lambda tc: -float(tc[0]),
        name="grid",
        feasible=lambda tc: float(tc[1]) >= floor - 1e-12,
    )


def search_lines_single(
    evaluate: Callable[[float], tuple[float, float]],
    target_finetuned: float,
    control_zeroshot: float,
    grid: Sequence[float] = LINES_ALPHA_GRID,
    *,
    weight: float = 2.0,
) -> SearchResult:
    """LiNeS single task: ``alpha`` maximizing ``weight * target/target_ft + control/control_zeroshot``.

    ``evaluate(alpha) -> (target_accuracy, control_accuracy)`` of the model edited with LiNeS
    (``beta = 1 - alpha``); control accuracy is the average over the control tasks.
    """
    if not weight >= 0:
        raise ParameterError(f"weight must be non-negative, got {weight!r}")
    return grid_search(
        evaluate,
        grid,
        lambda tc: (
            weight * normalized_accuracy(tc[0], target_finetuned)
            + normalized_accuracy(tc[1], control_zeroshot)
        ),
        name="grid",
    )


def search_lines_multi(
    evaluate: Callable[[float], Mapping[str, float]],
    finetuned: Mapping[str, float],
    method: str | None = None,
    grid: Sequence[float] | None = None,
) -> SearchResult:
    """LiNeS multi-task: ``beta`` maximizing the mean normalized accuracy, from ``LINES_BETA_GRIDS[method]``
    (or an explicit ``grid``)."""
    if grid is None:
        if method not in LINES_BETA_GRIDS:
            raise ParameterError(
                f"method must be one of {sorted(LINES_BETA_GRIDS)} when no grid is given, got {method!r}"
            )
        grid = LINES_BETA_GRIDS[method]
    return search_addition(evaluate, finetuned, grid)
