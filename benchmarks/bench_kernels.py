"""Benchmark Gram matrices of the hierarchical and convolutional kernels against a naive reference (same run)
and, with ``--with-neural-tangents``, against neural-tangents in its own pinned environment.

Cases (issue 11 targets on 2 cores):

1. hierarchical NTK, filters (4, 4) (d = 16, inputs: 4 patches on S^3), P = 2048: faster than
   neural-tangents (~2 s on this machine);
2. convolutional NTK (ReLU-NTK base), d = 16, s = 4, P = 1024: at most half of neural-tangents' time
   (~44 s here);
3. hierarchical NTK at P = 8192: peak memory below 2 GB (measured in a fresh subprocess, max RSS).

The naive reference is the direct way (as the papers' public code does): every per-position (or per
patch pair) statistic materialised as an (N, N) matrix for all positions at once, ``arccos`` of the raw
cosines, no blocking and no symmetry; it runs in the same process on the same inputs, and the maximum
absolute difference of the two Gram matrices is printed.

``--with-neural-tangents`` creates ``.venv-nt`` (jax==0.4.30, jaxlib==0.4.30, tf2jax==0.3.6,
neural-tangents==0.6.5, and no torch) on first use and times ``kernel_fn`` of the equivalent ``stax``
networks in float64 on the same inputs (saved as .npy), checking that the numbers agree.

Usage: python benchmarks/bench_kernels.py [--P-hier 2048] [--P-conv 1024] [--P-mem 8192] [--threads T]
       [--repeat 2] [--with-neural-tangents] [--skip-naive-conv] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from layerwise.kernels import conv_kernel, hierarchical_kernel, patch_spheres

ROOT = Path(__file__).resolve().parents[1]
NT_VENV = ROOT / ".venv-nt"
NT_PINS = ["jax==0.4.30", "jaxlib==0.4.30", "tf2jax==0.3.6", "neural-tangents==0.6.5"]


def best_time(fn, repeat: int):
    """Best wall time over ``repeat`` runs (the process CPU time of that run kept in ``LAST_CPU``)."""
    global LAST_CPU
    best, out = math.inf, None
    for _ in range(repeat):
        out = None
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - start
        if wall < best:
            best, LAST_CPU = wall, time.process_time() - cpu
    return best, out


LAST_CPU = math.nan


# ------------------------------------------------------------------------------------- naive references
def _k0(t):
    return (math.pi - torch.arccos(t)) / math.pi


def _k1(t):
    return (torch.sqrt(1 - t * t) + (math.pi - torch.arccos(t)) * t) / math.pi


def naive_hierarchical_ntk(X: torch.Tensor, filters: tuple[int, ...]) -> torch.Tensor:
    """All positions at once: (positions, N, N) tensors, unnormalised recursion (unit-norm patches)."""
    n, d = X.shape
    p = X.view(n, d // filters[0], filters[0]).transpose(0, 1)  # (n0, N, s1)
    S = (p @ p.transpose(1, 2)).clamp(-1, 1)  # (n0, N, N)
    T = S.clone()
    for g in [*filters[1:], d // math.prod(filters)]:
        k1, k0 = _k1(S), _k0(S)
        S_new = k1.view(-1, g, n, n).mean(1)
        T = (k0 * T).view(-1, g, n, n).mean(1) + S_new
        S = S_new.clamp(-1, 1)
    return T[0]


def naive_conv_ntk(X: torch.Tensor, s: int) -> torch.Tensor:
    """Loop over patch shifts i; for each, all (j, N, N) patch pairs at once (NTK base), then average."""
    n, d = X.shape
    idx = (torch.arange(d)[:, None] + torch.arange(s)[None]) % d
    P = X[:, idx]  # (N, d, s)
    norms = P.norm(dim=-1)  # (N, d)
    out = torch.zeros(n, n, dtype=X.dtype)
    for i in range(d):
        g = torch.einsum("as,bjs->jab", P[:, i], P)  # (d, N, N): <x_i, y_j>
        nn_ = norms[:, i][None, :, None] * norms.T[:, None, :]  # (d, N, N)
        t = (g / nn_).clamp(-1, 1)
        out += (nn_ * (t * _k0(t) + _k1(t))).sum(0)
    return out / d**2


# ----------------------------------------------------------------------------------------- neural-tangents
NT_SCRIPT = r"""
import json, sys, time
import numpy as np
from jax import config
config.update("jax_enable_x64", True)
from neural_tangents import stax

case, path, s1, s2 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
x = np.load(path)  # (N, d)
n, d = x.shape
if case == "hier":
    xs = (x * np.sqrt(s1))[:, :, None]  # NWC, first conv W_std=1 on patches scaled by sqrt(s1)
    _, _, kernel_fn = stax.serial(
        stax.Conv(1, (s1,), strides=(s1,), padding="VALID", W_std=1.0), stax.Relu(),
        stax.Conv(1, (s2,), strides=(s2,), padding="VALID", W_std=2 ** 0.5), stax.Relu(),
        stax.Flatten(), stax.Dense(1, W_std=2 ** 0.5))
else:
    xs = (x * np.sqrt(s1))[:, :, None]
    _, _, kernel_fn = stax.serial(
        stax.Conv(1, (s1,), strides=(1,), padding="CIRCULAR", W_std=1.0), stax.Relu(),
        stax.GlobalAvgPool(), stax.Dense(1, W_std=2 ** 0.5))
