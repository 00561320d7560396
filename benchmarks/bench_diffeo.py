"""Benchmark: diffeos of 500 CIFAR-size images (images/s), batched vs the authors' algorithm (one image
per call); and R_f of a ResNet-18-size model on 500 images (wall time, peak memory).

    python benchmarks/bench_diffeo.py [--n 500] [--size 32] [--c 5] [--skip-resnet]

Part 1. The baseline is the authors' algorithm as they wrote it (github.com/pcsl-epfl/diffeomorphism,
``diff.py`` ``deform``; re-written here, not copied): per call one image, a cached mode table, two
``torch.randn(m, m)`` coefficient draws, one einsum per field, and the same bilinear interpolation (clamped
floor/ceil gathers ``a[..., y, x]``). Ours: :func:`layerwise.diffeo.sample_fields` for the whole batch (one
einsum) and :func:`layerwise.diffeo.deform` (one ``grid_sample``). Both in float32, same process, median of
``--repeats`` runs; the two interpolations are also compared on the same fields.

Part 2. :func:`layerwise.diffeo.relative_stability` of a CIFAR ResNet-18 (11.2 M parameters, written out
here) on 500 random 3 x 32 x 32 images, logits and one inner layer, in a fresh process so that its peak
resident memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import platform
import resource
import statistics
import time

import torch
from torch import nn

from layerwise.diffeo import deform, fields_from_coefficients, relative_stability, sample_fields


# ---- the authors' algorithm as they wrote it: one image per call ----------------------------------------
# Written here from the algorithm of github.com/pcsl-epfl/diffeomorphism (diff.py): the mode table is cached
# per (n, cutoff); each call draws two (m, m) coefficient matrices with torch.randn, builds each field with
# one einsum over the sine basis, scales by sqrt(T) n, and remaps the image with clamped floor/ceil bilinear
# gathers indexed as a[..., y, x]. float32 (torch's default dtype), as the original runs by default.
@functools.lru_cache
def _modes(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(0, 1, n)
    k = torch.arange(1, m + 1, dtype=torch.get_default_dtype())
    i, j = torch.meshgrid(k, k, indexing="ij")
    r = (i.pow(2) + j.pow(2)).sqrt()
    e = (r < m + 0.5) / r  # 1 / sqrt(i^2 + j^2) on kept modes
    s = torch.sin(math.pi * x[:, None] * k[None, :])  # (n, m)
    return e, s


def _scalar_field(n: int, m: int) -> torch.Tensor:
    e, s = _modes(n, m)
    c = torch.randn(m, m) * e
    return torch.einsum("ij,xi,yj->yx", c, s, s)


def _remap(a: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    n, m = a.shape[-2:]
    y, x = torch.meshgrid(torch.arange(n, dtype=dx.dtype), torch.arange(m, dtype=dx.dtype), indexing="ij")
    xn = (x - dx).clamp(0, m - 1)
    yn = (y - dy).clamp(0, n - 1)
    xf, yf, xc, yc = xn.floor().long(), yn.floor().long(), xn.ceil().long(), yn.ceil().long()
    xv, yv = xn - xf, yn - yf
    return ((1 - yv) * (1 - xv) * a[..., yf, xf] + (1 - yv) * xv * a[..., yf, xc]
            + yv * (1 - xv) * a[..., yc, xf] + yv * xv * a[..., yc, xc])


def authors_deform(image: torch.Tensor, T: float, cut: int) -> torch.Tensor:
    """One image (C, n, n): draw a field at temperature T and apply it (the original's ``deform``)."""
    n = image.shape[-1]
    dx = T**0.5 * _scalar_field(n, cut) * n
    dy = T**0.5 * _scalar_field(n, cut) * n
    return _remap(image, dx, dy)


def authors_loop(images: torch.Tensor, T: float, c: int) -> torch.Tensor:
    return torch.stack([authors_deform(img, T, c) for img in images])  # one call per image, as they use it


def batched(images: torch.Tensor, T: float, c: int, seed: int) -> torch.Tensor:
    n, _, h, w = images.shape
    return deform(images, sample_fields(n, h, w, c, T, seed=seed))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in __import__("os").getloadavg())
    except OSError:
        return "unknown"


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- a CIFAR ResNet-18 (11.2 M parameters) -------------------------------------------------------------
class _Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet18(n_classes: int = 10) -> nn.Module:
    layers, c_in = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for c_out, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        layers.append(_Basic(c_in, c_out, stride))
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_classes)]
    return nn.Sequential(*layers)


def _resnet_job(n: int, queue) -> None:
    torch.manual_seed(0)
    model = resnet18().eval()
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    res = relative_stability(model, images, layers=["", "5"], c=3, batch_size=100, seed=0, progress=False)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"wall": wall, "peak_mb": peak, "base_mb": base, "R": res[""].R, "R5": res["5"].R,
               "params": sum(p.numel() for p in model.parameters())})


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--c", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    T = 4.0 / (math.pi * args.size**2 * math.log(args.c))  # 1-pixel typical displacement
    images = torch.rand(args.n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {_cpu_model()}, "
          f"load average {_load()}; {args.n} images 3x{args.size}x{args.size}, c={args.c}, T={T:.2e}")

    # Same fields through both paths: identical results (float32).
    coef = torch.randn(4, 2, args.c, args.c, generator=torch.Generator().manual_seed(2)) * 1e-2
    fields = fields_from_coefficients(coef, args.size, args.size)
    ours = deform(images[:4], fields)
    ref = torch.stack([_remap(images[k], fields[k, 0], fields[k, 1]) for k in range(4)])
    print(f"max |batched - authors' remap| on the same fields: {float((ours - ref).abs().max()):.1e}")

    t_loop = _timed(lambda: authors_loop(images, T, args.c), args.repeats)
    t_ours = _timed(lambda: batched(images, T, args.c, seed=0), args.repeats)
    print(f"authors' algorithm (diff.py deform, one image per call): {args.n / t_loop:8.0f} images/s "
          f"({t_loop * 1e3:.1f} ms)")
    print(f"batched (ours: sample_fields + deform):                  {args.n / t_ours:8.0f} images/s "
          f"({t_ours * 1e3:.1f} ms)")
    print(f"speed-up over the authors' algorithm: {t_loop / t_ours:.1f}x")

    if not args.skip_resnet:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_resnet_job, args=(args.n, queue))
        proc.start()
        r = queue.get()
        proc.join()
        print(f"R_f of a ResNet-18 ({r['params'] / 1e6:.1f} M parameters) on {args.n} images 3x32x32, "
              f"logits + layer '5', batch 100, 1 repeat: {r['wall']:.1f} s wall, "
              f"peak RSS {r['peak_mb']:.0f} MB "
              f"(model and images loaded: {r['base_mb']:.0f} MB); R_f(logits) = {r['R']:.3f}, "
              f"R_f(layer 5) = {r['R5']:.3f}")


if __name__ == "__main__":
    main()
