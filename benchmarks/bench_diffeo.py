"""Benchmark: diffeos of 500 CIFAR-size images (images/s), batched vs the authors' one-image loop; and
R_f of a ResNet-18-size model on 500 images (wall time, peak memory).

    python benchmarks/bench_diffeo.py [--n 500] [--size 32] [--c 5] [--skip-resnet]

Part 1. The baseline is written like the authors' code (github.com/pcsl-epfl/diffeomorphism, ``diff.py``):
per image, draw one field per component with ``torch.randn(m, m)``, build it with an einsum over the sine
basis, and remap with floor/ceil gathers. Ours: :func:`layerwise.diffeo.sample_fields` for the whole batch
(one einsum) and :func:`layerwise.diffeo.deform` (one ``grid_sample``). Both in float32, same process,
median of ``--repeats`` runs. The two are also checked against each other on the same fields.

Part 2. :func:`layerwise.diffeo.relative_stability` of a CIFAR ResNet-18 (11.2 M parameters, written out
here) on 500 random 3 x 32 x 32 images, logits and one inner layer, in a fresh process so that its peak
resident memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import statistics
import time

import torch
from torch import nn

from layerwise.diffeo import deform, fields_from_coefficients, relative_stability, sample_fields


# ---- the authors' style: one image at a time --------------------------------------------------------------
def _modes(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(0, 1, n)
    k = torch.arange(1, m + 1, dtype=torch.float32)
    i, j = torch.meshgrid(k, k, indexing="ij")
    r = (i.pow(2) + j.pow(2)).sqrt()
    e = (r < m + 0.5) / r
    s = torch.sin(math.pi * x[:, None] * k[None, :])
    return e, s


def _scalar_field(n: int, m: int, e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    c = torch.randn(m, m) * e
    return torch.einsum("ij,xi,yj->yx", c, s, s)


def _remap(a: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    n, m = a.shape[-2:]
    y, x = torch.meshgrid(torch.arange(n, dtype=dx.dtype), torch.arange(m, dtype=dx.dtype), indexing="ij")
    x = (x - dx).clamp(0, m - 1)
    y = (y - dy).clamp(0, n - 1)
    xf, yf, xc, yc = x.floor().long(), y.floor().long(), x.ceil().long(), y.ceil().long()

    def re(xi, yi):
        return a.reshape(-1, n * m)[:, (m * yi + xi).flatten()].reshape(a.shape)

    xv, yv = x - xf, y - yf
    return ((1 - yv) * (1 - xv) * re(xf, yf) + (1 - yv) * xv * re(xc, yf) + yv * (1 - xv) * re(xf, yc)
            + yv * xv * re(xc, yc))


def authors_loop(images: torch.Tensor, T: float, c: int) -> torch.Tensor:
    n = images.shape[-1]
    e, s = _modes(n, c)
    out = []
    for img in images:  # one diffeo per call, as in the original
        dx = math.sqrt(T) * n * _scalar_field(n, c, e, s)
        dy = math.sqrt(T) * n * _scalar_field(n, c, e, s)
        out.append(_remap(img, dx, dy))
    return torch.stack(out)


def batched(images: torch.Tensor, T: float, c: int, seed: int) -> torch.Tensor:
    n, _, h, w = images.shape
    return deform(images, sample_fields(n, h, w, c, T, seed=seed))


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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n} images 3x{args.size}x"
          f"{args.size}, c={args.c}, T={T:.2e}")

    # Same fields through both paths: identical results (float32).
    coef = torch.randn(4, 2, args.c, args.c, generator=torch.Generator().manual_seed(2)) * 1e-2
    fields = fields_from_coefficients(coef, args.size, args.size)
    ours = deform(images[:4], fields)
    ref = torch.stack([_remap(images[k], fields[k, 0], fields[k, 1]) for k in range(4)])
    print(f"max |batched - authors' remap| on the same fields: {float((ours - ref).abs().max()):.1e}")

    t_loop = _timed(lambda: authors_loop(images, T, args.c), args.repeats)
    t_ours = _timed(lambda: batched(images, T, args.c, seed=0), args.repeats)
    print(f"authors-style loop: {args.n / t_loop:10.0f} images/s ({t_loop * 1e3:.1f} ms)")
    print(f"batched (ours):     {args.n / t_ours:10.0f} images/s ({t_ours * 1e3:.1f} ms)")
    print(f"speed-up: {t_loop / t_ours:.1f}x (target >= 15x)")

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