import jax
kernel_fn = jax.jit(kernel_fn, static_argnames="get")  # as neural-tangents recommends
start = time.perf_counter()
K = np.asarray(kernel_fn(xs, None, "ntk"))  # first call: compilation + run
first = time.perf_counter() - start
start = time.perf_counter()
K = np.asarray(kernel_fn(xs, None, "ntk"))  # compiled
warm = time.perf_counter() - start
np.save(path + ".K.npy", K)
print(json.dumps({"first": first, "warm": warm}))
"""


def ensure_nt_env() -> Path:
    python = NT_VENV / "bin" / "python"
    marker = NT_VENV / ".installed"
    if not marker.exists():
        print(f"creating {NT_VENV} with {' '.join(NT_PINS)} (no torch) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(NT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *NT_PINS],
                       check=True)
        marker.touch()
    return python


def run_nt(python: Path, case: str, X: torch.Tensor, s1: int, s2: int) -> tuple[dict, np.ndarray]:
    """Time neural-tangents' jitted kernel_fn in its venv (first call with compilation, then compiled)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        np.save(path, X.numpy())
        script = os.path.join(tmp, "nt.py")
        Path(script).write_text(NT_SCRIPT)
        res = subprocess.run([str(python), script, case, path, str(s1), str(s2)], capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"neural-tangents failed:\n{res.stderr[-2000:]}")
        times = json.loads(res.stdout.strip().splitlines()[-1])
        return times, np.load(path + ".K.npy")


# ------------------------------------------------------------------------------------------------- memory
MEM_SCRIPT = r"""
import resource, sys, time, torch
from layerwise.kernels import hierarchical_kernel, patch_spheres
torch.set_num_threads(int(sys.argv[2]))
P = int(sys.argv[1])
X = patch_spheres(16, 4)(P, torch.Generator().manual_seed(0))
start = time.perf_counter()
K = hierarchical_kernel(X, None, (4, 4))
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, K.shape[0])
"""


def peak_memory(P: int, threads: int) -> tuple[float, float]:
    res = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(P), str(threads)], capture_output=True,
                         text=True, check=True)
    seconds, gb, _ = res.stdout.split()
    return float(seconds), float(gb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--P-hier", type=int, default=2048)
    ap.add_argument("--P-conv", type=int, default=1024)
    ap.add_argument("--P-mem", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--with-neural-tangents", action="store_true")
    ap.add_argument("--skip-naive-conv", action="store_true", help="skip the (slow) naive conv reference")
    ap.add_argument("--skip-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()}")
    results = {}

    X = patch_spheres(16, 4)(args.P_hier, torch.Generator().manual_seed(0))
    hierarchical_kernel(X[:64], None, (4, 4))  # warm-up (thread pool, allocator)
    t_ours, K = best_time(lambda: hierarchical_kernel(X, None, (4, 4)), args.repeat)
    c_ours = LAST_CPU
    t_naive, K_naive = best_time(lambda: naive_hierarchical_ntk(X, (4, 4)), args.repeat)
    results["hier"] = (t_ours, K)
    print(f"[hierarchical NTK (4,4), P={args.P_hier}] layerwise {t_ours:.2f} s (CPU {c_ours:.2f} s) | naive "
          f"(N,N)-per-position {t_naive:.2f} s (CPU {LAST_CPU:.2f} s) | ratio naive/ours "
          f"{t_naive / t_ours:.1f}x | max |diff| {float((K - K_naive).abs().max()):.1e}")

    Xc = torch.rand(args.P_conv, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_conv, Kc = best_time(lambda: conv_kernel(Xc, None, 4, "ntk_relu"), args.repeat)
    results["conv"] = (t_conv, Kc)
    line = f"[conv NTK d=16 s=4, P={args.P_conv}] layerwise {t_conv:.2f} s (CPU {LAST_CPU:.2f} s)"
    if not args.skip_naive_conv:
        t_cn, Kc_naive = best_time(lambda: naive_conv_ntk(Xc, 4), 1)
        line += (f" | naive loop over shifts {t_cn:.2f} s (CPU {LAST_CPU:.2f} s) | ratio naive/ours "
                 f"{t_cn / t_conv:.1f}x | "
                 f"max |diff| {float((Kc - Kc_naive).abs().max()):.1e}")
    print(line, flush=True)

    if not args.skip_memory:
        seconds, gb = peak_memory(args.P_mem, args.threads)
        print(f"[hierarchical NTK (4,4), P={args.P_mem}] {seconds:.1f} s, peak memory (max RSS of a fresh "
              f"process) {gb:.2f} GB (target < 2 GB; the output alone is {args.P_mem**2 * 8 / 1e9:.2f} GB)")

    if args.with_neural_tangents:
        python = ensure_nt_env()
        for case, X_, s1, s2, key, target in (("hier", X, 4, 4, "hier", "faster than neural-tangents"),
                                              ("conv", Xc, 4, 0, "conv", "at most half of neural-tangents")):
            nt, K_nt = run_nt(python, case, X_, s1, s2)
            t, K_ = results[key]
            diff = float(np.abs(K_.numpy() - K_nt).max())
            print(f"[{case} vs neural-tangents, jit, float64] layerwise {t:.2f} s | neural-tangents compiled "
                  f"{nt['warm']:.2f} s (first call with compilation {nt['first']:.2f} s) | ratio nt/ours "
                  f"{nt['warm'] / t:.1f}x (target: {target}) | max |diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
