"""Base kernels: Laplace and the arc-cosine (one-hidden-layer ReLU) NTK and NNGP, plus their registry.

Every base kernel declares the statistic of a pair of vectors it depends on: the squared distance
(``radial``: Laplace, Gaussian), the cosine with a factor ``|a||b|`` (``angular``: the ReLU NTK and NNGP),
or the inner product and both norms (``dot``: anything else). The local, convolutional and full-input
kernels compute that statistic for all the patch pairs of a block of rows with one matrix product (see
:mod:`._patches`) and apply the base kernel elementwise.

Arc-cosine functions (Cho & Saul 2009; normalised so that ``k0(1) = k1(1) = 1``)::

    k0(t) = (pi - arccos t) / pi
    k1(t) = (sqrt(1 - t^2) + (pi - arccos t) t) / pi

For unit vectors the ReLU NNGP (random-feature kernel) is ``k1(t)`` and the NTK of a one-hidden-layer ReLU
network without biases is ``t k0(t) + k1(t)``; both are positively 1-homogeneous in each argument.

Numerics: cosines are clamped to ``[-1, 1]`` (round-off can push a computed cosine past 1, where
``arccos`` returns NaN) and snapped to 1 within 16 ulps (:func:`snap_cosine_`). ``sqrt(1 - t^2)`` is
never formed as ``1 - t*t`` (which loses about half of its significant digits at ``t = 1 - 1e-10``):
:func:`arccos_k1` uses ``sqrt((1 - t)(1 + t))`` (``1 - t`` is exact near 1), the kernels use
``sin(arccos(-t))``, accurate because ``arccos`` is accurate near +-1.

A new base kernel is registered with :func:`register_base_kernel`; the local, convolutional and
full-input kernels then accept its name as ``base=``.

>>> import torch
>>> X = torch.randn(5, 3, dtype=torch.float64)
>>> K = ntk_relu(X)
>>> bool(torch.allclose(K, K.T)) and K.shape == (5, 5)
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._registry import Registry
from ..errors import ParameterError
from ._checks import as_pair, check_float
from ._patches import gram, snap_cosine_

__all__ = [
    "BaseKernel",
    "BASE_KERNELS",
    "register_base_kernel",
    "get_base_kernel",
    "arccos_k0",
    "arccos_k1",
    "snap_cosine_",
    "laplace",
    "ntk_relu",
    "nngp_relu",
    "full_kernel",
]


# --------------------------------------------------------------------------------------- arc-cosine maps
def arccos_k0(t: torch.Tensor) -> torch.Tensor:
    """Zeroth-order arc-cosine function ``(pi - arccos t) / pi`` (the ReLU derivative kernel); t clamped."""
    return (math.pi - torch.arccos(t.clamp(-1.0, 1.0))) / math.pi


def arccos_k1(t: torch.Tensor) -> torch.Tensor:
    """First-order arc-cosine function ``(sqrt(1 - t^2) + (pi - arccos t) t) / pi``; t clamped to [-1, 1].

    ``sqrt(1 - t^2)`` is computed as ``sqrt((1 - t)(1 + t))``, accurate to a few ulps up to ``t = 1``.
    """
    t = t.clamp(-1.0, 1.0)
    sin = ((1.0 - t) * (1.0 + t)).sqrt()
    return (sin + (math.pi - torch.arccos(t)) * t) / math.pi


# ------------------------------------------------------------------------------------------ the registry
KINDS = ("radial", "angular", "dot")


@dataclass(frozen=True)
class BaseKernel:
    """A base kernel ``C(a, b)`` declared by the statistic of the pair it depends on.

    Attributes
    ----------
    name : registry key.
    fn : elementwise function of one tensor of pair statistics, applied to a fresh block (it may work in
        place), with the parameters as keywords:

        - ``kind="radial"``: ``C(a, b) = fn(r2)`` of the squared distance ``r2 = |a - b|^2``;
        - ``kind="angular"``: ``C(a, b) = |a| |b| fn(t)`` of the cosine ``t`` (in [-1, 1]; 1-homogeneous);
        - ``kind="dot"``: ``C(a, b) = fn(g, na, nb)`` of the inner product ``g`` and the squared norms
          ``na``, ``nb`` (broadcastable against ``g``).
    kind : one of :data:`KINDS`.
    params : parameter name -> default value (positive reals); other keywords are refused.
    reference : where the kernel comes from.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    kind: str = "dot"
    params: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""

    def bind(self, params: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
        """``fn`` with ``params`` (checked against the declared ones, defaults filled in) bound."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ParameterError(
                f"base kernel {self.name!r} takes parameters {sorted(self.params) or '(none)'}, got {unknown}"
            )
        values = {key: check_float(key, value, low=0.0, low_open=True)
                  for key, value in {**self.params, **params}.items()}
        return functools.partial(self.fn, **values) if values else self.fn


BASE_KERNELS: Registry[BaseKernel] = Registry("base kernel")


def register_base_kernel(name: str, *, kind: str = "dot", params: Mapping[str, Any] | None = None,
                         reference: str = ""):
    """Decorator registering ``fn`` as base kernel ``name`` (see :class:`BaseKernel` for ``kind``).

    Example
    -------
    >>> @register_base_kernel("cauchy", kind="radial", params={"sigma": 1.0}, reference="doc example")
    ... def _cauchy(r2, sigma):
    ...     return 1.0 / (1.0 + r2 / sigma**2)
    >>> import torch
    >>> from layerwise.kernels import local_kernel
    >>> local_kernel(torch.zeros(2, 4), None, s=2, base="cauchy").tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    >>> _ = BASE_KERNELS.unregister("cauchy")
    """
    if kind not in KINDS:
        raise ParameterError(f"kind must be one of {list(KINDS)}, got {kind!r}")

    def add(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        BASE_KERNELS.register(name, BaseKernel(name, fn, kind, dict(params or {}), reference))
        return fn

    return add


def get_base_kernel(base: str | BaseKernel) -> BaseKernel:
    """The registered base kernel ``base`` (a name) or ``base`` itself; unknown names list the valid ones."""
    if isinstance(base, BaseKernel):
        return base
    if not isinstance(base, str) or base not in BASE_KERNELS:
        raise ParameterError(f"base must be one of {BASE_KERNELS.names()} (or a BaseKernel), got {base!r}")
    return BASE_KERNELS.get(base)


# Base-kernel functions may overwrite their input (the caller hands over a fresh block).
@register_base_kernel("laplace", kind="radial", params={"sigma": 1.0}, reference="exp(-|a - b| / sigma)")
def _laplace(r2: torch.Tensor, sigma: float) -> torch.Tensor:
    return r2.sqrt_().mul_(-1.0 / sigma).exp_()


@register_base_kernel("gaussian", kind="radial", params={"sigma": 1.0},
                      reference="exp(-|a - b|^2 / (2 sigma^2))")
def _gaussian(r2: torch.Tensor, sigma: float) -> torch.Tensor:
    return r2.mul_(-0.5 / sigma**2).exp_()


@register_base_kernel("ntk_relu", kind="angular", reference="Jacot et al. 2018; one ReLU layer, no bias")
def _ntk_relu(t: torch.Tensor) -> torch.Tensor:
    # t k0(t) + k1(t) = (2 (pi - theta) t + sin theta) / pi with theta = arccos t. We use
    # u = pi - theta = arccos(-t) and sin theta = sin u: accurate near t = +-1 (arccos is, there;
    # no 1 - t^2 is formed).
    u = torch.arccos(t.neg())
    return torch.addcmul(torch.sin(u), u, t, value=2.0).mul_(1.0 / math.pi)


@register_base_kernel("nngp_relu", kind="angular", reference="Cho & Saul 2009 arc-cosine kernel of order 1")
def _nngp_relu(t: torch.Tensor) -> torch.Tensor:
    # k1(t) = (sin theta + (pi - theta) t) / pi
    u = torch.arccos(t.neg())
    return torch.addcmul(torch.sin(u), u, t).mul_(1.0 / math.pi)


# ---------------------------------------------------------------------------------- full-input kernels
def full_kernel(
    X: torch.Tensor,
    Y: torch.Tensor | None = None,
    base: str | BaseKernel = "laplace",
    *,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    **params: Any,
) -> torch.Tensor:
    """A base kernel applied to whole inputs: ``K[a, b] = C(X[a], Y[b])``.

    Parameters
    ----------
    X : (n, d) inputs; Y : (m, d) inputs or None for ``Y = X`` (then only one triangle is computed).
    base : registered base-kernel name or a :class:`BaseKernel`; ``params`` are its parameters.
    dtype : computation dtype (float64 by default); the device is X's.
    block_size : rows per block (default: from a fixed memory budget).

    Returns
    -------
    (n, m) Gram matrix.
    """
    kernel = get_base_kernel(base)
    fn = kernel.bind(params)
    X, Y = as_pair(X, Y, ndim=2, dtype=dtype)
    whole = torch.arange(X.shape[1], device=X.device)[None, :]  # one "patch": the whole input
    return gram(fn, kernel.kind, X, Y, whole, conv=False, block_size=block_size)


def laplace(X: torch.Tensor, Y: torch.Tensor | None = None, sigma: float = 1.0, **kw: Any) -> torch.Tensor:
    """Laplace kernel ``exp(-|x - y| / sigma)`` on whole inputs: X (n, d), Y (m, d) or None -> (n, m)."""
    return full_kernel(X, Y, "laplace", sigma=sigma, **kw)


def ntk_relu(X: torch.Tensor, Y: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
    """NTK of a one-hidden-layer ReLU network, ``|x||y| (t k0(t) + k1(t))``: X (n, d), Y (m, d) -> (n, m)."""
    return full_kernel(X, Y, "ntk_relu", **kw)


def nngp_relu(X: torch.Tensor, Y: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
    """NNGP (arc-cosine kernel of order 1) ``|x||y| k1(t)``: X (n, d), Y (m, d) or None -> (n, m)."""
    return full_kernel(X, Y, "nngp_relu", **kw)
