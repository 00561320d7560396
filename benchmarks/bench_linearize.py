"""Benchmark a fine-tuning step (forward + backward + AdamW) of the linearized model against the plain one.

``LinearizedModel`` computes ``f(x; theta0) + J (theta - theta0)`` with one ``torch.func.jvp`` (forward-mode
through the network) and differentiates it with respect to ``theta``. Ortiz-Jimenez et al. (NeurIPS 2023)
report that a linearized step costs about 2-3x a plain one. Each (model, mode) runs in its own child process,
so that peak memory is measured cleanly:

- time: median seconds per step over ``--steps`` steps after 3 warm-up steps;
- memory: on CPU, peak RSS of the child during the steps minus its RSS before the first step (so the model's
  own weights and the copies the linearized model holds are excluded; they are reported separately as
  "weights MB"); on CUDA, ``torch.cuda.max_memory_allocated`` during the steps minus the memory allocated
  before them.

Models: the experiments' TinyViT (dim 32, 4 blocks, 17 tokens), a ViT-S-like encoder (dim 384, 6 blocks,
65 tokens) and a small CNN. Ratios are linearized / plain, measured in the same run.

Usage: ``python benchmarks/bench_linearize.py [--steps 20] [--batch 32] [--device cpu|cuda] [--threads 1]``
(about 2 minutes on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny-vit (d32, 4 blocks)": (
        "vit",
        {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 4, "heads": 2},
        16,
    ),
    "vit-s-like (d384, 6 blocks)": (
        "vit",
        {
            "image_size": 32,
            "patch_size": 4,
            "dim": 384,
            "depth": 6,
            "heads": 6,
            "mlp_ratio": 4,
            "out_dim": 384,
        },
        32,
    ),
    "tiny-cnn (w16, 4 blocks)": ("cnn", {"width": 16, "depth": 4}, 16),
}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, mode: str, steps: int, batch: int, device: str, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from layerwise.tangent.linearize import LinearizedModel
    from layerwise.tangent.toy_models import build_encoder

    torch.set_num_threads(threads)
    kind, kw, size = MODELS[name]
    torch.manual_seed(0)
    enc = build_encoder(kind, **kw).to(device)
    model = LinearizedModel(enc) if mode == "linearized" else enc
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)
    target = torch.randn(batch, enc(x[:1]).shape[-1], device=device)
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_mb": peak, "weights_mb": weights_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for opt in ("steps", "batch", "threads"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt} must be at least 1, got {getattr(args, opt)}")
    if args.child:
        print(
            json.dumps(child(args.child[0], args.child[1], args.steps, args.batch, args.device, args.threads))
        )
        return
    print(
        f"one step (forward + backward + AdamW), batch {args.batch}, {args.device}, {args.threads} thread(s)"
    )
    header = (
        f"{'model':<30}{'plain ms':>10}{'lin ms':>10}{'time x':>8}{'plain MB':>10}{'lin MB':>10}{'mem x':>7}"
    )
    print(header)
    for name in MODELS:
        res = {}
        for mode in ("plain", "linearized"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                mode,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        p, li = res["plain"], res["linearized"]
        print(
            f"{name:<30}{1000 * p['seconds']:>10.2f}{1000 * li['seconds']:>10.2f}"
            f"{li['seconds'] / p['seconds']:>8.2f}{p['peak_mb']:>10.1f}{li['peak_mb']:>10.1f}"
            f"{li['peak_mb'] / max(p['peak_mb'], 1e-9):>7.2f}"
        )
        print(
            f"{'':<30}weights: plain {p['weights_mb']:.1f} MB, linearized {li['weights_mb']:.1f} MB "
            "(theta0 and theta)"
        )


if __name__ == "__main__":
    main()
