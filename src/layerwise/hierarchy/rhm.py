"""The Random Hierarchy Model (RHM): random unambiguous grammars and the data they generate.

Cagnetta, Petrini, Tomasini, Favero, Wyart, "How deep neural networks learn compositional data: the Random
Hierarchy Model", Phys. Rev. X 14, 031001 (2024).

Conventions
-----------
* Level 0 is the class (the root, one of ``n_c``); level ``l`` holds ``s**l`` symbols in ``[0, v)``; level
  ``L`` is the input, ``d = s**L`` tokens.
* ``rules[l]`` is a ``(n_parents, m, s)`` long tensor: ``rules[l][a, r, i]`` is the i-th child of rule ``r``
  of the level-``l`` symbol ``a`` (``n_parents = n_c`` for ``l = 0``, ``v`` otherwise). Within a level the
  ``n_parents * m`` tuples are distinct (drawn without replacement), so no tuple has two parents.
* A datum is fixed by its class and one rule choice in ``[0, m)`` per internal node. Internal nodes are
  numbered breadth first (root, then level 1 left to right, ...); the enumeration index of a datum is
  ``label * m**n_internal + sum_k choice_k * m**(n_internal - 1 - k)``, so ``P_max = n_c * m**n_internal``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .._resources import check_memory
from .._validation import check_int, make_generator
from ..errors import ParameterError, ParameterTypeError, ResourceError

__all__ = ["RHM", "RHMSample", "RHMDataset", "sample_rules", "one_hot", "ENCODINGS"]

ENCODINGS = ("tokens", "onehot", "whitened")

# Above this many tuples we draw tuple ids by rejection instead of a full random permutation.
_RANDPERM_LIMIT = 1 << 22
# Inputs of 2**50 tokens (8 PB per datum) or more are refused when the model is built.
_LOG2_MAX_TOKENS = 50
# Indices below 2**62 are handled with int64 arithmetic; above, with exact Python-int arithmetic.
_INT64_SAFE = 1 << 62


@dataclass(frozen=True)
class RHMSample:
    """A batch of RHM data with the latent tree that generated it.

    Attributes
    ----------
    labels : (N,) long -- the class (level-0 symbol) of each datum.
    tree : tuple of L+1 long tensors; ``tree[l]`` is ``(N, s**l)``, the symbols at level ``l``.
        ``tree[0] == labels[:, None]`` and ``tree[L]`` is the input.
    choices : tuple of L long tensors; ``choices[l]`` is ``(N, s**l)``, the rule in ``[0, m)`` used at each
        level-``l`` node.
    """

    labels: torch.Tensor
    tree: tuple[torch.Tensor, ...]
    choices: tuple[torch.Tensor, ...]

    @property
    def tokens(self) -> torch.Tensor:
        """(N, d) long -- the input tokens (the leaves)."""
        return self.tree[-1]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, idx: slice | torch.Tensor | Sequence[int]) -> RHMSample:
        """Select data (a slice, an index tensor or a boolean mask) keeping the tree aligned."""
        return RHMSample(
            labels=self.labels[idx],
            tree=tuple(t[idx] for t in self.tree),
            choices=tuple(c[idx] for c in self.choices),
        )

    def to(self, device: str | torch.device) -> RHMSample:
        """The same data on ``device`` (labels, tree and choices moved)."""
        return RHMSample(
            labels=self.labels.to(device),
            tree=tuple(t.to(device) for t in self.tree),
            choices=tuple(c.to(device) for c in self.choices),
        )


def _decode_base(values: torch.Tensor, base: int, n_digits: int) -> torch.Tensor:
    """(N,) int64 -> (N, n_digits) digits in ``base``, most significant first."""
    digits = torch.empty(values.shape[0], n_digits, dtype=torch.long)
    rest = values.clone()
    for k in range(n_digits - 1, -1, -1):
        digits[:, k] = rest % base
        rest = rest // base
    return digits


def _first_occurrences(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sorted indices of the first occurrence of each distinct row of ``rows`` (N, K) long."""
    hashes = rows @ weights  # (N,), wraps around on overflow: fine for a hash
    _, inverse, counts = torch.unique(hashes, return_inverse=True, return_counts=True)
    if int(counts.max()) > 1:
        # Some hashes repeat: decide exactly on the full rows (rare unless rows really repeat).
        _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(rows.shape[0]), reduce="amin")
    return first.sort().values


