"""Networks that learn the RHM: the hierarchical CNN of the PRX paper and two baselines.

Cagnetta, Petrini, Tomasini, Favero, Wyart, PRX 14, 031001 (2024): a deep CNN whose ``L`` convolutions have
filter size = stride = ``s`` mirrors the RHM's tree and learns it from ``P* ~ n_c m**L`` examples; a shallow
fully connected network needs a number of examples of the order of ``P_max``.

Every model maps one-hot inputs ``(N, v, d)`` (channels first, as :func:`layerwise.hierarchy.one_hot`
makes them) to logits ``(N, n_c)``. Hidden layers are named modules (``layers.0``, ``layers.1``, ...,
``blocks.0``...) so :func:`layerwise.hierarchy.learning.synonymic_sensitivity` can hook them by name.

Parametrization: weights are drawn from N(0, 1) with the generator of ``seed`` and every hidden layer divides
its pre-activation by ``sqrt(fan_in)`` (for a convolution ``fan_in = in_channels * s``), as the authors' code
does (``ConvBlockNT`` in pcsl-epfl/hierarchy-learning, ``models/cnn.py``). The readout normalisation is an
option, :data:`SCALINGS`:

* ``scaling="standard"`` (our default): logits = ``h_L @ W / sqrt(width)``, the NTK-like normalisation.
  This is **not** the authors' choice; it is kept as the default because the experiments' settings (Adam,
  learning rate) were fixed with it.
* ``scaling="meanfield"``: logits = ``h_L @ W / width``, the mean-field (feature-learning) normalisation.
  This **is** what the authors' code does (its ``ConvNetGAPMF`` divides the readout by the number of rows
  of the ``(h, n_c)`` readout weight, i.e. by ``h``). With SGD, scale the learning rate by ``width`` to keep
  the training speed comparable.

Differences from the authors' network that remain whatever the option: no biases by default (theirs add
``0.1 * b``, ``b ~ N(0, 1)``), and no global average pooling (here the last layer has a single position, so
pooling would be the identity).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..._validation import check_choice, check_int, make_generator

__all__ = ["SCALINGS", "HierarchicalCNN", "FullyConnected", "TransformerClassifier"]

SCALINGS = ("standard", "meanfield")


def _normal_(param: torch.Tensor, gen: torch.Generator) -> None:
    with torch.no_grad():
        param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _check_input(x: torch.Tensor, v: int, d: int | None) -> None:
    if x.dim() != 3 or x.shape[1] != v or (d is not None and x.shape[2] != d):
        want = f"(N, {v}, {d if d is not None else 'd'})"
        raise ValueError(f"input must be one-hot {want} (channels first), got {tuple(x.shape)}")


class _ConvBlock(nn.Module):
    """``relu(conv(x) / sqrt(in_channels * s))``, filter size = stride = ``s``: (N, C, n) -> (N, h, n/s)."""

    def __init__(self, in_channels: int, out_channels: int, s: int, bias: bool) -> None:
        super().__init__()
        self.s = s
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, s))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1.0 / math.sqrt(in_channels * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.conv1d(x, self.weight, None, stride=self.s) * self.scale
        if self.bias is not None:
            out = out + self.bias[:, None]
        return torch.relu(out)


class _Readout(nn.Module):
    """Linear readout ``x @ W / norm``: (N, h) -> (N, n_c); ``norm = sqrt(h)`` ("standard") or ``h``
    ("meanfield", the authors')."""

    def __init__(self, width: int, n_c: int, scaling: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, n_c))
        self.norm = math.sqrt(width) if scaling == "standard" else float(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight / self.norm


class HierarchicalCNN(nn.Module):
    """``L`` convolutions (filter = stride = ``s``, ``width`` channels, ReLU) and a linear readout.

    Parameters
    ----------
    v : input channels (vocabulary size).
    n_c : number of classes.
    s : filter size and stride.
    L : depth (inputs have ``d = s**L`` positions, reduced to one by the L layers).
    width : channels ``h`` of every hidden layer.
    scaling : readout normalisation, ``"standard"`` (default: readout / sqrt(h), NTK-like) or ``"meanfield"``
        (readout / h, the authors' code); see the module docstring.
    bias : add biases to the convolutions (default False, as in the paper).
    seed : seed of the N(0, 1) initialization.

    Notes
    -----
    Input (N, v, s**L) one-hot; output (N, n_c) logits. Module names: ``layers.0`` ... ``layers.{L-1}``
    (each (N, h, s**(L-1-k)) after ReLU) and ``readout``.

    Example
    -------
    >>> net = HierarchicalCNN(v=8, n_c=8, s=2, L=3, width=16, seed=0)
    >>> net(torch.zeros(5, 8, 8)).shape
    torch.Size([5, 8])
    """

    def __init__(self, v: int, n_c: int, s: int, L: int, width: int, scaling: str = "standard",
                 bias: bool = False, seed: int | torch.Generator | None = 0) -> None:
        super().__init__()
        self.v, self.n_c = check_int("v", v, low=1), check_int("n_c", n_c, low=1)
        self.s, self.L = check_int("s", s, low=2), check_int("L", L, low=1)
        self.width = check_int("width", width, low=1)
        self.scaling = check_choice("scaling", scaling, SCALINGS)
        channels = [self.v] + [self.width] * self.L
        self.layers = nn.ModuleList(
            _ConvBlock(channels[k], channels[k + 1], self.s, bias) for k in range(self.L))
        self.readout = _Readout(self.width, self.n_c, self.scaling)
        gen = make_generator(seed)
        for layer in self.layers:
            _normal_(layer.weight, gen)
        _normal_(self.readout.weight, gen)

    @property
    def d(self) -> int:
        """Input length ``s**L`` (positions)."""
        return self.s**self.L

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, v, s**L) one-hot inputs -> (N, n_c) logits."""
        _check_input(x, self.v, self.d)
        for layer in self.layers:
            x = layer(x)  # (N, h, d / s**(k+1))
        return self.readout(x.flatten(1))  # (N, h) -> (N, n_c)


class FullyConnected(nn.Module):
    """The shallow baseline: ``depth`` fully connected ReLU layers of ``width`` on the flattened input.

    Input (N, v, d) one-hot; output (N, n_c). Module names ``layers.0`` ... and ``readout``. Same
    parametrization as :class:`HierarchicalCNN` (N(0, 1) weights, 1/sqrt(fan_in) pre-activations, readout
    divided by sqrt(width) for ``scaling="standard"`` (default) or by width for ``"meanfield"``).
    """

    def __init__(self, v: int, d: int, n_c: int, width: int, depth: int = 1, scaling: str = "standard",
                 seed: int | torch.Generator | None = 0) -> None:
        super().__init__()
        self.v, self.d = check_int("v", v, low=1), check_int("d", d, low=1)
        self.n_c, self.width = check_int("n_c", n_c, low=1), check_int("width", width, low=1)
        depth = check_int("depth", depth, low=1)
        self.scaling = check_choice("scaling", scaling, SCALINGS)
        sizes = [self.v * self.d] + [self.width] * depth
        self.layers = nn.ModuleList(_Dense(sizes[k], sizes[k + 1]) for k in range(depth))
        self.readout = _Readout(self.width, self.n_c, self.scaling)
        gen = make_generator(seed)
        for layer in self.layers:
            _normal_(layer.weight, gen)
        _normal_(self.readout.weight, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, v, d) one-hot inputs -> (N, n_c) logits."""
        _check_input(x, self.v, self.d)
        x = x.flatten(1)  # (N, v d)
        for layer in self.layers:
            x = layer(x)
        return self.readout(x)


