"""Compatibility with the authors' public RHM generator (fracagnetta/theory-language-modelling,
``datasets/random_hierarchy_model.py``), so data sets made by that code can be compared with ours.

Their rules, re-implemented from the description of the algorithm (no code copied): Python's ``random`` is
seeded with ``seed``; the ``v**s`` possible s-tuples are listed in lexicographic order (first token most
significant, as ``itertools.product`` lists them); level 0 takes ``random.sample(tuples, n_c * m)``
reshaped to ``(n_c, m, s)``, then each deeper level, continuing the same random stream, takes
``random.sample(tuples, v * m)`` reshaped to ``(v, m, s)``. ``random.sample`` picks positions from the
length of the population only, so sampling positions in ``range(v**s)`` and decoding them in base ``v``
gives the same tuples without listing them. Their rules come as a dict ``{level: tensor}``.

Their data indices follow the same convention as :meth:`layerwise.hierarchy.RHM.from_index` (class first,
then the rule choices level by level, first node most significant), so ``RHM.from_reference(...)
.from_index(idx)`` gives their ``sample_data_from_rules(idx, ...)``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch

from .._validation import check_int
from ..errors import ParameterError, ParameterTypeError

__all__ = ["reference_rules", "rules_from_levels"]


def reference_rules(v: int, n_c: int, m: int, s: int, L: int, seed: int = 42) -> tuple[torch.Tensor, ...]:
    """The rule tables the reference ``sample_rules(v, n_c, m, s, L, seed)`` draws, bit for bit.

    Returns L long tensors; level 0 is ``(n_c, m, s)``, deeper levels ``(v, m, s)``. Uses a private
    ``random.Random(seed)`` (the same stream as seeding the global generator, which is left untouched).
    """
    v, n_c = check_int("v", v, low=1), check_int("n_c", n_c, low=1)
    m, s, L = check_int("m", m, low=1), check_int("s", s, low=2), check_int("L", L, low=1)
    seed = check_int("seed", seed)
    n_tuples = v**s
    rng = random.Random(seed)
    powers = v ** torch.arange(s - 1, -1, -1)  # (s,) base-v place values, first token most significant
    tables = []
    for level in range(L):
        n_parents = n_c if level == 0 else v
        k = n_parents * m
        if k > n_tuples:
            raise ParameterError(f"level {level} needs {k} distinct tuples but v**s = {n_tuples}")
        ids = torch.tensor(rng.sample(range(n_tuples), k), dtype=torch.long)  # (k,)
        tuples = (ids[:, None] // powers) % v  # (k, s)
        tables.append(tuples.reshape(n_parents, m, s))
    return tuple(tables)


def rules_from_levels(rules: Mapping[int, object], L: int) -> list[torch.Tensor]:
    """The reference layout ``{0: (n_c, m, s), 1: (v, m, s), ...}`` as a list ordered by level."""
    if not isinstance(rules, Mapping):
        raise ParameterTypeError(f"rules must be a mapping level -> table, got {type(rules).__name__}")
    if len(rules) != L or set(rules) != set(range(L)):
        raise ParameterError(f"rules dict must have the levels 0..{L - 1} as keys, got {list(rules)}")
    return [torch.as_tensor(rules[k]) for k in range(L)]
