"""Class-conditional tuple statistics: exact transfer matrices against enumeration, and the depth scaling."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.hierarchy import RHM
from layerwise.hierarchy.statistics import (
    ancestor_distributions,
    empirical_tuple_class_frequencies,
    relative_fluctuation,
    tuple_class_frequencies,
)


@pytest.mark.parametrize("params", [(8, 8, 2, 2, 3), (6, 4, 3, 3, 2), (4, 3, 2, 2, 4), (5, 5, 3, 2, 1)])
def test_exact_frequencies_equal_counts_over_the_enumeration(params):
    rhm = RHM(*params, seed=1)
    data = rhm.enumerate()
    v, n_c, m, s, L = params
    for patch in range(s ** (L - 1)):
        counted = empirical_tuple_class_frequencies(data, v, n_c, s, patch=patch)
        exact = tuple_class_frequencies(rhm, patch=patch)
        assert torch.allclose(counted, exact, atol=1e-12, rtol=0)
        assert torch.allclose(exact.sum(1), torch.ones(n_c, dtype=exact.dtype))


def test_relative_fluctuation_closed_form_for_depth_one():
    # L = 1: each class owns m of the tuples (f = 1/m on them), every tuple belongs to one class, so
    # f(mu|a)/fbar(mu) is n_c or 0 and sigma^2 = (1/n_c)(n_c - 1)^2 + (1 - 1/n_c) = n_c - 1.
    rhm = RHM(v=6, n_c=5, m=3, s=2, L=1, seed=0)
    assert math.isclose(relative_fluctuation(tuple_class_frequencies(rhm)), math.sqrt(5 - 1), rel_tol=1e-12)


def test_fluctuations_shrink_by_sqrt_m_per_level():
    # The correlation argument: each extra level of rules mixes ~m symbols, dividing the variance by m.
    v, m = 64, 8
    sigmas = []
    for L in (2, 3, 4, 5):
        values = [
            relative_fluctuation(ancestor_distributions(RHM(v, v, m, 2, L, seed=k))[-1]) for k in range(4)
        ]
        sigmas.append(sum(values) / len(values))
    for a, b in zip(sigmas, sigmas[1:], strict=False):
        assert a / b == pytest.approx(math.sqrt(m), rel=0.1)
    # And the level-one size follows from m distinct first children out of v: sigma^2 ~ v/m.
    assert sigmas[0] == pytest.approx(math.sqrt(v / m), rel=0.15)


def test_bad_patch_and_shape():
    rhm = RHM(8, 8, 2, 2, 3)
    with pytest.raises(ValueError, match="patch must be in"):
        ancestor_distributions(rhm, patch=4)
    with pytest.raises(ValueError, match="freq must be 2-D"):
        relative_fluctuation(torch.ones(3))
