"""Downstream image-classification tasks built from images that ship with scikit-learn (nothing downloaded).

The 1797 handwritten digits of ``sklearn.datasets.load_digits`` (8x8, upsampled to 16x16, values in [0, 1])
are split once, by a fixed permutation, into a *pre-training pool* and a *downstream pool*. Pre-training
sees upright digits (with small random affine jitter); each downstream task shows the downstream pool
under its own transformation, or procedural images:

==========  =======  ==================================================================
task        classes  images
==========  =======  ==================================================================
rot90       10       digits rotated by 90 degrees
invert      10       digits with inverted intensities
mirror      10       digits mirrored left-right
blocky      10       digits at 4x4 resolution (block-upsampled)
edges       10       gradient magnitude of the digits
shapes      5        disk, square, triangle, cross, ring (random size and position)
stripes     4        gratings at 0, 45, 90, 135 degrees (random frequency, phase, noise)
checker     3        checkerboards of period 2, 4, 8 pixels (random phase, noise)
upright     10       the pre-training distribution (held-out digits): the control task
==========  =======  ==================================================================

Requires the ``data`` extra (scikit-learn).

Example
-------
>>> tasks = make_tasks(["rot90", "shapes"], seed=0, n_train=50, n_val=20, n_test=20)  # doctest: +SKIP
>>> tasks["rot90"].train[0].shape                                                       # doctest: +SKIP
torch.Size([50, 1, 16, 16])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validation import check_int
from ..errors import MissingExtraError, ParameterError

__all__ = [
    "ImageTask",
    "TASKS",
    "DIGIT_TASKS",
    "make_tasks",
    "pretraining_data",
    "load_digits_16",
    "pretrain_encoder",
]

IMAGE_SIZE = 16
DIGIT_TASKS = ("rot90", "invert", "mirror", "blocky", "edges", "upright")
PROCEDURAL = {"shapes": 5, "stripes": 4, "checker": 3}
TASKS = DIGIT_TASKS + tuple(PROCEDURAL)
_PRETRAIN_FRACTION = 0.5


@dataclass(frozen=True)
class ImageTask:
    """A classification task: images (N, 1, 16, 16) in [0, 1] and labels (N,) for train/val/test."""

    name: str
    num_classes: int
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=1)
def load_digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as (N, 1, 16, 16) float32 in [0, 1] (bilinear upsampling) and labels (N,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingExtraError(
            "the toy editing tasks need scikit-learn: pip install 'layerwise[data]'"
        ) from err
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1), torch.tensor(d.target, dtype=torch.long)


def _pools() -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the pre-training and downstream pools (fixed permutation, independent of any seed)."""
    n = load_digits_16()[0].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(12345))
    cut = int(_PRETRAIN_FRACTION * n)
    return perm[:cut], perm[cut:]


def _transform(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "rot90":
        return torch.rot90(x, 1, dims=(2, 3))
    if name == "invert":
        return 1.0 - x
    if name == "mirror":
        return x.flip(3)
    if name == "blocky":
        return F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest")
    if name == "edges":
        gx = x[..., :, 1:] - x[..., :, :-1]
        gy = x[..., 1:, :] - x[..., :-1, :]
        mag = (F.pad(gx, (0, 1, 0, 0)) ** 2 + F.pad(gy, (0, 0, 0, 1)) ** 2).sqrt()
        return (mag / mag.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)).clamp(0, 1)
    if name == "upright":
        return x
    raise AssertionError(name)


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5) / IMAGE_SIZE * 2 - 1  # pixel centres in [-1, 1]
    return torch.meshgrid(c, c, indexing="ij")  # (H, W) y, x


