"""Random Hierarchy Model: enumerate a small instance, sample from a large one, round-trip indices.

Run: ``python examples/rhm.py`` (``--tiny`` for the test size). Guide: docs/guides/rhm.md.
"""

from __future__ import annotations

import argparse

from layerwise.hierarchy import RHM


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the numbers it prints."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (what the tests run)")
    args = parser.parse_args(argv)
    v, m, L = (4, 2, 2) if args.tiny else (8, 2, 3)

    # A small RHM: n_c classes, m synonymous rules per symbol, s-tuples, L levels, d = s**L tokens.
    small = RHM(v=v, n_c=v, m=m, s=2, L=L, seed=0)
    every = small.enumerate()                                  # all P_max data, in index order
    distinct = len({tuple(row) for row in every.tokens.tolist()})
    print(f"RHM(v={v}, m={m}, L={L}): d = {small.d}, P_max = {small.P_max}, distinct = {distinct}")

    # A large one: P_max is astronomically large, sampling and indexing still work exactly.
    large = RHM(v=32, n_c=32, m=8, s=2, L=5 if args.tiny else 9, seed=0)
    batch = large.sample(64, seed=1)                           # tokens (64, d), labels (64,), latent tree
    indices = large.index_of(batch)                            # exact Python ints
    back = large.from_index(indices)
    round_trip = bool((back.tokens == batch.tokens).all())
    print(f"RHM(v=32, m=8, L={large.L}): P_max has {len(str(large.P_max))} digits; "
          f"index round trip exact: {round_trip}")
    return {"P_max": small.P_max, "distinct": distinct, "d": small.d, "round_trip": round_trip,
            "labels": batch.labels.tolist(), "tree_root": batch.tree[0][:, 0].tolist()}


if __name__ == "__main__":
    main()
