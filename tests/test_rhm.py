"""RHM generator: enumeration against a naive recursive reference, grammar, seeds, indices, encodings."""

from __future__ import annotations

import itertools

import pytest
import torch

from layerwise.hierarchy import RHM, RHMDataset, load_dataset, one_hot, save_dataset

SMALL = [  # (v, n_c, m, s, L)
    (4, 4, 2, 2, 2),
    (8, 8, 2, 2, 3),
    (6, 3, 2, 2, 3),  # n_c != v
    (3, 2, 2, 3, 2),  # s = 3
    (5, 5, 3, 2, 1),  # L = 1
]


def naive_enumeration(rhm: RHM) -> set[tuple[int, ...]]:
    """All (label, tokens...) by plain recursion over symbols and rules: an independent reference."""

    def expand(symbol: int, level: int) -> list[tuple[int, ...]]:
        if level == rhm.L:
            return [(symbol,)]
        results = []
        for rule in rhm.rules[level][symbol].tolist():
            parts = [expand(child, level + 1) for child in rule]
            results += [sum(combo, ()) for combo in itertools.product(*parts)]
        return results

    return {(c, *x) for c in range(rhm.n_c) for x in expand(c, 0)}


@pytest.mark.parametrize("params", SMALL)
def test_enumeration_matches_naive_reference_and_counts_p_max(params):
    rhm = RHM(*params, seed=3)
    data = rhm.enumerate()
    rows = {(c, *x) for c, x in zip(data.labels.tolist(), data.tokens.tolist(), strict=True)}
    assert len(data) == rhm.P_max
    assert len(rows) == rhm.P_max  # all distinct
    assert rows == naive_enumeration(rhm)
    v, n_c, m, s, L = params
    assert rhm.P_max == n_c * m ** sum(s**k for k in range(L))


@pytest.mark.parametrize("params", SMALL + [(32, 32, 8, 2, 9)])
def test_no_tuple_has_two_parents(params):
    rhm = RHM(*params, seed=0)
    for table in rhm.rules:
        flat = table.reshape(-1, rhm.s)
        assert torch.unique(flat, dim=0).shape[0] == flat.shape[0]
        assert flat.min() >= 0 and flat.max() < rhm.v


def test_rules_by_rejection_for_large_tuple_space_are_distinct():
    rhm = RHM(v=64, n_c=64, m=16, s=4, L=2, seed=1)  # v**s = 2**24 > randperm limit
    for table in rhm.rules:
        flat = table.reshape(-1, 4)
        assert torch.unique(flat, dim=0).shape[0] == flat.shape[0]


def test_tree_is_consistent_with_rules():
    rhm = RHM(8, 8, 3, 2, 4, seed=0)
    batch = rhm.sample(200, seed=1)
    for level in range(rhm.L):
        parents = batch.tree[level]  # (N, s**l)
        children = batch.tree[level + 1].reshape(len(batch), -1, rhm.s)  # (N, s**l, s)
        expected = rhm.rules[level][parents, batch.choices[level]]
        assert torch.equal(children, expected)
    assert torch.equal(batch.tree[0][:, 0], batch.labels)


def test_same_seed_same_rules_and_data_and_different_seed_differs():
    a, b, c = RHM(16, 16, 4, 2, 3, seed=7), RHM(16, 16, 4, 2, 3, seed=7), RHM(16, 16, 4, 2, 3, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.rules, b.rules, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.rules, c.rules, strict=True))
    assert torch.equal(a.sample(100, seed=1).tokens, b.sample(100, seed=1).tokens)
    assert torch.equal(a.sample_distinct(100, seed=2).tokens, b.sample_distinct(100, seed=2).tokens)
    assert not torch.equal(a.sample(100, seed=1).tokens, a.sample(100, seed=2).tokens)