def _procedural(name: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = PROCEDURAL[name]
    labels = torch.randint(0, k, (n,), generator=gen)
    yy, xx = _grid()
    u = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    if name == "shapes":
        cx, cy = (u(n, 1, 1) - 0.5) * 0.5, (u(n, 1, 1) - 0.5) * 0.5
        r = 0.45 + 0.3 * u(n, 1, 1)
        dx, dy = xx - cx, yy - cy
        disk = (dx**2 + dy**2).sqrt() < r
        square = (dx.abs() < 0.85 * r) & (dy.abs() < 0.85 * r)
        tri = (dy < 0.8 * r) & (dy > -0.8 * r + 2 * dx.abs() * 0.9)
        cross = ((dx.abs() < 0.25 * r) | (dy.abs() < 0.25 * r)) & (dx.abs() < r) & (dy.abs() < r)
        ring = ((dx**2 + dy**2).sqrt() < r) & ((dx**2 + dy**2).sqrt() > 0.55 * r)
        masks = torch.stack([disk, square, tri, cross, ring], 1).float()  # (n, 5, H, W)
        img = masks[torch.arange(n), labels]
        img = img * (0.6 + 0.4 * u(n, 1, 1)) + 0.05 * torch.randn(n, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    elif name == "stripes":
        theta = labels.float() * math.pi / 4
        freq = 2.0 + 3.0 * u(n)
        phase = 2 * math.pi * u(n)
        proj = xx[None] * theta.cos()[:, None, None] + yy[None] * theta.sin()[:, None, None]
        img = 0.5 + 0.5 * torch.sin(math.pi * freq[:, None, None] * proj + phase[:, None, None])
        img = img + 0.15 * torch.randn(n, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    else:  # checker
        period = (2 ** (labels + 1)).float()[:, None, None]
        ox, oy = torch.randint(0, 8, (n, 1, 1), generator=gen), torch.randint(0, 8, (n, 1, 1), generator=gen)
        iy = torch.arange(IMAGE_SIZE)[None, :, None] + oy
        ix = torch.arange(IMAGE_SIZE)[None, None, :] + ox
        img = (((iy // (period / 2).long()) + (ix // (period / 2).long())) % 2).float()
        img = img * (0.5 + 0.5 * u(n, 1, 1)) + 0.15 * torch.randn(n, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return img.clamp(0, 1)[:, None], labels


def make_tasks(
    names: Sequence[str], seed: int = 0, n_train: int = 500, n_val: int = 150, n_test: int = 199
) -> dict[str, ImageTask]:
    """Build the named tasks (see the module table). Digit tasks split the downstream pool (899 images)
    into train/val/test (shuffled by ``seed``); procedural tasks draw fresh images from ``seed``."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ParameterError(f"tasks must be among {list(TASKS)}, got {unknown}")
    sizes = [check_int(k, v, low=1) for k, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test))]
    x_all, y_all = load_digits_16()
    _, pool = _pools()
    if sum(sizes) > len(pool):
        raise ParameterError(f"n_train + n_val + n_test must be at most {len(pool)}, got {sum(sizes)}")
    order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    cuts = [order[: sizes[0]], order[sizes[0] : sizes[0] + sizes[1]], order[sizes[0] + sizes[1] : sum(sizes)]]
    out = {}
    for t, name in enumerate(names):
        if name in PROCEDURAL:
            gen = torch.Generator().manual_seed(1000 * seed + 17 * t + 1)
            splits = [_procedural(name, s, gen) for s in sizes]
            out[name] = ImageTask(name, PROCEDURAL[name], *splits)
        else:
            splits = [(_transform(name, x_all[idx]), y_all[idx]) for idx in cuts]
            out[name] = ImageTask(name, 10, *splits)
    return out


def pretraining_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` upright digits from the pre-training pool with random affine jitter (rotation +-12 degrees,
    scale 0.85-1.15, shift +-12%): (n, 1, 16, 16), labels (n,)."""
    n = check_int("n", n, low=1)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = load_digits_16()
    pre, _ = _pools()
    idx = pre[torch.randint(0, len(pre), (n,), generator=gen)]
    ang = (torch.rand(n, generator=gen) - 0.5) * 2 * math.radians(12)
    scale = 0.85 + 0.3 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.24
    cos, sin = ang.cos() / scale, ang.sin() / scale
    rows = [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)]
    theta = torch.stack(rows, 1)  # (n, 2, 3)
    grid = F.affine_grid(theta, (n, 1, IMAGE_SIZE, IMAGE_SIZE), align_corners=False)
    x = F.grid_sample(x_all[idx], grid, align_corners=False, padding_mode="zeros")
    return x.clamp(0, 1), y_all[idx]


def pretrain_encoder(
    encoder: torch.nn.Module,
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    feature_dim: int | None = None,
) -> torch.nn.Module:
    """Pre-train ``encoder`` in place on upright digits with affine jitter (:func:`pretraining_data`),
    through a linear 10-way head that is discarded; AdamW (weight decay 0.05), warm-up + cosine. Returns
    the encoder in eval mode. ``feature_dim``: the encoder's output dimension (inferred when None)."""
    from .finetune import warmup_cosine

    steps = check_int("steps", steps, low=0)
    batch_size = check_int("batch_size", batch_size, low=1)
    gen = torch.Generator().manual_seed(check_int("seed", seed, low=0))
    x, y = pretraining_data(max(1, steps * batch_size // 2), seed=10_000 + seed)
    if feature_dim is None:
        with torch.no_grad():
            feature_dim = encoder(x[:1]).shape[-1]
    torch.manual_seed(seed)
    head = torch.nn.Linear(feature_dim, 10)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warm))
    encoder.train()
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
            loss = torch.nn.functional.cross_entropy(head(encoder(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return encoder.eval()
