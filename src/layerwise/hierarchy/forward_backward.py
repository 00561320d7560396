"""Forward-backward experiments: noise data to level ``t``, denoise back, measure what changed.

Sclocchi, Favero, Wyart, "A phase transition in diffusion models reveals the hierarchical nature of data",
PNAS 122 (2025); Sclocchi, Favero, Levi, Wyart, "Probing the latent hierarchical structure of data via
diffusion models", ICLR 2025.

For every noise level ``t`` and every starting datum ``x0``, ``n_trajectories`` independent runs draw
``x_t`` from the forward process and ``x̂0`` from a :class:`Denoiser`. With the exact denoiser
(:class:`BPDenoiser`, an exact joint posterior sample by belief propagation) ``x̂0`` comes with its latent
tree, so the reconstruction of every level -- the class included -- is measured. Any other denoiser (a
trained network, a masked language model) returns tokens only and gets the token observables.

Memory: with ``keep_trajectories=True`` every ``x_t`` and ``x̂0`` is kept, ``O(n_levels * N * T * d)``
integers; with ``keep_trajectories=False`` only streamed observables are kept, ``O(n_levels * d**2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .._device import resolve_device
from .._validation import check_float, check_int, make_generator
from ..errors import ParameterError, ParameterTypeError
from .bp import sample_posterior
from .noise import NoiseProcess, make_noise_process
from .observables import ChangeStatistics, token_changes
from .rhm import RHM, RHMSample

__all__ = [
    "ForwardProcess",
    "Denoiser",
    "BPDenoiser",
    "LevelResult",
    "ForwardBackwardResult",
    "forward_backward",
    "level_seeds",
]

# Rows of evidence per BP call: 2**23 float64 elements (64 MiB) of (rows, d, v).
_EVIDENCE_ELEMENTS = 1 << 23


@runtime_checkable
class ForwardProcess(Protocol):
    """Anything that corrupts clean tokens: ``corrupt(x0 (N, d) long, level, generator) -> (N, d) long``.

    The RHM processes of :mod:`layerwise.hierarchy.noise` qualify, and so does the masking of a real
    masked language model (:class:`layerwise.diffusion.text.TokenMasking`).
    """

    name: str

    def corrupt(
        self, x0: torch.Tensor, level: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        ...


@runtime_checkable
class Denoiser(Protocol):
    """Draws ``x̂0`` given ``x_t``: ``sample_x0(x_t (N, d), process, level, generator)``.

    Returns an :class:`RHMSample` (tokens plus the latent tree, as the exact BP sampler does) or a
    ``(N, d)`` long tensor of tokens. ``generator`` carries all the randomness, so runs are reproducible.
    """

    def sample_x0(
        self, x_t: torch.Tensor, process: Any, level: float, generator: torch.Generator | None = None
    ) -> RHMSample | torch.Tensor:
        """Draw clean data given noisy tokens ``x_t`` (N, d) at ``level``: an RHMSample or (N, d) tokens."""
        ...


class BPDenoiser:
    """The exact denoiser of RHM data: one exact joint posterior sample per row, by belief propagation.

    Parameters
    ----------
    rhm : the model that generated the data.
    dtype : floating dtype of the messages (float64 default; float32 is ~3x faster and adequate for
        sampling, since messages are normalized at every node).
    max_rows : rows of evidence per BP call (default: about 64 MiB of evidence).
    device : where the leaf evidence is built and BP runs (e.g. ``"cuda"``); default: the device of the
        noisy tokens. The sample comes back on the device of the noisy tokens; its uniforms are drawn on
        the CPU, so a seed gives the same draws on every device.

    Example
    -------
    >>> from layerwise.hierarchy import RHM, make_noise_process
    >>> rhm = RHM(v=8, n_c=8, m=2, s=2, L=3, seed=0)
    >>> x0 = rhm.sample(4, seed=1)
    >>> x_hat = BPDenoiser(rhm).sample_x0(x0.tokens, make_noise_process("mask", 8), 0.0)
    >>> bool((x_hat.tokens == x0.tokens).all())
    True
    """

    def __init__(self, rhm: RHM, dtype: torch.dtype = torch.float64, max_rows: int | None = None,
                 device: str | torch.device | None = None) -> None:
        if not isinstance(rhm, RHM):
            raise ParameterTypeError(f"rhm must be an RHM, got {type(rhm).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ParameterTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.rhm = rhm
        self.dtype = dtype
        self.device = None if device is None else resolve_device(device)
        default_rows = max(1, _EVIDENCE_ELEMENTS // (rhm.d * rhm.v))
        self.max_rows = default_rows if max_rows is None else check_int("max_rows", max_rows, low=1)

    @property
    def vocab_size(self) -> int:
        """The vocabulary size ``v`` (used to build a noise process from its name)."""
        return self.rhm.v

    def __repr__(self) -> str:
        where = "" if self.device is None else f", device={str(self.device)!r}"
        return f"BPDenoiser({self.rhm!r}, dtype={self.dtype}{where})"

    def sample_x0(
        self, x_t: torch.Tensor, process: NoiseProcess, level: float, generator: torch.Generator | None = None
    ) -> RHMSample:
        """Exact posterior samples given noisy tokens ``x_t`` (N, d) from ``process`` at ``level``."""
        if not isinstance(process, NoiseProcess):
            raise ParameterTypeError(f"process must be a NoiseProcess (it provides the leaf evidence), "
                                     f"got {type(process).__name__}")
        if process.v != self.rhm.v:
            raise ParameterError(f"process.v must equal rhm.v = {self.rhm.v}, got {process.v}")
        gen = make_generator(generator)
        home = x_t.device
        work = self.device if self.device is not None else home
        parts = []
        for start in range(0, x_t.shape[0], self.max_rows):
            rows = x_t[start : start + self.max_rows].to(work)
            evidence = process.leaf_evidence(rows, level, dtype=self.dtype)  # (B, d, v), built on `work`
            part = sample_posterior(self.rhm, evidence, seed=gen, dtype=self.dtype)
            if work != home:
                part = part.to(home)
            parts.append(part)
        if len(parts) == 1:
            return parts[0]
        return RHMSample(
            labels=torch.cat([p.labels for p in parts]),
            tree=tuple(torch.cat([p.tree[k] for p in parts]) for k in range(len(parts[0].tree))),
            choices=tuple(torch.cat([p.choices[k] for p in parts]) for k in range(len(parts[0].choices))),
        )


@dataclass(frozen=True)
class LevelResult:
    """Forward-backward at one noise level.

    Attributes
    ----------
    level : the noise level.
    x_t : (N, T, d) long noisy data, or None when trajectories are not kept.
    x_hat : (N, T, d) long reconstructions, or None when trajectories are not kept.
    tree_hat : L+1 tensors (N, T, s**l) of the reconstructions' latent trees (exact denoiser and kept
        trajectories only), else None.
    level_kept : (n_levels_tree,) float64 probability that the symbol at each tree level is unchanged
        (entry 0 = P(class kept)); only the leaves (one entry) when the denoiser returns tokens only or the
        starting data have no tree.
    class_kept_se : standard error of P(class kept) over ``x0`` (NaN without a tree).
    change_probability : probability that a token changed.
    statistics : the streamed :class:`ChangeStatistics` of the token changes (None if T < 2).
    """

    level: float
    x_t: torch.Tensor | None
    x_hat: torch.Tensor | None
    tree_hat: tuple[torch.Tensor, ...] | None
    level_kept: torch.Tensor
    class_kept_se: float
    change_probability: float
    statistics: ChangeStatistics | None = field(repr=False, default=None)

    @property
    def class_kept(self) -> float:
        """P(class of x̂0 == class of x0); NaN when no latent tree is available."""
        return float(self.level_kept[0]) if self.level_kept.numel() > 1 else float("nan")

    def summary(self, r_max: float | None = None) -> dict[str, Any]:
        """Key numbers as plain Python values (chi, xi, C(r) included when T >= 2)."""
        out: dict[str, Any] = {
            "level": self.level,
            "class_kept": self.class_kept,
            "class_kept_se": self.class_kept_se,
            "level_kept": self.level_kept.tolist(),
            "change_probability": self.change_probability,
        }
        if self.statistics is not None:
            stats = self.statistics.summary(r_max=r_max)
            out.update({k: stats[k] for k in ("chi", "chi_r_max", "xi", "r", "C_r") if k in stats})
        return out


@dataclass(frozen=True)
class ForwardBackwardResult:
    """Forward-backward over several noise levels from the same starting data.

    Attributes
    ----------
    x0 : (N, d) long starting tokens.
    tree0 : L+1 tensors (N, s**l) of the starting data's latent tree, or None for plain tokens.
    levels : one :class:`LevelResult` per noise level, in the order given.
    """

    x0: torch.Tensor
    tree0: tuple[torch.Tensor, ...] | None
    levels: tuple[LevelResult, ...]

    def summary(self, r_max: float | None = None) -> list[dict[str, Any]]:
        """One dict of key numbers per level."""
        return [res.summary(r_max=r_max) for res in self.levels]


# --------------------------------------------------------------------------------------------- one level
def _run_level(
    x0: torch.Tensor,
    tree0: tuple[torch.Tensor, ...] | None,
    process: ForwardProcess,
    level: float,
    n_traj: int,
    denoiser: Denoiser,
    seed: int,
    keep: bool,
    batch_x0: int,
    device: torch.device | None = None,
) -> LevelResult:
    gen = make_generator(seed)
    n, d = x0.shape
    stats = ChangeStatistics((d,)) if n_traj >= 2 else None
    kept_sum: torch.Tensor | None = None
    per_x0_class: list[torch.Tensor] = []
    change_sum = 0.0
    xs_t, xs_hat, trees_hat = [], [], []
    for start in range(0, n, batch_x0):
        x0_b = x0[start : start + batch_x0]  # (b, d)
        b = x0_b.shape[0]
        rep = x0_b.repeat_interleave(n_traj, dim=0)  # (b * T, d), trajectories of one x0 adjacent
        x_t = process.corrupt(rep, level, gen)
        out = denoiser.sample_x0(x_t if device is None else x_t.to(device), process, level, gen)
        if device is not None:  # observables are computed where x0 lives
            out = out.to(x0.device)  # an RHMSample or a tensor
        tokens_hat = out.tokens if isinstance(out, RHMSample) else out
        if not isinstance(tokens_hat, torch.Tensor) or tuple(tokens_hat.shape) != (b * n_traj, d):
            raise ParameterError(f"denoiser must return (N, d) = {(b * n_traj, d)} tokens or an RHMSample, "
                                 f"got {getattr(tokens_hat, 'shape', type(tokens_hat).__name__)}")
        tokens_hat = tokens_hat.reshape(b, n_traj, d)  # (b, T, d)
        changes = token_changes(x0_b, tokens_hat)  # (b, T, d)
        change_sum += float(changes.sum())
        if stats is not None:
            stats.update(changes)
        if tree0 is not None and isinstance(out, RHMSample):
            tree_hat = tuple(t.reshape(b, n_traj, -1) for t in out.tree)  # (b, T, s**l) per level
            pairs = zip(tree0, tree_hat, strict=True)
            same = [(th == t0[start : start + b].unsqueeze(1)).double() for t0, th in pairs]  # (b, T, s**l)
            block = torch.stack([s.sum() for s in same])  # (L+1,)
            kept_sum = block if kept_sum is None else kept_sum + block
            per_x0_class.append(same[0].mean(dim=(1, 2)))  # (b,)
            if keep:
                trees_hat.append(tree_hat)
        if keep:
            xs_t.append(x_t.reshape(b, n_traj, d))
            xs_hat.append(tokens_hat)
    total = n * n_traj
    change_p = change_sum / (total * d)
    if kept_sum is not None:
        sizes = torch.tensor([t.shape[1] for t in tree0], dtype=torch.float64)  # nodes per level
        level_kept = kept_sum / (total * sizes)
        class_x0 = torch.cat(per_x0_class)
        se = float(class_x0.std() / math.sqrt(n)) if n > 1 else float("nan")
    else:
        level_kept = torch.tensor([1.0 - change_p], dtype=torch.float64)
        se = float("nan")
    tree_hat_all = None
    if keep and trees_hat:
        tree_hat_all = tuple(torch.cat([t[k] for t in trees_hat]) for k in range(len(trees_hat[0])))
    return LevelResult(
        level=level,
        x_t=torch.cat(xs_t) if keep else None,
        x_hat=torch.cat(xs_hat) if keep else None,
        tree_hat=tree_hat_all,
        level_kept=level_kept,
        class_kept_se=se,
        change_probability=change_p,
        statistics=stats,
    )


# --------------------------------------------------------------------------------------------- public
def level_seeds(seed: int | torch.Generator | None, levels: Sequence[float]) -> list[int]:
    """One seed per noise level, a function of ``seed`` and the level's value only (not of its position)."""
    base = int(torch.randint(0, 2**62, (1,), generator=make_generator(seed)))
    # An odd 64-bit multiplier spreads nearby levels apart; levels are resolved to 2**-40.
    return [(base + round(float(t) * 2**40) * 0x9E3779B97F4A7C15) % 2**62 for t in levels]


