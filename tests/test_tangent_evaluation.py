"""Accuracy and the validation searches: each picks the best grid point of a synthetic evaluation whose
optimum is known in closed form, and respects its constraint."""

from __future__ import annotations

import doctest

import pytest
import torch

from layerwise.errors import ParameterError
from layerwise.tangent import evaluation as ev


def test_docstring_examples():
    result = doctest.testmod(ev)
    assert result.failed == 0 and result.attempted > 0


def test_accuracy_and_normalized_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert ev.accuracy(logits, labels) == 0.75
    assert ev.accuracy(torch.tensor([1, 1, 1, 0]), labels) == 0.5
    assert ev.normalized_accuracy(0.6, 0.8) == pytest.approx(0.75)
    with pytest.raises(ParameterError, match="labels"):
        ev.accuracy(logits, labels[:3])
    with pytest.raises(ParameterError, match="reference"):
        ev.normalized_accuracy(0.5, 0.0)


def test_grids_are_the_papers():
    assert ev.ADDITION_GRID == tuple(round(x, 4) for x in torch.linspace(0, 1, 21).tolist())
    assert ev.LINES_ALPHA_GRID[0] == 1.0 and ev.LINES_ALPHA_GRID[-1] == 0.0 and len(ev.LINES_ALPHA_GRID) == 11
    assert ev.LINES_BETA_GRIDS["ties"][-1] == 1.5 and ev.LINES_BETA_GRIDS["task_arithmetic"][-1] == 1.0


def test_addition_picks_the_maximum_of_mean_normalized_accuracy():
    # task A peaks at 0.3, task B at 0.8; B's fine-tuned accuracy is half of A's, so B weighs double.
    def evaluate(a):
        return {"A": 0.8 - (a - 0.3) ** 2, "B": 0.4 - 0.5 * (a - 0.8) ** 2}

    r = ev.search_addition(evaluate, {"A": 0.8, "B": 0.4})
    # mean normalized = ((0.8 - (a-.3)^2)/.8 + (0.4 - .5 (a-.8)^2)/.4) / 2: maximum at a = 0.55
    brute = max(
        ev.ADDITION_GRID, key=lambda a: (0.8 - (a - 0.3) ** 2) / 0.8 + (0.4 - 0.5 * (a - 0.8) ** 2) / 0.4
    )
    assert r.best == brute == 0.55
    assert len(r.scores) == 21 and r.best_score == max(r.scores)
    assert r.best_evaluation == evaluate(0.55)
    # the reference accuracies matter: with equal references the optimum moves
    assert ev.search_addition(evaluate, {"A": 1.0, "B": 1.0}).best != 0.55
    with pytest.raises(ParameterError, match="every task"):
        ev.search_addition(lambda a: {"A": 1.0}, {"A": 1.0, "B": 1.0})
    with pytest.raises(ParameterError, match="grid"):
        ev.search_addition(evaluate, {"A": 1.0}, grid=[])
    with pytest.raises(ParameterError, match="grid"):
        ev.search_addition(evaluate, {"A": 1.0}, grid=[0.1, float("inf")])


def test_negation_minimizes_target_under_the_control_constraint():
    # target accuracy falls with alpha; control stays >= 95% of 0.8 = 0.76 only up to alpha = 0.5
    def evaluate(a):
        return 0.9 - 0.8 * a, 0.8 - 0.08 * a

    r = ev.search_negation(evaluate, control_pretrained=0.8)
    assert r.best == 0.5 and r.feasible
    assert r.best_evaluation[0] == pytest.approx(0.5)
    assert ev.search_negation(evaluate, control_pretrained=0.8, keep=0.9).best == 1.0
    infeasible = ev.search_negation(lambda a: (0.5, 0.1), control_pretrained=0.8, grid=[0.2, 0.4])
    assert not infeasible.feasible
    with pytest.raises(ParameterError, match="keep"):
        ev.search_negation(evaluate, 0.8, keep=1.5)


def test_lines_single_task_weighs_target_twice():
    # larger alpha -> more target, less control
    def evaluate(a):
        return 0.6 + 0.4 * a**0.5, 0.7 - 0.3 * a

    r = ev.search_lines_single(evaluate, target_finetuned=1.0, control_zeroshot=0.7)
    brute = max(ev.LINES_ALPHA_GRID, key=lambda a: 2 * (0.6 + 0.4 * a**0.5) + (0.7 - 0.3 * a) / 0.7)
    assert r.best == brute
    r1 = ev.search_lines_single(evaluate, 1.0, 0.7, weight=0.5)
    brute1 = max(ev.LINES_ALPHA_GRID, key=lambda a: 0.5 * (0.6 + 0.4 * a**0.5) + (0.7 - 0.3 * a) / 0.7)
    assert r1.best == brute1 != brute
    # ties go to the first grid point (1.0 comes first)
    assert ev.search_lines_single(lambda a: (0.5, 0.5), 1.0, 1.0).best == 1.0


def test_lines_multi_uses_the_method_grid():
    def evaluate(b):
        return {"A": 1.0 - (b - 1.3) ** 2, "B": 1.0 - (b - 1.3) ** 2}

    assert ev.search_lines_multi(evaluate, {"A": 1.0, "B": 1.0}, "ties").best == 1.3
    assert ev.search_lines_multi(evaluate, {"A": 1.0, "B": 1.0}, "task_arithmetic").best == 1.0
    assert ev.search_lines_multi(evaluate, {"A": 1.0, "B": 1.0}, grid=[0.5, 2.0]).best == 2.0
    with pytest.raises(ParameterError, match="method"):
        ev.search_lines_multi(evaluate, {"A": 1.0}, "dare")
