"""Benchmark exact BP on the RHM against a naive dense reference run in the same process.

Times, for v=32, n_c=32, m=8, s=2, L=8 and a batch of 2048 sequences (eps-process evidence at eps=0.7):
the upward pass, the full marginals at every level, and one joint posterior sample per sequence; then the
same with a naive dense implementation (dense rule tensor ``T[a, b, c]`` contracted with matmuls for the
upward and downward messages, the way the public reference code does it, and a sampler that loops over
tree positions), and prints the ratios, the agreement of the two, and the peak memory (max RSS) of the
fast implementation (measured before the reference runs).

Targets (issue 3, 2-core CPU): full marginals <= 5 s, posterior sampling <= 2 s, peak memory <= 2 GB.

Usage:  python benchmarks/bench_bp.py [--batch 2048] [--ref-batch 2048] [--threads T] [--repeat 2]
        [--device cpu|cuda]   (with cuda both implementations run on the GPU; peak memory is then the GPU's)
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time

import torch

from layerwise.hierarchy import RHM, belief_propagation, make_noise_process, sample_posterior, upward_pass


def max_rss_gb() -> float:
    scale = 1e-9 if sys.platform == "darwin" else 1e-6  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_time(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall-clock time, the process CPU time of that run, and the last output."""
    best, cpu, out = math.inf, math.inf, None
    for _ in range(repeat):
        out = None  # release the previous output first: it would count in the peak memory
        _sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        _sync()
        wall = time.perf_counter() - start
        if wall < best:
            best, cpu = wall, time.process_time() - start_cpu
    return best, cpu, out


# ------------------------------------------------------------------------------------------ dense reference
def dense_tables(rhm: RHM, device: torch.device) -> list[torch.Tensor]:
    """Dense rule indicators ``T[l][a, b, c] = 1/m if (b, c) is a rule of a`` (s = 2 only)."""
    out = []
    for table in rhm.rules:
        n_parents = table.shape[0]
        dense = torch.zeros(n_parents, rhm.v, rhm.v, dtype=torch.float64)
        a = torch.arange(n_parents).repeat_interleave(rhm.m)
        dense[a, table[..., 0].reshape(-1), table[..., 1].reshape(-1)] = 1.0 / rhm.m
        out.append(dense.to(device))
    return out


def dense_upward(rhm: RHM, evidence: torch.Tensor, tables, chunk: int = 8192):
    """Upward messages (N, nodes, n) per level with dense contractions; log Z per datum."""
    n = evidence.shape[0]
    msg = evidence / evidence.sum(-1, keepdim=True)
    log_z = evidence.sum(-1).log().sum(1)
    ups = [msg]
    for level in range(rhm.L - 1, -1, -1):
        dense = tables[level]  # (n_parents, v, v)
        n_parents = dense.shape[0]
        kids = ups[0].reshape(-1, 2, rhm.v)  # (N * nodes, 2, v)
        up = torch.empty(kids.shape[0], n_parents, dtype=torch.float64, device=evidence.device)
        for start in range(0, kids.shape[0], chunk):
            u0, u1 = kids[start : start + chunk, 0], kids[start : start + chunk, 1]
            # sum_{b,c} T[a,b,c] u0(b) u1(c): (rows, v) @ (v, n_parents * v) then weight by u0 and sum over b.
            t1 = (u1 @ dense.permute(2, 0, 1).reshape(rhm.v, -1)).view(-1, n_parents, rhm.v)  # (rows, a, b)
            up[start : start + chunk] = torch.einsum("rab,rb->ra", t1, u0)
        total = up.sum(-1, keepdim=True)
        log_z = log_z + total.log().view(n, -1).sum(1)
        ups.insert(0, (up / total).view(n, -1, n_parents))
    log_z = log_z + ups[0][:, 0].sum(-1).log() - math.log(rhm.n_c)
    return ups, log_z


def dense_marginals(rhm: RHM, evidence: torch.Tensor, tables, chunk: int = 8192):
    """Marginals via dense downward (outside) messages: D_0(b) ∝ sum_{a,c} D(a) T[a,b,c] u_1(c), etc."""
    ups, _ = dense_upward(rhm, evidence, tables, chunk)
    n = evidence.shape[0]
    down = torch.full((n, 1, rhm.n_c), 1.0 / rhm.n_c, dtype=torch.float64, device=evidence.device)
    margs = [ups[0] * down / (ups[0] * down).sum(-1, keepdim=True)]
    for level in range(rhm.L):
        dense = tables[level]  # (n_parents, v, v)
        kids = ups[level + 1].reshape(-1, 2, rhm.v)  # (rows, 2, v)
        d = down.reshape(-1, dense.shape[0])  # (rows, n_parents)
        new_down = torch.empty(kids.shape[0], 2, rhm.v, dtype=torch.float64, device=evidence.device)
        for start in range(0, kids.shape[0], chunk):
            sl = slice(start, start + chunk)
            da = d[sl] @ dense.reshape(dense.shape[0], -1)  # (rows, v*v): sum_a D(a) T[a, b, c]
            da = da.view(-1, rhm.v, rhm.v)
            new_down[sl, 0] = torch.einsum("rbc,rc->rb", da, kids[sl, 1])
            new_down[sl, 1] = torch.einsum("rbc,rb->rc", da, kids[sl, 0])
        new_down = new_down / new_down.sum(-1, keepdim=True)
        down = new_down.view(n, -1, rhm.v)
        marg = ups[level + 1] * down
        margs.append(marg / marg.sum(-1, keepdim=True))
    return margs


