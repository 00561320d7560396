"""Benchmark: training throughput of the hierarchical CNN on one-hot RHM data; sweep runner overhead.

    python benchmarks/bench_train.py [--steps 40] [--rounds 3] [--threads 1] [--points 100] [--compile]
                                     [--skip-dask]

1. Training throughput (samples/s, Adam steps of batch 128, forward + backward + update) of
   ``HierarchicalCNN(v=32, n_c=32, s=2, L=4, width=128)`` on one-hot inputs (32, 16), in one process
   with ``--threads`` torch threads (default 1, as sweep points run):
   * plain: channels-first inputs ``(N, v, d)``, as the models expect (the baseline);
   * channels-last: the same inputs stored position-major (``(N, d, v)`` memory, a transposed view);
   * with ``--compile``: torch.compile (inductor) of the plain model, where it works on this CPU (off by
     default: compiling takes minutes on a small shared machine).
   Ratios are against plain, measured in the same process after a warm-up.
2. Sweep overhead per point on 100 trivial points (the function returns at once): in-process, a spawn
   process pool of 2 workers, and a Dask LocalCluster of 2 workers, each including its start-up and
   shutdown (wall time of ``run_sweep`` divided by the number of points; point files written as usual).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from layerwise.hierarchy import RHM, one_hot
from layerwise.hierarchy.learning import HierarchicalCNN
from layerwise.sweep import Point, run_sweep


def trivial_point(config: dict, seed: int) -> dict:
    return {"value": config["i"] + seed}


def train_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 128) -> float:
    """Samples per second of Adam steps on ``x`` (after 5 warm-up steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def bench_training(steps: int, compile_model: bool, rounds: int = 3) -> None:
    v, L, width = 32, 4, 128
    rhm = RHM(v, v, 8, 2, L, seed=0)
    data = rhm.sample(4096, seed=1)
    x = one_hot(data.tokens, v)  # (N, v, d) channels first
    x_last = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (N, d, v) memory
    y = data.labels
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    print(f"threads={threads}  HierarchicalCNN(v={v}, L={L}, width={width}), batch 128, "
          f"{rounds} interleaved rounds of {steps} steps (median, min-max)")
    variants = {"plain": (HierarchicalCNN(v, v, 2, L, width, seed=0), x, threads),
                "channels-last": (HierarchicalCNN(v, v, 2, L, width, seed=0), x_last, threads)}
    if cores != threads:
        variants[f"plain, {cores} thr"] = (HierarchicalCNN(v, v, 2, L, width, seed=0), x, cores)
    if compile_model:
        try:
            compiled = torch.compile(HierarchicalCNN(v, v, 2, L, width, seed=0))
            start = time.perf_counter()
            train_rate(compiled, x, y, 2)  # compiles
            print(f"  (torch.compile: compilation and first steps took {time.perf_counter() - start:.1f} s)")
            variants["torch.compile"] = (compiled, x, threads)
        except Exception as exc:  # no C++ compiler, unsupported platform...
            first = str(exc).splitlines()[0][:120] if str(exc) else ""
            print(f"  torch.compile unavailable here: {type(exc).__name__}: {first}")
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved, so a burst of load on the shared machine hits every variant
        for name, (model, inputs, n_threads) in variants.items():
            torch.set_num_threads(n_threads)
            rates[name].append(train_rate(model, inputs, y, steps))
            torch.set_num_threads(threads)
    base = statistics.median(rates["plain"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"  {name:<14} {med:8.0f} samples/s ({min(values):.0f}-{max(values):.0f})   "
              f"x{med / base:.2f} vs plain")


def bench_sweep(n_points: int, dask: bool) -> None:
    points = [Point({"i": i}, seed=0) for i in range(n_points)]
    executors = [("inprocess", {}), ("process", {"max_workers": 2})]
    if dask:
        executors.append(("dask", {"max_workers": 2}))
    base = None
    print(f"sweep of {n_points} trivial points (wall time incl. pool/cluster start-up and point files; "
          f"marginal = (T({n_points}) - T(1)) / {n_points - 1}):")
    for name, extra in executors:
        walls = []
        for pts in (points[:1], points):
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                res = run_sweep(trivial_point, pts, folder, executor=name, progress=False, **extra)
                walls.append(time.perf_counter() - start)
            assert [r["value"] for r in res.results()] == list(range(len(pts)))
        per = walls[1] / n_points * 1e3
        marginal = (walls[1] - walls[0]) / (n_points - 1) * 1e3
        base = base or per
        print(f"  {name:<10} {walls[1]:7.2f} s total  {per:8.2f} ms/point (x{per / base:.0f} vs in-process)  "
              f"start-up {walls[0]:5.2f} s  marginal {marginal:6.2f} ms/point")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    for name, low in (("steps", 1), ("rounds", 1), ("threads", 1), ("points", 2)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    bench_training(args.steps, args.compile, args.rounds)
    try:
        import distributed  # noqa: F401

        dask = not args.skip_dask
    except ImportError:
        print("  (dask not installed: pip install 'layerwise[dask]')")
        dask = False
    bench_sweep(args.points, dask)


if __name__ == "__main__":
    main()
