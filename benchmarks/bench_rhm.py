"""Benchmark: RHM sampling throughput (samples/s), vectorized vs a per-sample Python loop, same process.

    python benchmarks/bench_rhm.py [--n 100000] [--n-naive 2000]

Instance v=32, n_c=32, m=8, s=2, L=9 (d=512 tokens, P_max = 32 * 8**511). The naive baseline generates
one datum at a time with Python lists (i.i.d.: random rule per node; by index: a random Python-int index,
decoded digit by digit); it runs on fewer samples and its rate is compared with ours.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from layerwise.hierarchy import RHM


def naive_from_choices(rules: list[list], label: int, digits: list[int], s: int, L: int) -> list[int]:
    symbols, k = [label], 0
    for level in range(L):
        children = []
        for sym in symbols:
            children.extend(rules[level][sym][digits[k]])
            k += 1
        symbols = children
    return symbols


def naive_iid(rules, n, n_c, m, n_internal, s, L, rng):
    return [
        naive_from_choices(rules, rng.randrange(n_c), [rng.randrange(m) for _ in range(n_internal)], s, L)
        for _ in range(n)
    ]


def naive_by_index(rules, n, P_max, n_c, m, n_internal, s, L, rng):
    per_class = P_max // n_c
    seen, out = set(), []
    while len(out) < n:
        idx = rng.randrange(P_max)
        if idx in seen:
            continue
        seen.add(idx)
        label, rest = divmod(idx, per_class)
        digits = []
        for _ in range(n_internal):
            rest, d = divmod(rest, m)
            digits.append(d)
        out.append(naive_from_choices(rules, label, digits[::-1], s, L))
    return out


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--n-naive", type=int, default=2_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    rhm = RHM(v=32, n_c=32, m=8, s=2, L=9, seed=0)
    rules = [t.tolist() for t in rhm.rules]
    rng = random.Random(0)
    print(f"{rhm}, d={rhm.d}, torch threads={torch.get_num_threads()}")

    t_iid = timed(lambda: rhm.sample(args.n, seed=1))
    t_idx = timed(lambda: rhm.sample_distinct(args.n, seed=2))
    t_iid_naive = timed(lambda: naive_iid(rules, args.n_naive, 32, 8, rhm.n_internal, 2, 9, rng))
    t_idx_naive = timed(
        lambda: naive_by_index(rules, args.n_naive, rhm.P_max, 32, 8, rhm.n_internal, 2, 9, rng)
    )

    rows = [
        ("i.i.d.", args.n / t_iid, args.n_naive / t_iid_naive),
        ("by index (distinct)", args.n / t_idx, args.n_naive / t_idx_naive),
    ]
    print(f"{'mode':<22}{'layerwise [samples/s]':>24}{'naive loop [samples/s]':>26}{'ratio':>9}")
    for name, ours, naive in rows:
        print(f"{name:<22}{ours:>24,.0f}{naive:>26,.0f}{ours / naive:>8.1f}x")


if __name__ == "__main__":
    main()