def naive_sampling(rhm: RHM, evidence: torch.Tensor, tables, gen: torch.Generator):
    """Top-down rule sampling with a Python loop over tree positions and torch.multinomial."""
    ups, _ = dense_upward(rhm, evidence, tables)
    ups = [u.cpu() for u in ups]  # torch.multinomial with a CPU generator samples on the CPU
    n = evidence.shape[0]
    symbols = torch.multinomial(ups[0][:, 0], 1, generator=gen)  # (N, 1)
    for level in range(rhm.L):
        nxt = torch.empty(n, symbols.shape[1] * 2, dtype=torch.long)
        for k in range(symbols.shape[1]):
            kids = rhm.rules[level][symbols[:, k]]  # (N, m, 2)
            w = ups[level + 1][torch.arange(n)[:, None], 2 * k, kids[..., 0]]
            w = w * ups[level + 1][torch.arange(n)[:, None], 2 * k + 1, kids[..., 1]]  # (N, m)
            r = torch.multinomial(w, 1, generator=gen)  # (N, 1)
            nxt[:, 2 * k : 2 * k + 2] = kids[torch.arange(n), r[:, 0]]
        symbols = nxt
    return symbols


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--ref-batch", type=int, default=2048, help="batch of the dense reference")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions of the fast runs (best is kept)")
    parser.add_argument("--L", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    v, m, s, L = 32, 8, 2, args.L
    rhm = RHM(v, v, m, s, L, seed=0)
    x0 = rhm.sample(args.batch, seed=1)
    device = torch.device(args.device)
    evidence = make_noise_process("eps", v).leaf_evidence(x0.tokens, 0.7).to(device)  # (N, d, v) float64
    threads = torch.get_num_threads()
    print(f"RHM v={v} n_c={v} m={m} s={s} L={L}; batch {args.batch}; float64; threads {threads}; {device}")
    rss_before = max_rss_gb()

    t_up, c_up, _ = best_time(lambda: upward_pass(rhm, evidence), args.repeat)
    t_bp, c_bp, res = best_time(lambda: belief_propagation(rhm, evidence), args.repeat)
    t_sp, c_sp, _ = best_time(lambda: sample_posterior(rhm, evidence, seed=0), args.repeat)
    rss_fast = max_rss_gb()

    nr = min(args.ref_batch, args.batch)
    ev_ref = evidence[:nr]
    tables = dense_tables(rhm, device)
    t_up_ref, c_up_ref, (_, log_z_ref) = best_time(lambda: dense_upward(rhm, ev_ref, tables), 1)
    t_bp_ref, c_bp_ref, margs_ref = best_time(lambda: dense_marginals(rhm, ev_ref, tables), 1)
    gen = torch.Generator().manual_seed(0)
    t_sp_ref, c_sp_ref, _ = best_time(lambda: naive_sampling(rhm, ev_ref, tables, gen), 1)
    scale = args.batch / nr  # both are linear in the batch; reference times are reported per full batch
    err = max(float((a[:nr] - b).abs().max()) for a, b in zip(res.marginals, margs_ref, strict=True))
    err_z = float((res.log_partition[:nr] - log_z_ref).abs().max())

    header = f"{'task':24s} {'fast wall':>10s} {'(cpu)':>8s} {'dense wall':>11s} {'(cpu)':>8s} {'ratio':>7s}"
    print(header + "   target")
    for name, fast, fast_cpu, ref, ref_cpu, target in (
        ("upward pass", t_up, c_up, t_up_ref, c_up_ref, "-"),
        ("marginals, all levels", t_bp, c_bp, t_bp_ref, c_bp_ref, "<= 5 s"),
        ("posterior sampling", t_sp, c_sp, t_sp_ref, c_sp_ref, "<= 2 s"),
    ):
        ref, ref_cpu = ref * scale, ref_cpu * scale
        row = f"{name:24s} {fast:9.3f}s {fast_cpu:7.3f}s {ref:10.3f}s {ref_cpu:7.3f}s {ref / fast:6.1f}x"
        print(row + f"   {target}")
    print("(wall: best of the repeats; cpu: process CPU time of that run, all threads; ratio: of walls)")
    if nr < args.batch:
        print(f"(dense reference timed on {nr} sequences and scaled by {scale:g} to the full batch)")
    print(f"max |marginal difference| vs reference: {err:.2e}; log Z: {err_z:.2e}")
    print(f"peak memory (max RSS) after the fast runs: {rss_fast:.2f} GB (before them: {rss_before:.2f} GB); "
          f"target <= 2 GB")
    if device.type == "cuda":
        print(f"peak GPU memory (both implementations): {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
