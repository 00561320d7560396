"""Small image classifiers for the CPU-scale experiments: fully connected, LeNet-like, ResNet, ViT.

All take (B, C, n, n) images (n divisible by 4) and return (B, n_classes) logits. Sizes are chosen so that a
few hundred Adam steps on 16 x 16 images take a few seconds on one CPU core. At n >= 32 the ResNet's stem
has stride 2 and the ViT's patches are n/4 pixels wide (16 tokens at every size), so 32 x 32 images cost
about what 16 x 16 ones do.

>>> import torch
>>> net = make_net("vit", channels=1, size=16, n_classes=10)
>>> net(torch.zeros(2, 1, 16, 16)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NETS", "make_net"]


def _fc(channels: int, size: int, n_classes: int, width: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(channels * size * size, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_classes),
    )


def _lenet(channels: int, size: int, n_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (size // 4) ** 2, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_classes),
    )


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class _ResNet(nn.Module):
    """Three stages of one basic block each (8, 16, 32 channels; strides 1, 2, 2), global average pool.

    ``stem_stride`` 2 halves the resolution first (used for 32 x 32 inputs)."""

    def __init__(self, channels: int, n_classes: int, widths: tuple[int, ...] = (8, 16, 32),
                 stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for k, w in enumerate(widths):
            blocks.append(_Block(c_in, w, 1 if k == 0 else 2))
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))  # (B, 32, n/4, n/4)
        return self.head(h.mean(dim=(2, 3)))


class _ViT(nn.Module):
    """Patch tokens (side size/4: a 4 x 4 grid of tokens), learned positions, 2 pre-norm encoder layers
    (width 32, 4 heads), mean pooling."""

    def __init__(self, channels: int, size: int, n_classes: int, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        patch = max(1, size // 4)
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, n_patches, dim)
        return self.head(self.norm(self.encoder(tokens)).mean(1))


NETS = ("fc", "lenet", "resnet", "vit")


def make_net(name: str, channels: int, size: int, n_classes: int) -> nn.Module:
    """One of :data:`NETS` for (channels, size, size) inputs and ``n_classes`` outputs."""
    if name == "fc":
        return _fc(channels, size, n_classes)
    if name == "lenet":
        return _lenet(channels, size, n_classes)
    if name == "resnet":
        return _ResNet(channels, n_classes, stem_stride=2 if size >= 32 else 1)
    if name == "vit":
        return _ViT(channels, size, n_classes)
    raise ValueError(f"net must be one of {list(NETS)}, got {name!r}")