def forward_backward(
    data: RHMSample | torch.Tensor,
    process: ForwardProcess | str,
    levels: Sequence[float],
    n_trajectories: int,
    denoiser: Denoiser,
    *,
    seed: int | None = 0,
    keep_trajectories: bool = True,
    batch_size: int = 4096,
    executor: Executor | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> ForwardBackwardResult:
    """Run forward-backward from ``data`` at every noise level and measure the changes.

    Parameters
    ----------
    data : the starting data ``x0``: an :class:`RHMSample` (with its latent tree, so every level's
        reconstruction is measured) or an (N, d) long tensor of tokens.
    process : the forward process (an object with ``corrupt``, see :class:`ForwardProcess`) or the name of
        a registered RHM noise process ("eps", "uniform", "mask"), built with ``denoiser.vocab_size``.
    levels : noise levels in [0, 1] (eps, resampling probability or mask fraction).
    n_trajectories : independent forward-backward runs per ``x0`` (>= 1; >= 2 for correlations).
    denoiser : draws ``x̂0`` given ``x_t``, e.g. :class:`BPDenoiser` or a real model's adapter.
    seed : seed of all the randomness; each level uses its own seed derived from ``seed`` and its value
        (:func:`level_seeds`), so its result does not depend on the other levels or their order (and
        levels can run in parallel).
    keep_trajectories : keep ``x_t``, ``x̂0`` (and the trees) of every run; False keeps only the streamed
        observables (memory ``O(d**2)`` per level).
    batch_size : rows (``x0`` copies times trajectories) denoised per call.
    executor : optional ``concurrent.futures.Executor`` to run the levels in parallel, e.g.
        ``ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn"))`` (forked workers can
        deadlock in torch's thread pool) or ``dask.distributed.Client.get_executor()``; default: in this
        process. Results do not depend on the executor.
    progress : show a tqdm progress bar over levels.
    device : where the denoiser receives the noisy tokens (e.g. ``"cuda"``: the exact
        :class:`BPDenoiser` then builds the leaf evidence and runs BP there); default: where ``data`` is.
        Noise and the sampler's uniforms are drawn on the CPU and observables are computed on ``data``'s
        device, so results depend on ``device`` only through floating-point round-off in BP.

    Returns
    -------
    ForwardBackwardResult

    Example
    -------
    >>> from layerwise.hierarchy import RHM
    >>> rhm = RHM(v=8, n_c=8, m=2, s=2, L=3, seed=0)
    >>> res = forward_backward(rhm.sample(16, seed=1), "eps", [0.0, 0.5], 4, BPDenoiser(rhm))
    >>> res.levels[0].class_kept, res.levels[1].x_hat.shape
    (1.0, torch.Size([16, 4, 8]))
    """
    if isinstance(data, RHMSample):
        x0, tree0 = data.tokens, tuple(data.tree)
    elif isinstance(data, torch.Tensor):
        x0, tree0 = data, None
    else:
        raise ParameterTypeError(
            f"data must be an RHMSample or an (N, d) long tensor, got {type(data).__name__}"
        )
    if x0.dtype != torch.long or x0.dim() != 2 or x0.shape[0] == 0:
        raise ParameterError(f"data tokens must be a non-empty (N, d) long tensor, "
                             f"got {x0.dtype} {tuple(x0.shape)}")
    if isinstance(process, str):
        vocab = getattr(denoiser, "vocab_size", None)
        if vocab is None:
            raise ParameterError(f"process given by name ({process!r}) needs a denoiser with vocab_size; "
                                 "pass a process object instead")
        process = make_noise_process(process, vocab)
    if not hasattr(process, "corrupt"):
        raise ParameterTypeError(f"process must have a corrupt(x0, level, generator) method, "
                                 f"got {type(process).__name__}")
    if not hasattr(denoiser, "sample_x0"):
        raise ParameterTypeError(f"denoiser must have a sample_x0(x_t, process, level, generator) method, "
                                 f"got {type(denoiser).__name__}")
    levels = [check_float("levels entry", t, low=0.0, high=1.0) for t in levels]
    if not levels:
        raise ParameterError("levels must hold at least one noise level, got none")
    n_traj = check_int("n_trajectories", n_trajectories, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    batch_x0 = max(1, batch_size // n_traj)
    seeds = level_seeds(seed, levels)
    work = None if device is None else resolve_device(device)
    args = [(x0, tree0, process, t, n_traj, denoiser, sd, keep_trajectories, batch_x0, work)
            for t, sd in zip(levels, seeds, strict=True)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(levels), desc="forward-backward", unit="level", disable=not progress)
    results = []
    if executor is None:
        for a in args:
            results.append(_run_level(*a))
            bar.update()
    else:
        futures = [executor.submit(_run_level, *a) for a in args]
        for fut in futures:
            results.append(fut.result())
            bar.update()
    bar.close()
    return ForwardBackwardResult(x0=x0, tree0=tree0, levels=tuple(results))