class _Dense(nn.Module):
    """``relu(x @ W / sqrt(n_in))``: (N, n_in) -> (N, n_out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.scale = 1.0 / math.sqrt(n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight * self.scale)


class TransformerClassifier(nn.Module):
    """A small transformer baseline: token embedding + learned positions, ``depth`` pre-norm encoder
    blocks, mean pooling and a linear readout.

    Input (N, v, d) one-hot; output (N, n_c). Module names ``embed``, ``blocks.0`` ... (each (N, d, dim)),
    ``readout``. Initialization: PyTorch's defaults drawn under the generator state of ``seed``.
    """

    def __init__(self, v: int, d: int, n_c: int, dim: int = 32, heads: int = 2, depth: int = 2,
                 seed: int | None = 0) -> None:
        super().__init__()
        self.v, self.d = check_int("v", v, low=1), check_int("d", d, low=1)
        self.n_c, self.dim = check_int("n_c", n_c, low=1), check_int("dim", dim, low=1)
        heads, depth = check_int("heads", heads, low=1), check_int("depth", depth, low=1)
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        seed = check_int("seed", seed, low=0) if seed is not None else None
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.embed = nn.Linear(self.v, dim, bias=False)
            self.position = nn.Parameter(torch.randn(self.d, dim) * 0.02)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True) for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.readout = nn.Linear(dim, self.n_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, v, d) one-hot inputs -> (N, n_c) logits (mean-pooled tokens)."""
        _check_input(x, self.v, self.d)
        h = self.embed(x.transpose(1, 2)) + self.position  # (N, d, dim)
        for block in self.blocks:
            h = block(h)
        return self.readout(self.norm(h).mean(1))  # (N, n_c)
