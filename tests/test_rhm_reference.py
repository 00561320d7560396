"""RHM.from_reference: the rules of the authors' public generator, re-derived here from the described
algorithm with Python's random on the listed tuples; their dict layout; their data indices."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from layerwise.hierarchy import RHM
from layerwise.hierarchy.reference import reference_rules


def _described_algorithm(v, n_c, m, s, L, seed):
    """seed random, list the v**s tuples in product order, sample n_c*m then v*m per level (one stream)."""
    rng = random.Random(seed)
    tuples = list(itertools.product(range(v), repeat=s))
    rules = {0: torch.tensor(rng.sample(tuples, n_c * m)).reshape(n_c, m, -1)}
    for level in range(1, L):
        rules[level] = torch.tensor(rng.sample(tuples, v * m)).reshape(v, m, -1)
    return rules


def _described_data(index, rules, n_c, m, s, L):
    """The reference's index -> data map: class first, then each level's choices, first node most
    significant (written with Python ints)."""
    per_class = m ** ((s**L - 1) // (s - 1))
    label, rest = divmod(index, per_class)
    features, size, per_hl = [label], 1, per_class
    for level in range(L):
        per_hl //= m**size
        block, rest = divmod(rest, per_hl)
        digits = [(block // m ** (size - 1 - k)) % m for k in range(size)]
        features = [int(t) for a, r in zip(features, digits, strict=True) for t in rules[level][a, r]]
        size *= s
    return label, features


@pytest.mark.parametrize("params", [(8, 8, 2, 2, 3, 42), (6, 4, 3, 3, 2, 0), (32, 10, 8, 2, 4, 7),
                                    (4, 2, 4, 2, 2, 123), (5, 3, 2, 4, 2, 9)])
def test_rules_equal_the_described_algorithm(params):
    v, n_c, m, s, L, seed = params
    expected = _described_algorithm(v, n_c, m, s, L, seed)
    rhm = RHM.from_reference(v, n_c, m, s, L, seed=seed)
    assert len(rhm.rules) == L
    for level in range(L):
        assert torch.equal(rhm.rules[level], expected[level]), level


def test_global_random_state_untouched_and_default_seed():
    random.seed(5)
    before = random.random()
    random.seed(5)
    RHM.from_reference(8, 8, 2, 2, 2)
    assert random.random() == before
    default, explicit = reference_rules(8, 8, 2, 2, 2), reference_rules(8, 8, 2, 2, 2, seed=42)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit, strict=True))


def test_dict_layout_accepted_and_data_indices_match():
    v, n_c, m, s, L = 6, 3, 2, 2, 3
    rules = _described_algorithm(v, n_c, m, s, L, 11)
    rhm = RHM(v, n_c, m, s, L, rules=rules)
    ref = RHM.from_reference(v, n_c, m, s, L, seed=11)
    assert all(torch.equal(a, b) for a, b in zip(rhm.rules, ref.rules, strict=True))
    idx = [0, 1, 7, 100, rhm.P_max - 1]
    data = rhm.from_index(torch.tensor(idx))
    for row, i in enumerate(idx):
        label, tokens = _described_data(i, rules, n_c, m, s, L)
        assert int(data.labels[row]) == label and data.tokens[row].tolist() == tokens
    with pytest.raises(ValueError, match="levels 0..2"):
        RHM(v, n_c, m, s, L, rules={0: rules[0], 2: rules[2], 3: rules[1]})
    with pytest.raises(ValueError, match="distinct tuples"):
        reference_rules(2, 2, 3, 2, 1)
