"""Discrete forward (noising) processes on RHM tokens, and the leaf evidence they give exact inference.

Sclocchi, Favero, Wyart, "A phase transition in diffusion models reveals the hierarchical nature of data",
PNAS 122 (2025); Sclocchi, Favero, Levi, Wyart, "Probing the latent hierarchical structure of data via
diffusion models", ICLR 2025.

Each process corrupts clean tokens ``x0`` at a noise level in ``[0, 1]`` (:meth:`NoiseProcess.corrupt`) and
turns what it emitted into leaf evidence for belief propagation (:meth:`NoiseProcess.leaf_evidence`): a
``(N, d, v)`` tensor ``e[n, i, a] ∝ p(x_t[n, i] | x0[n, i] = a)``. The three processes are *not* equivalent:

* ``"eps"`` (the theory process of the PNAS paper): nothing is emitted -- ``corrupt`` returns ``x0`` -- and
  the evidence is built from the clean token, ``(1 - eps) δ_{x0} + eps / v``.
* ``"uniform"`` (D3PM-like resampling): each token is replaced, with probability ``eps``, by a token drawn
  uniformly from ``[0, v)`` (possibly itself); the evidence of a noisy token is ``(1 - eps) δ_{x_t} + eps/v``.
* ``"mask"`` (absorbing): each token is masked with probability ``eps`` and then carries the id ``v`` (so
  ``x_t`` takes values in ``[0, v]``); the evidence is ``δ_{x_t}`` if unmasked and uniform if masked.

New processes subclass :class:`NoiseProcess` and register in :data:`NOISE_PROCESSES`.

Example
-------
>>> import torch
>>> proc = make_noise_process("mask", v=4)
>>> x0 = torch.tensor([[0, 1, 2, 3]])
>>> x_t = proc.corrupt(x0, 0.5, torch.Generator().manual_seed(0))
>>> proc.leaf_evidence(x_t, 0.5).shape
torch.Size([1, 4, 4])
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .._registry import Registry
from .._validation import check_float, check_int, make_generator
from ..errors import ParameterError, ParameterTypeError

__all__ = [
    "NoiseProcess",
    "EpsProcess",
    "UniformProcess",
    "MaskProcess",
    "NOISE_PROCESSES",
    "make_noise_process",
]


class NoiseProcess:
    """Base class of a discrete noise process on tokens in ``[0, v)``.

    Parameters
    ----------
    v : vocabulary size (>= 1).

    Notes
    -----
    Subclasses set ``name`` and implement :meth:`_corrupt` and :meth:`_evidence`; the public methods validate
    their arguments first.
    """

    name: ClassVar[str] = ""
    #: Reference for the process (paper and section).
    reference: ClassVar[str] = ""

    def __init__(self, v: int) -> None:
        self.v = check_int("v", v, low=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(v={self.v})"

    # ---------------------------------------------------------------- values a noisy token can take
    @property
    def n_states(self) -> int:
        """Number of values a noisy token can take (``v``, or ``v + 1`` with a mask token)."""
        return self.v

    # ---------------------------------------------------------------- public, validated
    def corrupt(
        self, x0: torch.Tensor, level: float, generator: torch.Generator | int | None = None
    ) -> torch.Tensor:
        """Corrupt clean tokens.

        Parameters
        ----------
        x0 : (N, d) long -- clean tokens in ``[0, v)``.
        level : noise level in ``[0, 1]``.
        generator : a ``torch.Generator`` (or an int seed; None draws a fresh seed).

        Returns
        -------
        (N, d) long -- the noisy tokens ``x_t`` in ``[0, n_states)``.
        """
        level = check_float("level", level, low=0.0, high=1.0)
        self._check_tokens("x0", x0, self.v)
        return self._corrupt(x0, level, make_generator(generator))

    def leaf_evidence(
        self, x_t: torch.Tensor, level: float, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Likelihoods of the clean token given the noisy one.

        Parameters
        ----------
        x_t : (N, d) long -- output of :meth:`corrupt` (values in ``[0, n_states)``).
        level : noise level in ``[0, 1]`` used by :meth:`corrupt`.
        dtype : floating dtype of the result (default float64).

        Returns
        -------
        (N, d, v) -- ``e[n, i, a] = p(x_t[n, i] | x0[n, i] = a)`` up to a factor per position; nonnegative.
        """
        level = check_float("level", level, low=0.0, high=1.0)
        self._check_tokens("x_t", x_t, self.n_states)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ParameterTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        return self._evidence(x_t, level, dtype)

    # ---------------------------------------------------------------- to implement
    def _corrupt(self, x0: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _evidence(self, x_t: torch.Tensor, level: float, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _check_tokens(name: str, tokens: torch.Tensor, n_values: int) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
            got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ParameterTypeError(f"{name} must be a long tensor, got {got}")
        if tokens.dim() != 2:
            raise ParameterError(f"{name} must have shape (N, d), got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= n_values):
            raise ParameterError(
                f"{name} values must be in [0, {n_values}), got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )

    def _smoothed_one_hot(self, tokens: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        """(N, d) long -> (N, d, v): ``(1 - eps) δ_{token} + eps / v``."""
        out = torch.full((*tokens.shape, self.v), eps / self.v, dtype=dtype, device=tokens.device)
        peak = torch.full((*tokens.shape, 1), 1.0 - eps, dtype=dtype, device=tokens.device)
        out.scatter_add_(-1, tokens.unsqueeze(-1), peak)
        return out


NOISE_PROCESSES: Registry[type[NoiseProcess]] = Registry("noise process")


@NOISE_PROCESSES.register("eps")
class EpsProcess(NoiseProcess):
    """The theory process: evidence ``(1 - eps) δ_{x0} + eps / v`` built from the clean token.

    ``corrupt`` returns a copy of ``x0`` (the noise lives only in the evidence), so that
    ``leaf_evidence(corrupt(x0, eps), eps)`` is the PNAS paper's leaf message.
    """

    name = "eps"
    reference = "Sclocchi, Favero, Wyart, PNAS 2025, Sec. 'Belief propagation' (leaf messages)"

    def _corrupt(self, x0: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
        return x0.clone()

    def _evidence(self, x_t: torch.Tensor, level: float, dtype: torch.dtype) -> torch.Tensor:
        return self._smoothed_one_hot(x_t, level, dtype)


@NOISE_PROCESSES.register("uniform")
class UniformProcess(NoiseProcess):
    """Uniform resampling: with probability ``eps`` a token is replaced by a uniform token in ``[0, v)``.

    Then ``p(x_t | x0 = a) = (1 - eps) δ_{a, x_t} + eps / v`` exactly.
    """

    name = "uniform"
    reference = "Austin et al., D3PM (NeurIPS 2021), uniform transition; ICLR 2025 (Sclocchi et al.)"

    def _corrupt(self, x0: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
        hit = torch.rand(x0.shape, generator=generator, dtype=torch.float64) < level
        fresh = torch.randint(0, self.v, x0.shape, generator=generator)
        return torch.where(hit, fresh, x0)

    def _evidence(self, x_t: torch.Tensor, level: float, dtype: torch.dtype) -> torch.Tensor:
        return self._smoothed_one_hot(x_t, level, dtype)


@NOISE_PROCESSES.register("mask")
class MaskProcess(NoiseProcess):
    """Masking (absorbing state): with probability ``eps`` a token becomes the mask id ``v``.

    Evidence: ``δ_{x_t}`` for an unmasked token, all ones for a masked one.
    """

    name = "mask"
    reference = "Austin et al., D3PM (NeurIPS 2021), absorbing transition; PNAS 2025 (Sclocchi et al.)"

    @property
    def mask_id(self) -> int:
        """The id of the mask token, ``v``."""
        return self.v

    @property
    def n_states(self) -> int:
        return self.v + 1

    def _corrupt(self, x0: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
        hit = torch.rand(x0.shape, generator=generator, dtype=torch.float64) < level
        return torch.where(hit, torch.full_like(x0, self.v), x0)

    def _evidence(self, x_t: torch.Tensor, level: float, dtype: torch.dtype) -> torch.Tensor:
        # One-hot over v + 1 values, then masked rows (the extra column) become all ones.
        onehot = torch.nn.functional.one_hot(x_t, self.v + 1).to(dtype)  # (N, d, v + 1)
        return onehot[..., : self.v] + onehot[..., self.v :]  # (N, d, v)


def make_noise_process(name: str, v: int) -> NoiseProcess:
    """Build the registered noise process ``name`` ("eps", "uniform", "mask") for vocabulary size ``v``."""
    return NOISE_PROCESSES.get(name)(v)