def test_iid_sampling_is_uniform_over_classes_and_rules():
    rhm = RHM(8, 4, 4, 2, 3, seed=0)
    n = 40_000
    batch = rhm.sample(n, seed=0)
    # Chi-square against uniform: 99.9% critical values (df=3: 16.27; df=3 per level).
    counts = torch.bincount(batch.labels, minlength=4).double()
    assert float(((counts - n / 4) ** 2 / (n / 4)).sum()) < 16.27
    for level, choices in enumerate(batch.choices):
        # Rules at every node of the level, pooled: n * s**level draws; df = m - 1 = 3.
        counts = torch.bincount(choices.flatten(), minlength=4).double()
        expected = choices.numel() / 4
        assert float(((counts - expected) ** 2 / expected).sum()) < 16.27, level


@pytest.mark.parametrize("params", [(8, 8, 2, 2, 3), (32, 32, 8, 2, 9)])
def test_distinct_sampling_has_no_repeats_and_split_is_disjoint(params):
    rhm = RHM(*params, seed=0)
    n = min(rhm.P_max, 3000)
    batch = rhm.sample_distinct(n, seed=4)
    keys = torch.cat([batch.labels[:, None], batch.tokens], 1)
    assert torch.unique(keys, dim=0).shape[0] == n
    train, test = rhm.train_test_split(n // 2, n - n // 2, seed=5)
    assert not set(rhm.index_of(train)) & set(rhm.index_of(test))


def test_distinct_sampling_of_everything_is_a_permutation():
    rhm = RHM(4, 4, 2, 2, 2, seed=0)
    batch = rhm.sample_distinct(rhm.P_max, seed=1)
    assert sorted(rhm.index_of(batch)) == list(range(rhm.P_max))


def test_index_roundtrip_small_and_huge():
    small = RHM(8, 8, 2, 2, 3, seed=0)
    idx = torch.tensor([0, 1, 17, small.P_max - 1])
    assert small.index_of(small.from_index(idx)) == idx.tolist()
    huge = RHM(32, 32, 8, 2, 9, seed=0)
    assert huge.P_max == 32 * 8**511  # exact Python int
    wanted = [0, 1, huge.P_max - 1, huge.P_max // 3, 12345678901234567890123456789]
    assert huge.index_of(huge.from_index(wanted)) == wanted
    # The index order follows the documented digit convention: class first, then the root's rule.
    first_of_class_1 = huge.from_index([huge.P_max // 32])
    assert first_of_class_1.labels.tolist() == [1]
    assert all(int(c.abs().sum()) == 0 for c in first_of_class_1.choices)
    root_rule_1 = huge.from_index([8**510])
    assert root_rule_1.choices[0].tolist() == [[1]]


def test_index_order_matches_lexicographic_choice_order():
    rhm = RHM(4, 2, 2, 2, 2, seed=0)
    data = rhm.enumerate()
    digits = torch.cat([data.labels[:, None], *data.choices], 1).tolist()
    assert digits == sorted(digits)


def test_resample_level_keeps_upper_levels_and_redraws_below():
    rhm = RHM(16, 16, 4, 2, 4, seed=0)
    batch = rhm.sample(500, seed=0)
    swapped = rhm.resample_level(batch, level=2, seed=1)
    for level in range(3):
        assert torch.equal(swapped.tree[level], batch.tree[level])
    assert not torch.equal(swapped.tree[3], batch.tree[3])
    assert (swapped.tokens != batch.tokens).any(dim=1).float().mean() > 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(v=0, n_c=2, m=1, s=2, L=2), "v must be"),
        (dict(v=4, n_c=2, m=1, s=1, L=2), "s must be"),
        (dict(v=4, n_c=2, m=1, s=2, L=0), "L must be"),
        (dict(v=4, n_c=2, m=5, s=2, L=2), "m \\* v"),
        (dict(v=2, n_c=8, m=1, s=2, L=1), "m \\* n_c"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RHM(**kwargs)


def test_bad_types_and_ranges():
    with pytest.raises(TypeError, match="m must be an integer"):
        RHM(v=4, n_c=4, m=2.0, s=2, L=2)
    rhm = RHM(4, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="indices must be in"):
        rhm.from_index([rhm.P_max])
    with pytest.raises(ValueError, match="n_train \\+ n_test"):
        rhm.train_test_split(rhm.P_max, 1)
    with pytest.raises(ValueError, match="exceeds max_count"):
        RHM(32, 32, 8, 2, 9).enumerate()
    with pytest.raises(ValueError, match="repeat a tuple"):
        RHM(2, 1, 2, 2, 1, rules=[torch.tensor([[[0, 1], [0, 1]]])])


def test_encodings_and_dataset():
    rhm = RHM(8, 8, 2, 2, 3, seed=0)
    data = rhm.sample_distinct(rhm.P_max, seed=0)
    x = one_hot(data.tokens, rhm.v)
    assert x.shape == (rhm.P_max, 8, 8)
    assert torch.equal(x.argmax(1), data.tokens) and torch.all(x.sum(1) == 1)
    w = one_hot(data.tokens, rhm.v, whiten=True)
    # Whitening: (x - 1/v)/sqrt(1 - 1/v), zero mean and unit variance per entry under uniform tokens.
    ref = (x - 1 / 8) / (1 - 1 / 8) ** 0.5
    assert torch.allclose(w, ref)
    ds = RHMDataset(data, v=8, encoding="whitened")
    xi, yi = ds[3]
    assert torch.allclose(xi, w[3]) and int(yi) == int(data.labels[3])
    assert len(RHMDataset(data, v=8, encoding="tokens")) == rhm.P_max
    with pytest.raises(ValueError, match="encoding must be one of"):
        RHMDataset(data, v=8, encoding="bits")


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_dataset_file_roundtrip(tmp_path, suffix):
    rhm = RHM(8, 4, 2, 2, 3, seed=2)
    data = rhm.sample(64, seed=3)
    path = save_dataset(tmp_path / f"data{suffix}", rhm, data)
    rhm2, data2 = load_dataset(path)
    assert all(torch.equal(a, b) for a, b in zip(rhm.rules, rhm2.rules, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(data.tree, data2.tree, strict=True))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_dataset_file_errors(tmp_path):
    rhm = RHM(8, 4, 2, 2, 3, seed=2)
    with pytest.raises(ValueError, match="path must end in"):
        save_dataset(tmp_path / "data.pkl", rhm, rhm.sample(4))
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing.pt")
    data = rhm.sample(4)
    path = save_dataset(tmp_path / "d.pt", rhm, data)
    raw = torch.load(path, weights_only=True)
    raw["tokens"][0, 0] = (raw["tokens"][0, 0] + 1) % 8
    torch.save(raw, path)
    with pytest.raises(ValueError, match="inconsistent"):
        load_dataset(path)


def test_first_occurrences_against_python_reference():
    from layerwise.hierarchy.rhm import _first_occurrences

    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 3, (500, 4), generator=gen)  # 81 possible rows: many repeats
    seen, expected = set(), []
    for i, row in enumerate(map(tuple, rows.tolist())):
        if row not in seen:
            seen.add(row)
            expected.append(i)
    weights = torch.randint(-(1 << 62), 1 << 62, (4,), generator=gen)
    assert _first_occurrences(rows, weights).tolist() == expected
    # A degenerate hash (all weights zero) collides everywhere and must fall back to exact comparison.
    assert _first_occurrences(rows, torch.zeros(4, dtype=torch.long)).tolist() == expected


def test_empty_batches():
    rhm = RHM(4, 4, 2, 2, 3, seed=0)
    for batch in (rhm.sample(0), rhm.sample_distinct(0), rhm.from_index([])):
        assert len(batch) == 0 and batch.tokens.shape == (0, rhm.d)
