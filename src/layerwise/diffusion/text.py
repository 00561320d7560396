"""Forward-backward experiments with a masked diffusion language model (Hugging Face masked-LM interface).

Sclocchi, Favero, Levi, Wyart, "Probing the latent hierarchical structure of data via diffusion models",
ICLR 2025 (text: a masked diffusion LM, 128-token passages, many maskings per level, chi over r <= 10).

* Forward: :class:`TokenMasking` masks every (non-protected) token independently with probability ``t``.
* Backward: :class:`MaskedLMDenoiser`, a mask-predict sampler over any ``AutoModelForMaskedLM``. With
  ``strategy="ancestral"`` it is the MDLM reverse process (Sahoo et al., NeurIPS 2024, eq. 7 with the
  linear schedule): going from time ``t_k`` to ``t_{k+1}`` over ``n_steps`` equal steps, each still-masked
  token is revealed with probability ``(t_k - t_{k+1}) / t_k = 1 / (n_steps - k)``, its value drawn from
  the model's prediction, and never re-masked. With ``strategy="confidence"`` it is mask-predict
  (Ghazvininejad et al., EMNLP 2019): tokens are drawn at every masked position and the most confident ones
  are kept, so that the masked count falls linearly to zero.
* Observables: the 0/1 token changes go through :func:`layerwise.hierarchy.forward_backward.forward_backward`
  and :mod:`layerwise.hierarchy.observables` (C(r), chi, correlation length) unchanged.

``transformers`` is needed only to load a checkpoint (:meth:`MaskedLMDenoiser.from_pretrained`); it is in
the ``hf`` / ``diffusion`` extras.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._device import resolve_device
from .._validation import check_choice, check_float, check_int, make_generator
from ..errors import MissingExtraError, ParameterError, ParameterTypeError
from ..hierarchy.forward_backward import ForwardBackwardResult, forward_backward

__all__ = ["TokenMasking", "MaskedLMDenoiser", "passages_from_text", "text_forward_backward"]


class TokenMasking:
    """Absorbing (masking) forward process on a real tokenizer's ids.

    Parameters
    ----------
    mask_id : the tokenizer's mask token id.
    protected_ids : ids never masked (special tokens such as BOS/EOS/PAD/CLS/SEP).
    """

    name = "mask"

    def __init__(self, mask_id: int, protected_ids: Sequence[int] = ()) -> None:
        self.mask_id = check_int("mask_id", mask_id, low=0)
        self.protected_ids = tuple(check_int("protected_ids entry", i, low=0) for i in protected_ids)

    def __repr__(self) -> str:
        return f"TokenMasking(mask_id={self.mask_id}, protected_ids={self.protected_ids})"

    def corrupt(
        self, x0: torch.Tensor, level: float, generator: torch.Generator | int | None = None
    ) -> torch.Tensor:
        """Mask each non-protected token of ``x0`` (N, d) independently with probability ``level``."""
        level = check_float("level", level, low=0.0, high=1.0)
        if not isinstance(x0, torch.Tensor) or x0.dtype != torch.long or x0.dim() != 2:
            got = getattr(x0, "dtype", type(x0).__name__)
            raise ParameterTypeError(f"x0 must be an (N, d) long tensor, got {got}")
        gen = make_generator(generator)
        hit = torch.rand(x0.shape, generator=gen, dtype=torch.float64) < level
        if self.protected_ids:
            hit &= ~torch.isin(x0, torch.tensor(self.protected_ids, dtype=torch.long))
        return torch.where(hit, torch.full_like(x0, self.mask_id), x0)


class MaskedLMDenoiser:
    """Mask-predict sampler over a masked language model (a :class:`Denoiser` for real text).

    Parameters
    ----------
    model : a module mapping ``input_ids`` (B, d) to an output with ``.logits`` (B, d, V), e.g. any
        ``transformers.AutoModelForMaskedLM``; put it on its device and in eval mode beforehand.
    mask_id : the mask token id.
    n_steps : denoising steps from the noise level back to 0 (>= 1; 1 = reveal everything at once).
    strategy : ``"ancestral"`` (MDLM reverse process) or ``"confidence"`` (mask-predict).
    temperature : softmax temperature of the token draws (> 0).
    forbidden_ids : ids never produced (the mask and special tokens).
    batch_size : sequences per model call.

    Example
    -------
    >>> den = MaskedLMDenoiser.from_pretrained("path/to/mlm")            # doctest: +SKIP
    >>> proc = TokenMasking(den.mask_id, den.forbidden_ids)              # doctest: +SKIP
    >>> x_hat = den.sample_x0(proc.corrupt(ids, 0.5, gen), proc, 0.5, gen)   # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        mask_id: int,
        n_steps: int = 16,
        strategy: str = "ancestral",
        temperature: float = 1.0,
        forbidden_ids: Sequence[int] = (),
        batch_size: int = 16,
    ) -> None:
        if not callable(model):
            raise ParameterTypeError(f"model must be callable (input_ids -> output with .logits), "
                                     f"got {type(model).__name__}")
        self.model = model
        self.mask_id = check_int("mask_id", mask_id, low=0)
        self.n_steps = check_int("n_steps", n_steps, low=1)
        self.strategy = check_choice("strategy", strategy, ("ancestral", "confidence"))
        self.temperature = check_float("temperature", temperature, low=0.0, low_open=True)
        self.forbidden_ids = tuple(sorted({self.mask_id, *(check_int("forbidden_ids entry", i, low=0)
                                                           for i in forbidden_ids)}))
        self.batch_size = check_int("batch_size", batch_size, low=1)

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        tokenizer: str | None = None,
        mask_id: int | None = None,
        trust_remote_code: bool = False,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> MaskedLMDenoiser:
        """Load ``AutoModelForMaskedLM`` and its tokenizer from a folder (or hub id) and wrap them.

        Parameters
        ----------
        path : the checkpoint folder or hub id (a local-looking path that does not exist raises
            InputDataError "folder not found" without network access).
        tokenizer : where to load the tokenizer from (default: ``path``), e.g. ``"gpt2"`` for MDLM models.
        mask_id : the mask token id (default: the tokenizer's mask token; MDLM checkpoints use an extra
            id past the GPT-2 vocabulary, 50257, and their tokenizer has no mask token).
        trust_remote_code : run the checkpoint's own Python code (off by default; MDLM checkpoints need it).
        device, torch_dtype : where and in which dtype to put the model.
        kwargs : passed to the constructor (n_steps, strategy, temperature, batch_size).

        Notes
        -----
        The tokenizer's special tokens become ``forbidden_ids``; it is kept as ``.tokenizer``.
        """
        device = resolve_device(device)  # before anything is loaded
        try:
            from transformers import AutoModelForMaskedLM, AutoTokenizer
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise MissingExtraError("MaskedLMDenoiser.from_pretrained needs transformers: "
                                    "pip install 'layerwise[hf]'") from err
        from ..decoding._hf import model_source

        path = model_source(path, "checkpoint")  # a missing local folder: "folder not found", no network
        tok_source = model_source(tokenizer, "tokenizer") if tokenizer is not None else path
        tok = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=trust_remote_code)
        if mask_id is None:
            mask_id = tok.mask_token_id
        if mask_id is None:
            source = tokenizer or path
            raise ParameterError(f"mask_id must be given: the tokenizer of {source!r} has no mask token")
        load_kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if torch_dtype is not None:
            load_kw["dtype"] = torch_dtype
        model = AutoModelForMaskedLM.from_pretrained(path, **load_kw).to(device).eval()
        special = [i for i in tok.all_special_ids if i is not None]
        den = cls(model, mask_id, forbidden_ids=special, **kwargs)
        den.tokenizer = tok
        return den

    # ----------------------------------------------------------------------------------------- sampling
    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        # Only input_ids: every position attends everywhere (the default), and models whose forward takes
        # no attention mask (e.g. MDLM's) work too.
        out = self.model(input_ids=ids)
        logits = out.logits if hasattr(out, "logits") else out[0]  # (B, d, V)
        logits = logits.float() / self.temperature
        forbidden = [i for i in self.forbidden_ids if i < logits.shape[-1]]
        logits[..., forbidden] = -torch.inf
        return logits

    def _denoise_batch(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        masked0 = x == self.mask_id  # (B, d)
        n_masked0 = masked0.sum(1)  # (B,)
        for k in range(self.n_steps):
            masked = x == self.mask_id
            if not masked.any():
                break
            logits = self._logits(x)  # (B, d, V)
            probs = torch.softmax(logits[masked], dim=-1)  # (n_masked, V)
            draw = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (n_masked,)
            proposal = x.clone()
            proposal[masked] = draw
            if self.strategy == "ancestral":
                # MDLM: reveal each masked token with probability 1 / (n_steps - k); the last step: all.
                u = torch.rand(x.shape, generator=gen, device=x.device)
                reveal = masked & (u * (self.n_steps - k) < 1.0)
            else:
                # Mask-predict: keep masked a linearly shrinking number, the least confident draws.
                score = torch.full(x.shape, torch.inf, device=x.device)
                score[masked] = probs.gather(1, draw[:, None]).squeeze(1)
                keep_masked = (n_masked0 * (self.n_steps - 1 - k)) // self.n_steps  # (B,)
                rank = score.argsort(dim=1).argsort(dim=1)  # 0 = least confident
                reveal = masked & (rank >= keep_masked[:, None])
            x = torch.where(reveal, proposal, x)
        return x

    def sample_x0(
        self, x_t: torch.Tensor, process: Any, level: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Fill every mask of ``x_t`` (N, d) long; returns (N, d) long on the CPU.

        ``process`` and ``level`` are accepted for the :class:`Denoiser` protocol; the sampler only needs
        to know which tokens are masked.
        """
        if not isinstance(x_t, torch.Tensor) or x_t.dtype != torch.long or x_t.dim() != 2:
            got = getattr(x_t, "dtype", type(x_t).__name__)
            raise ParameterTypeError(f"x_t must be an (N, d) long tensor, got {got}")
        gen = make_generator(generator)
        device = self._device()
        # Draws happen on the model's device with a generator seeded from ``gen``: same seed, same result.
        dev_gen = torch.Generator(device=device)
        dev_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        out = []
        for start in range(0, x_t.shape[0], self.batch_size):
            out.append(self._denoise_batch(x_t[start : start + self.batch_size].to(device), dev_gen).cpu())
        return torch.cat(out)


def passages_from_text(
    tokenizer: Any, text: str, length: int = 128, n_passages: int | None = None
) -> torch.Tensor:
    """Cut a text into consecutive passages of ``length`` tokens (no special tokens added).

    Returns
    -------
    (n, length) long; the tail shorter than ``length`` is dropped. Raises when no passage fits.
    """
    length = check_int("length", length, low=2)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // length
    if n_passages is not None:
        n = min(n, check_int("n_passages", n_passages, low=1))
    if n == 0:
        raise ParameterError(f"text has {len(ids)} tokens, fewer than one passage of length={length}")
    return torch.tensor(ids[: n * length], dtype=torch.long).reshape(n, length)  # (n, length)


def text_forward_backward(
    denoiser: MaskedLMDenoiser,
    input_ids: torch.Tensor,
    levels: Sequence[float],
    n_trajectories: int,
    *,
    seed: int | None = 0,
    protected_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> ForwardBackwardResult:
    """Forward-backward at mask fractions ``levels`` on passages ``input_ids`` (N, d); streams observables.

    Each level's :class:`~layerwise.hierarchy.forward_backward.LevelResult` carries the token change
    probability and a :class:`~layerwise.hierarchy.observables.ChangeStatistics` (C_ij, C(r), chi).
    ``protected_ids`` defaults to the denoiser's forbidden ids (special tokens are never masked).
    """
    protected = denoiser.forbidden_ids if protected_ids is None else protected_ids
    process = TokenMasking(denoiser.mask_id, protected)
    return forward_backward(input_ids, process, levels, n_trajectories, denoiser, seed=seed,
                            keep_trajectories=False, batch_size=denoiser.batch_size * 8, progress=progress)
