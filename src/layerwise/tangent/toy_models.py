"""Small image encoders for CPU-scale editing experiments, and frozen prototype (cosine) heads.

Both encoders map images ``(N, C, H, W)`` to features ``(N, D)`` and name their residual blocks
``blocks.{i}.`` so that LiNeS finds them. They use LayerNorm/GroupNorm only (no batch statistics), so the
linearized model (:mod:`.linearize`) is exactly the first-order expansion of the model.

- :class:`TinyViT`: patch embedding, class token, pre-norm transformer blocks (explicit attention, so that
  forward-mode differentiation goes through plain tensor operations), final norm, linear projection.
- :class:`TinyCNN`: a stem convolution, residual convolutional blocks (two of them halve the resolution),
  global average pooling, linear projection.
- :class:`PrototypeHead`: ``logits = scale * cos(z, p_c)`` against fixed class prototypes, the analogue of a
  CLIP zero-shot head (prototypes = class-mean features of the pre-trained encoder, or text embeddings).

Example
-------
>>> vit = TinyViT(image_size=16, patch_size=4, dim=32, depth=2, heads=2, out_dim=16)
>>> vit(torch.zeros(3, 1, 16, 16)).shape
torch.Size([3, 16])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_int
from ..errors import ParameterError

__all__ = ["TinyViT", "TinyCNN", "PrototypeHead", "class_prototypes", "build_encoder", "ENCODERS"]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D)
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)  # (N, h, T, T)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small vision transformer: ``(N, C, H, W) -> (N, out_dim)`` (class-token features, projected)."""

    def __init__(
        self,
        image_size: int = 16,
        patch_size: int = 4,
        channels: int = 1,
        dim: int = 32,
        depth: int = 4,
        heads: int = 2,
        mlp_ratio: int = 2,
        out_dim: int = 32,
    ) -> None:
        super().__init__()
        image_size = check_int("image_size", image_size, low=1)
        patch_size = check_int("patch_size", patch_size, low=1)
        if image_size % patch_size:
            raise ParameterError(f"patch_size must divide image_size, got {patch_size} and {image_size}")
        if check_int("dim", dim, low=1) % check_int("heads", heads, low=1):
            raise ParameterError(f"heads must divide dim, got {heads} and {dim}")
        n_tokens = (image_size // patch_size) ** 2 + 1
        self.patch = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n_tokens, dim))
        depth = check_int("depth", depth, low=1)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, check_int("out_dim", out_dim, low=1), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, T-1, D)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.proj(self.norm(self.blocks(tokens))[:, 0])


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(4 if c_out % 4 == 0 else 1, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(4 if c_out % 4 == 0 else 1, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride) if (stride != 1 or c_in != c_out) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x)))))
        return F.gelu(h + (x if self.skip is None else self.skip(x)))


class TinyCNN(nn.Module):
    """A small residual CNN: ``(N, C, H, W) -> (N, out_dim)``; blocks 1 and 2 halve the resolution."""

    def __init__(self, channels: int = 1, width: int = 16, depth: int = 4, out_dim: int = 32) -> None:
        super().__init__()
        width = check_int("width", width, low=1)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        blocks, c = [], width
        for i in range(check_int("depth", depth, low=1)):
            c_out = 2 * c if i in (1, 2) else c
            blocks.append(_ConvBlock(c, c_out, 2 if i in (1, 2) else 1))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(c, check_int("out_dim", out_dim, low=1), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.blocks(F.gelu(self.stem(x))).mean(dim=(2, 3)))


ENCODERS = {"vit": TinyViT, "cnn": TinyCNN}


def build_encoder(kind: str, **kwargs) -> nn.Module:
    """``TinyViT`` (``kind="vit"``) or ``TinyCNN`` (``"cnn"``) with the given keyword arguments."""
    if kind not in ENCODERS:
        raise ParameterError(f"encoder kind must be one of {sorted(ENCODERS)}, got {kind!r}")
    return ENCODERS[kind](**kwargs)


class PrototypeHead(nn.Module):
    """Frozen cosine classifier: ``logits = scale * normalize(z - c) @ normalize(prototypes - c).T``.

    Parameters
    ----------
    prototypes : (C, D) one vector per class (stored as a buffer: never trained).
    scale : logit scale (CLIP uses 100).
    center : (D,) subtracted from features and prototypes (e.g. the mean feature of the task's images,
        which makes class means of similar images point in distinct directions); default 0.
    """

    def __init__(
        self, prototypes: torch.Tensor, scale: float = 20.0, center: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 2:
            got = getattr(prototypes, "shape", prototypes)
            raise ParameterError(f"prototypes must be a (C, D) tensor, got {got}")
        c = torch.zeros(prototypes.shape[1]) if center is None else center.detach().float().reshape(-1)
        if c.shape[0] != prototypes.shape[1]:
            raise ParameterError(f"center must have D = {prototypes.shape[1]} entries, got {c.shape[0]}")
        self.register_buffer("center", c)
        self.register_buffer("prototypes", F.normalize(prototypes.detach().float() - c, dim=-1))
        self.scale = float(scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., C)
        return self.scale * F.normalize(z - self.center.to(z.dtype), dim=-1) @ self.prototypes.to(z.dtype).T


@torch.no_grad()
def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class means of ``features`` (N, D) -> (C, D); a class without samples raises."""
    z = features.float()
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        raise ParameterError(f"labels lack classes {torch.nonzero(counts == 0).flatten().tolist()}")
    sums = torch.zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
    return sums / counts[:, None]
