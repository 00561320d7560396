"""Forward-backward denoising of RHM data with exact BP, and its output files (.pt / .npz).

One call noises clean data with a registered process (:mod:`.noise`), computes the exact posterior given
the noisy data (:func:`.bp.belief_propagation`) and draws one joint posterior sample per datum
(:func:`.bp.sample_posterior`). The file holds the posterior samples under the keys of a data file
(``params``, ``rules_<l>``, ``labels``, ``tokens``, ``choices_<l>``), so ``load_dataset`` reads it back as
an RHM data set, plus ``clean_labels``, ``clean_tokens``, ``noisy``, ``marginals_<l>``, ``log_partition``,
``process``, ``level`` and ``seed``. Files are written atomically and read without unpickling code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .._device import resolve_device
from .._resources import check_memory
from .._validation import check_float, check_int, make_generator
from ..errors import InputDataError, ParameterError, ParameterTypeError
from .bp import _n_message_values, bp_memory, marginals_and_sample
from .datafile import dataset_arrays, read_arrays, write_arrays
from .noise import NoiseProcess, make_noise_process
from .rhm import RHM, RHMSample

__all__ = ["DenoiseResult", "denoise", "denoise_memory", "save_denoised", "load_denoised"]

@dataclass(frozen=True)
class DenoiseResult:
    """Output of :func:`denoise`.

    Attributes
    ----------
    process, level, seed : the noise process name, its level and the seed used (the drawn one if None).
    clean : the input data (RHMSample).
    noisy : (N, d) long -- the corrupted tokens (values in ``[0, v]`` for masking).
    posterior : one exact posterior sample per datum (RHMSample: labels, tree, choices).
    marginals : L+1 tensors ``(N, s**l, n_l)``, posterior marginals at every level.
    log_partition : (N,) -- log-likelihood of the evidence (up to the evidence's per-position constants).
    """

    process: str
    level: float
    seed: int
    clean: RHMSample
    noisy: torch.Tensor
    posterior: RHMSample
    marginals: tuple[torch.Tensor, ...]
    log_partition: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Fractions of data whose class the posterior sample keeps, of changed tokens (posterior vs clean),
        the mean posterior probability of the true class, and the mean log-likelihood."""
        true_class = self.marginals[0][:, 0].gather(1, self.clean.labels.view(-1, 1))  # (N, 1)
        return {
            "n": len(self.clean),
            "class_kept": float((self.posterior.labels == self.clean.labels).double().mean()),
            "tokens_changed": float((self.posterior.tokens != self.clean.tokens).double().mean()),
            "p_true_class": float(true_class.double().mean()),
            "mean_log_partition": float(self.log_partition.double().mean()),
        }


def denoise(
    rhm: RHM,
    data: RHMSample,
    process: str | NoiseProcess,
    level: float,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float64,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> DenoiseResult:
    """Noise ``data`` at ``level`` and draw exact posterior samples and marginals.

    Parameters
    ----------
    rhm : the model that generated ``data``.
    data : clean data (N data of length d).
    process : a registered noise-process name ("eps", "uniform", "mask") or a NoiseProcess.
    level : noise level in [0, 1].
    seed : seed of the corruption and of the posterior draws (same seed and batch_size -> same output).
    dtype : floating dtype of BP (float64 default).
    batch_size : rows per BP call (bounds the memory of the temporaries, not of the outputs).
    device : where the leaf evidence is built and BP runs (e.g. ``"cuda"``); default: the device of
        ``data``. Noise and posterior uniforms are drawn on the CPU, so a seed gives the same draws on every
        device; the outputs come back on the device of ``data``.

    Returns
    -------
    DenoiseResult

    Example
    -------
    >>> rhm = RHM(v=8, n_c=8, m=2, s=2, L=3, seed=0)
    >>> res = denoise(rhm, rhm.sample(16, seed=1), "mask", 0.0, seed=0)
    >>> res.summary()["class_kept"]
    1.0
    """
    if not isinstance(rhm, RHM):
        raise ParameterTypeError(f"rhm must be an RHM, got {type(rhm).__name__}")
    if not isinstance(data, RHMSample):
        raise ParameterTypeError(f"data must be an RHMSample, got {type(data).__name__}")
    proc = make_noise_process(process, rhm.v) if isinstance(process, str) else process
    if not isinstance(proc, NoiseProcess):
        raise ParameterTypeError(f"process must be a name or a NoiseProcess, got {type(process).__name__}")
    if proc.v != rhm.v:
        raise ParameterError(f"process vocabulary v={proc.v} does not match the RHM's v={rhm.v}")
    level = check_float("level", level, low=0.0, high=1.0)
    batch_size = check_int("batch_size", batch_size, low=1)
    _check_data(rhm, data)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ParameterTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    check_memory(denoise_memory(rhm, len(data), dtype, batch_size), f"denoising {len(data)} data of {rhm!r}")
    work = resolve_device(device, data.tokens.device)
    gen = make_generator(seed)  # None: a fresh random seed, recorded below
    seed_value = int(gen.initial_seed())
    noisy = proc.corrupt(data.tokens, level, gen)  # (N, d)
    marginals: list[list[torch.Tensor]] = [[] for _ in range(rhm.L + 1)]
    log_z, samples = [], []
    home = data.tokens.device
    for start in range(0, len(data), batch_size):
        batch = noisy[start : start + batch_size].to(work)
        evidence = proc.leaf_evidence(batch, level, dtype=dtype)  # (B, d, v), built on `work`
        res, sample = marginals_and_sample(rhm, evidence, seed=gen, dtype=dtype)  # one upward pass
        for lev, marg in enumerate(res.marginals):
            marginals[lev].append(marg.to(home))
        log_z.append(res.log_partition.to(home))
        samples.append(sample.to(home))
    if samples:
        posterior = RHMSample(
            labels=torch.cat([p.labels for p in samples]),
            tree=tuple(torch.cat(parts) for parts in zip(*(p.tree for p in samples), strict=True)),
            choices=tuple(torch.cat(parts) for parts in zip(*(p.choices for p in samples), strict=True)),
        )
    else:
        posterior = data[:0]
    n_sym = [rhm.n_c] + [rhm.v] * rhm.L
    return DenoiseResult(
        process=proc.name,
        level=level,
        seed=seed_value,
        clean=data,
        noisy=noisy,
        posterior=posterior,
        marginals=tuple(
            torch.cat(parts) if parts else torch.zeros(0, rhm.s**lev, n_sym[lev], dtype=dtype)
            for lev, parts in enumerate(marginals)
        ),
        log_partition=torch.cat(log_z) if log_z else torch.zeros(0, dtype=dtype),
    )


def _check_data(rhm: RHM, data: RHMSample) -> None:
    """``data`` must be data of ``rhm``: shapes, labels in [0, n_c), tokens in [0, v)."""
    n = len(data)
    if tuple(data.tokens.shape) != (n, rhm.d) or len(data.tree) != rhm.L + 1:
        raise ParameterError(
            f"data must be data of {rhm!r} (tokens of shape (N, {rhm.d})), got tokens of shape "
            f"{tuple(data.tokens.shape)} and {len(data.tree) - 1} levels"
        )
    for name, values, high in (("labels", data.labels, rhm.n_c), ("tokens", data.tokens, rhm.v)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= high):
            low_got, high_got = int(values.min()), int(values.max())
            raise ParameterError(f"data.{name} must lie in [0, {high}), got [{low_got}, {high_got}]")


def denoise_memory(rhm: RHM, n: int, dtype: torch.dtype = torch.float64, batch_size: int = 4096) -> int:
    """Estimated peak bytes of :func:`denoise` on ``n`` data: the marginals of every level for all data,
    the noisy tokens and posterior samples (int64), and one batch of evidence and belief propagation."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    marginal_values = n * _n_message_values(rhm)
    tokens = 8 * n * (3 * rhm.n_internal + 2 * rhm.d + 1)
    batch = min(n, batch_size)
    evidence = itemsize * batch * rhm.d * rhm.v
    return itemsize * marginal_values + tokens + evidence + bp_memory(rhm, batch, dtype)


def save_denoised(path: str | os.PathLike, rhm: RHM, result: DenoiseResult) -> Path:
    """Write ``result`` (and the rules of ``rhm``) to ``path`` (.pt or .npz), atomically."""
    arrays = dataset_arrays(rhm, result.posterior)
    arrays.update(
        clean_labels=result.clean.labels,
        clean_tokens=result.clean.tokens,
        noisy=result.noisy,
        log_partition=result.log_partition,
        level=torch.tensor(result.level, dtype=torch.float64),
        seed=torch.tensor(result.seed, dtype=torch.long),
        # The process name as UTF-8 bytes: every entry stays a plain array, readable by load_dataset.
        process=torch.tensor(list(result.process.encode("utf-8")), dtype=torch.uint8),
    )
    for lev, marg in enumerate(result.marginals):
        arrays[f"marginals_{lev}"] = marg
    return write_arrays(path, arrays, name="out")


def load_denoised(path: str | os.PathLike) -> dict[str, torch.Tensor | str | float | int]:
    """Read a file written by :func:`save_denoised` into a dict of tensors (``process`` as str,
    ``level`` as float, ``seed`` as int). Never unpickles code."""
    out: dict[str, torch.Tensor | str | float | int] = dict(read_arrays(path, name="path"))
    missing = [k for k in ("process", "level", "seed", "noisy", "marginals_0") if k not in out]
    if missing:
        raise InputDataError(f"{str(path)!r} is not a denoise output file (missing {missing})")
    out["process"] = bytes(out["process"].tolist()).decode("utf-8")
    out["level"] = float(out["level"])
    out["seed"] = int(out["seed"])
    return out