def sample_rules(
    v: int, n_c: int, m: int, s: int, L: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """Draw the L rule tables of an RHM; level ``l`` is ``(n_c if l == 0 else v, m, s)``.

    Each level draws its ``n_parents * m`` tuples uniformly without replacement from the ``v**s`` possible
    tuples, in random order, so parents get disjoint random sets of ``m`` tuples.
    """
    n_tuples = v**s
    rules = []
    for level in range(L):
        n_parents = n_c if level == 0 else v
        k = n_parents * m
        if n_tuples <= _RANDPERM_LIMIT:
            ids = torch.randperm(n_tuples, generator=generator)[:k]
        else:
            # Rejection: draw ids, keep first occurrences, top up (k <= n_tuples is checked upstream).
            ids = torch.empty(0, dtype=torch.long)
            while ids.numel() < k:
                merged = torch.cat([ids, torch.randint(0, n_tuples, (2 * k,), generator=generator)])
                ids = merged[_first_occurrences(merged[:, None], torch.ones(1, dtype=torch.long))][:k]
        rules.append(_decode_base(ids, v, s).reshape(n_parents, m, s))  # (n_parents, m, s)
    return tuple(rules)


def one_hot(
    tokens: torch.Tensor, v: int, whiten: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Channels-first one-hot encoding: (N, d) long -> (N, v, d).

    With ``whiten=True`` returns ``(x - 1/v) / sqrt(1 - 1/v)``: zero mean and unit variance per entry
    under uniform tokens.
    """
    if tokens.dtype != torch.long:
        raise ParameterTypeError(f"tokens must be a long tensor, got {tokens.dtype}")
    x = torch.nn.functional.one_hot(tokens, v).to(dtype).transpose(1, 2)  # (N, v, d)
    if whiten:
        x = (x - 1.0 / v) / (1.0 - 1.0 / v) ** 0.5
    return x


class RHM:
    """A Random Hierarchy Model: its parameters and one random draw of its rules.

    Parameters
    ----------
    v : vocabulary size of every level below the root (>= 1).
    n_c : number of classes (>= 1).
    m : number of synonymous rules per symbol (>= 1).
    s : tuple (patch) size, >= 2.
    L : depth, >= 1; inputs have ``d = s**L`` tokens.
    seed : seed of the rules (an int or a ``torch.Generator``).
    rules : optional explicit rule tables (as returned by :func:`sample_rules`, or the reference code's dict
        ``{level: table}``); then ``seed`` is unused.

    Notes
    -----
    Requires ``m * n_c <= v**s`` and, when ``L >= 2``, ``m * v <= v**s`` (rules drawn without replacement).

    Example
    -------
    >>> rhm = RHM(v=8, n_c=8, m=2, s=2, L=3, seed=0)
    >>> rhm.d, rhm.P_max
    (8, 1024)
    >>> batch = rhm.sample(16, seed=1)
    >>> batch.tokens.shape, batch.tree[1].shape
    (torch.Size([16, 8]), torch.Size([16, 2]))
    """

    def __init__(
        self,
        v: int,
        n_c: int,
        m: int,
        s: int,
        L: int,
        seed: int | torch.Generator | None = 0,
        rules: Sequence[torch.Tensor] | Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        self.v = check_int("v", v, low=1)
        self.n_c = check_int("n_c", n_c, low=1)
        self.m = check_int("m", m, low=1)
        self.s = check_int("s", s, low=2)
        self.L = check_int("L", L, low=1)
        log2_d = self.L * math.log2(self.s)
        if log2_d >= _LOG2_MAX_TOKENS:  # not even one datum could be held (nor its shape represented)
            raise ResourceError(
                f"every datum of {self!r} would have s**L = {self.s}**{self.L} (about 2^{log2_d:.0f}) "
                f"tokens, far beyond any memory; s**L must be < 2^{_LOG2_MAX_TOKENS}: reduce L"
            )
        if self.s * math.log2(self.v) >= 64:  # v**s itself would be a huge integer: refuse before computing
            raise ParameterError(f"v**s must be < 2**63, got v={self.v}, s={self.s}")
        n_tuples = self.v**self.s
        if self.m * self.n_c > n_tuples:
            raise ParameterError(
                f"m * n_c must be <= v**s = {n_tuples} (rules are drawn without replacement), "
                f"got m={self.m}, n_c={self.n_c}"
            )
        if self.L >= 2 and self.m * self.v > n_tuples:
            raise ParameterError(
                f"m * v must be <= v**s = {n_tuples} (rules are drawn without replacement), "
                f"got m={self.m}, v={self.v}"
            )
        if n_tuples >= 1 << 63:
            raise ParameterError(f"v**s must be < 2**63, got v={self.v}, s={self.s}")
        if rules is None:
            # Rule tables of every level (int64) plus the temporaries of drawing them without replacement.
            k_max = self.m * max(self.n_c, self.v if self.L >= 2 else 0)
            table_bytes = 8 * self.s * self.m * (self.n_c + (self.L - 1) * self.v)
            draw_bytes = 8 * n_tuples if n_tuples <= _RANDPERM_LIMIT else 96 * k_max
            check_memory(table_bytes + draw_bytes, f"the rule tables of {self!r}")
            self.rules = sample_rules(self.v, self.n_c, self.m, self.s, self.L, make_generator(seed))
        else:
            self.rules = self._check_rules(rules)

    @classmethod
    def from_reference(cls, v: int, n_c: int, m: int, s: int, L: int, seed: int = 42) -> RHM:
        """The RHM whose rules are, bit for bit, those of the authors' public generator
        (fracagnetta/theory-language-modelling, ``sample_rules(v, n_c, m, s, L, seed)``); see
        :mod:`layerwise.hierarchy.reference`. Their data index ``i`` is our :meth:`from_index` ``(i)``."""
        from .reference import reference_rules

        return cls(v, n_c, m, s, L, rules=reference_rules(v, n_c, m, s, L, seed))

    def _check_rules(self, rules: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if isinstance(rules, Mapping):  # the reference code's {level: (n_parents, m, s)} layout
            from .reference import rules_from_levels

            rules = rules_from_levels(rules, self.L)
        if len(rules) != self.L:
            raise ParameterError(f"rules must hold L={self.L} tables, got {len(rules)}")
        out = []
        for level, table in enumerate(rules):
            table = torch.as_tensor(table, dtype=torch.long)
            shape = (self.n_c if level == 0 else self.v, self.m, self.s)
            if tuple(table.shape) != shape:
                raise ParameterError(f"rules[{level}] must have shape {shape}, got {tuple(table.shape)}")
            if table.min() < 0 or table.max() >= self.v:
                raise ParameterError(f"rules[{level}] entries must be in [0, {self.v})")
            flat = table.reshape(-1, self.s)
            if torch.unique(flat, dim=0).shape[0] != flat.shape[0]:
                raise ParameterError(f"rules[{level}] repeat a tuple: the grammar would be ambiguous")
            out.append(table)
        return tuple(out)

    # ------------------------------------------------------------------ sizes
    @property
    def d(self) -> int:
        """Input length ``s**L``."""
        return self.s**self.L

    @property
    def n_internal(self) -> int:
        """Number of internal nodes (each chooses one rule): ``(s**L - 1) / (s - 1)``."""
        return (self.s**self.L - 1) // (self.s - 1)

    @property
    def P_max(self) -> int:
        """Number of distinct data, ``n_c * m**n_internal``, as an exact Python int."""
        return self.n_c * self.m**self.n_internal

    def _p_max_at_least(self, n: int) -> bool:
        """``P_max >= n``, decided without computing ``P_max`` when it is astronomically large."""
        if n <= self.n_c:
            return True
        if self.m == 1:
            return False  # P_max = n_c
        # m >= 2: P_max >= 2**n_internal, so n_internal > log2(n) settles it (s**L is not computed when
        # the tree is too deep for that to matter).
        if self.L * math.log2(self.s) > 64 or self.n_internal > n.bit_length():
            return True
        return self.P_max >= n

    @property
    def P_max_text(self) -> str:
        """``P_max`` for messages: exact decimal when short, else ``n_c*m^n_internal (~10^x)``."""
        if self.m == 1 or (self.L * math.log2(self.s) < 20 and self.n_internal * math.log2(self.m) < 200):
            return str(self.P_max)
        if self.L * math.log2(self.s) > 64:
            return f"{self.n_c}*{self.m}^({self.s}^{self.L}-1)/({self.s}-1)"
        digits = math.log10(self.n_c) + self.n_internal * math.log10(self.m)
        return f"{self.n_c}*{self.m}^{self.n_internal} (~10^{digits:.1f})"

    def _check_data_memory(self, n: int, what: str, copies: int = 2) -> None:
        """Refuse (ResourceError) to generate ``n`` data that cannot fit in memory.

        ``n`` data hold ``(N, n_internal + d)`` tree symbols and ``(N, n_internal)`` rule choices (int64);
        ``copies`` counts the extra ``(N, n_internal)`` temporaries of the generator.
        """
        n_bytes = 8 * n * ((1 + copies) * self.n_internal + self.d + 2)
        check_memory(n_bytes, f"{what} ({n} data of {self.d} tokens each)")

    def __repr__(self) -> str:
        return f"RHM(v={self.v}, n_c={self.n_c}, m={self.m}, s={self.s}, L={self.L})"

    # ------------------------------------------------------------------ generation
    def from_choices(self, labels: torch.Tensor, choices: Sequence[torch.Tensor]) -> RHMSample:
        """Generate data top-down from classes ``labels`` (N,) and rule choices (``choices[l]``: (N, s**l)).

        Vectorized over the batch; loops only over the L levels.
        """
        labels = torch.as_tensor(labels, dtype=torch.long)
        n = labels.shape[0]
        if len(choices) != self.L:
            raise ParameterError(f"choices must hold L={self.L} tensors, got {len(choices)}")
        tree = [labels.reshape(n, 1)]
        for level, table in enumerate(self.rules):
            parents = tree[-1]  # (N, s**l)
            chosen = choices[level]  # (N, s**l)
            children = table[parents, chosen]  # (N, s**l, s)
            tree.append(children.reshape(n, self.s ** (level + 1)))  # (N, s**(l+1))
        return RHMSample(labels=labels, tree=tuple(tree), choices=tuple(choices))

    def _split_digits(self, digits: torch.Tensor) -> list[torch.Tensor]:
        """(N, n_internal) breadth-first digits -> per-level choices ``[(N, s**l) for l < L]``."""
        out, start = [], 0
        for level in range(self.L):
            width = self.s**level
            out.append(digits[:, start : start + width])
            start += width
        return out

    def sample(self, n: int, seed: int | torch.Generator | None = 0) -> RHMSample:
        """Draw ``n`` i.i.d. data: uniform class, uniform rule at every internal node."""
        n = check_int("n", n, low=0)
        gen = make_generator(seed)
        self._check_data_memory(n, f"{self!r}.sample(n={n})", copies=1)
        labels = torch.randint(0, self.n_c, (n,), generator=gen)
        choices = [torch.randint(0, self.m, (n, self.s**level), generator=gen) for level in range(self.L)]
        return self.from_choices(labels, choices)

    # ------------------------------------------------------------------ enumeration indices
    def _digits_from_int64(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_class = self.m**self.n_internal
        labels = idx // per_class
        return labels, _decode_base(idx % per_class, self.m, self.n_internal)

    def _digits_from_ints(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact decoding of arbitrary-size Python ints, vectorized with 30-bit limbs."""
        per_class = self.m**self.n_internal
        labels = torch.tensor([i // per_class for i in idx], dtype=torch.long)
        rests = [i % per_class for i in idx]
        n_limbs = max(1, (per_class.bit_length() + 29) // 30)
        mask = (1 << 30) - 1
        limbs = torch.tensor(
            [[(r >> (30 * k)) & mask for k in range(n_limbs)] for r in rests], dtype=torch.long
        )
        limbs = limbs.reshape(len(rests), n_limbs)  # (N, n_limbs), least significant limb first
        digits = torch.empty(len(rests), self.n_internal, dtype=torch.long)
        for k in range(self.n_internal - 1, -1, -1):
            # Long division of every row by m, from the most significant limb down.
            rem = torch.zeros(len(rests), dtype=torch.long)
            for j in range(n_limbs - 1, -1, -1):
                cur = (rem << 30) + limbs[:, j]
                limbs[:, j] = cur // self.m
                rem = cur % self.m
            digits[:, k] = rem
        return labels, digits

    def from_index(self, indices: torch.Tensor | Sequence[int]) -> RHMSample:
        """The data with enumeration indices ``indices`` (an int64 tensor, or Python ints of any size)."""
        if isinstance(indices, torch.Tensor):
            if indices.dtype != torch.long:
                raise ParameterTypeError(f"indices tensor must be int64, got {indices.dtype}")
            self._check_data_memory(indices.numel(), f"{self!r}.from_index")
            if indices.numel() and (
                indices.min() < 0 or not self._p_max_at_least(int(indices.max()) + 1)
            ):
                raise ParameterError(f"indices must be in [0, P_max={self.P_max_text})")
            if self._p_max_at_least(1 << 63):
                return self.from_index([int(i) for i in indices.tolist()])
            labels, digits = self._digits_from_int64(indices.reshape(-1))
        else:
            idx = [int(i) for i in indices]
            self._check_data_memory(len(idx), f"{self!r}.from_index")
            if idx and (min(idx) < 0 or not self._p_max_at_least(max(idx) + 1)):
                raise ParameterError(f"indices must be in [0, P_max={self.P_max_text})")
            if not self._p_max_at_least(_INT64_SAFE + 1):
                labels, digits = self._digits_from_int64(torch.tensor(idx, dtype=torch.long).reshape(-1))
            else:
                labels, digits = self._digits_from_ints(idx)
        return self.from_choices(labels, self._split_digits(digits))

    def index_of(self, sample: RHMSample) -> list[int]:
        """Enumeration indices (exact Python ints) of the data in ``sample``; inverts :meth:`from_index`."""
        digits = torch.cat(list(sample.choices), dim=1)  # (N, n_internal)
        if not self._p_max_at_least(_INT64_SAFE + 1):
            idx = sample.labels.clone()
            for k in range(self.n_internal):
                idx = idx * self.m + digits[:, k]
            return idx.tolist()
        out = []
        for label, row in zip(sample.labels.tolist(), digits.tolist(), strict=True):
            value = label
            for digit in row:
                value = value * self.m + digit
            out.append(value)
        return out

    def sample_distinct(self, n: int, seed: int | torch.Generator | None = 0) -> RHMSample:
        """Draw ``n`` distinct data uniformly at random (no repeats), e.g. to split train and test sets.

        Small ``P_max``: a random permutation of the indices. Large: uniform draws with duplicates removed
        and topped up; the result is in random order.
        """
        n = check_int("n", n, low=0)
        self._check_data_memory(n, f"{self!r}.sample_distinct(n={n})", copies=3)
        if not self._p_max_at_least(n):
            raise ParameterError(f"n must be in [0, P_max={self.P_max}], got {n}")
        gen = make_generator(seed)
        if not self._p_max_at_least(_RANDPERM_LIMIT + 1):
            return self.from_index(torch.randperm(self.P_max, generator=gen)[:n])
        labels = torch.empty(0, dtype=torch.long)
        digits = torch.empty(0, self.n_internal, dtype=torch.long)
        # Fixed random weights hash each datum (class + digits) to one int64 (wrapping arithmetic), so
        # duplicates are found by a 1-D sort; rows whose hashes collide are compared exactly.
        weights = torch.randint(-(1 << 62), 1 << 62, (self.n_internal + 1,), generator=gen)
        while labels.numel() < n:
            k = n - labels.numel() + 16
            labels = torch.cat([labels, torch.randint(0, self.n_c, (k,), generator=gen)])
            digits = torch.cat([digits, torch.randint(0, self.m, (k, self.n_internal), generator=gen)])
            keep = _first_occurrences(torch.cat([labels[:, None], digits], dim=1), weights)
            labels, digits = labels[keep], digits[keep]
        labels, digits = labels[:n], digits[:n]
        return self.from_choices(labels, self._split_digits(digits))

    def train_test_split(
        self, n_train: int, n_test: int, seed: int | torch.Generator | None = 0
    ) -> tuple[RHMSample, RHMSample]:
        """Disjoint train and test sets of distinct data."""
        n_train = check_int("n_train", n_train, low=0)
        n_test = check_int("n_test", n_test, low=0)
        if not self._p_max_at_least(n_train + n_test):
            raise ParameterError(f"n_train + n_test must be <= P_max={self.P_max}, got {n_train + n_test}")
        both = self.sample_distinct(n_train + n_test, seed=seed)
        return both[:n_train], both[n_train:]

    def enumerate(self, max_count: int = 5_000_000) -> RHMSample:
        """All ``P_max`` data in index order; refuses when ``P_max > max_count``."""
        if self._p_max_at_least(max_count + 1):
            raise ParameterError(
                f"P_max={self.P_max_text} exceeds max_count={max_count}; use sample_distinct"
            )
        return self.from_index(torch.arange(self.P_max))

    # ------------------------------------------------------------------ synonymic exchanges
    def resample_level(
        self, sample: RHMSample, level: int, seed: int | torch.Generator | None = 0
    ) -> RHMSample:
        """The synonymic exchange ``P_l``: keep the symbols at levels ``<= level`` and re-draw every rule
        choice from ``level`` down, regenerating everything below (``level`` in ``[0, L-1]``)."""
        level = check_int("level", level, low=0, high=self.L - 1)
        gen = make_generator(seed)
        n = len(sample)
        self._check_data_memory(n, f"{self!r}.resample_level")
        choices = list(sample.choices[:level])
        choices += [torch.randint(0, self.m, (n, self.s**k), generator=gen) for k in range(level, self.L)]
        return self.from_choices(sample.labels, choices)


class RHMDataset(torch.utils.data.Dataset):
    """A ``torch.utils.data.Dataset`` over an :class:`RHMSample`: items are ``(x, label)``.

    ``encoding`` is ``"tokens"`` (x: (d,) long), ``"onehot"`` (x: (v, d) float32, channels first) or
    ``"whitened"`` (one-hot centred and scaled to unit variance). Encoded once, up front.

    Example
    -------
    >>> rhm = RHM(v=8, n_c=8, m=2, s=2, L=3)
    >>> train, test = rhm.train_test_split(500, 200, seed=0)
    >>> x, y = RHMDataset(train, v=rhm.v, encoding="onehot")[0]
    >>> tuple(x.shape)
    (8, 8)
    """

    def __init__(self, sample: RHMSample, v: int, encoding: str = "onehot") -> None:
        if encoding not in ENCODINGS:
            raise ParameterError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.sample = sample
        self.encoding = encoding
        tokens = sample.tokens
        self.inputs = tokens if encoding == "tokens" else one_hot(tokens, v, whiten=encoding == "whitened")
        self.labels = sample.labels

    def __len__(self) -> int:
        return len(self.sample)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.labels[i]
