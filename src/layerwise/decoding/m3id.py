"""M3ID: mutual-information decoding against visual hallucination (Favero et al., CVPR 2024).

Paper: "Multi-Modal Hallucination Control by Visual Information Grounding", https://arxiv.org/abs/2403.14003

The rule (paper, Sec. 3): with ``l_c = log p(y_t | y_<t, x, c)`` (with the image ``c``) and
``l_u = log p(y_t | y_<t, x)`` (without it), a fading-memory model ``l_c = gamma_t l* + (1 - gamma_t) l_u``
with ``gamma_t = exp(-lambda (t + t0))`` gives the grounded scores

    l*_t = l_c + 1[max_k l_c,k < log alpha] * ((1 - gamma_t) / gamma_t) * (l_c - l_u)

where ``t`` counts generated tokens; ``(1 - gamma)/gamma = exp(lambda (t + t0)) - 1`` grows without bound, so
an optional ``max_weight`` clamps it. The gate applies the correction only when the model is unsure.

Option (off by default, not in the paper): ``plausibility = beta`` keeps, on corrected rows, only tokens with
``p_c >= beta * max p_c`` (the adaptive plausibility constraint of VCD, Leng et al. 2024), which stops a large
weight from promoting tokens that are merely less unlikely with the image than without it.

:func:`m3id_scores` is the formula as a pure function; :class:`M3IDLogitsProcessor` plugs it into Hugging
Face ``generate`` (greedy and sampling) by running its own image-free forward pass with its own KV cache.

Where in the chain: the rule acts on the model's conditional and unconditional log-probabilities, so
M3ID comes *first*, before every other logits processor or sampling transform (bad words, repetition
penalty, temperature, top-k/top-p). Both decoding paths of :func:`layerwise.decoding.m3id_generate` do
this: the batched loop applies M3ID and then ``generate``'s processors; the processor path attaches the
processor to the model's output (:meth:`M3IDLogitsProcessor.attach`), because ``generate`` always runs
its own processors before any user-supplied one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .._validation import check_float
from ..errors import ParameterError, ParameterTypeError
from ._hf import forward_step, positions_from_mask

__all__ = ["m3id_weight", "m3id_scores", "M3IDLogitsProcessor", "check_m3id_params", "check_plausibility"]


def check_plausibility(plausibility: float | None) -> float | None:
    """Validate the optional plausibility cutoff (None or a number in (0, 1])."""
    return (
        None
        if plausibility is None
        else check_float("plausibility", plausibility, low=0.0, high=1.0, low_open=True)
    )


def check_m3id_params(
    lambda_: float, alpha: float, t0: float, max_weight: float | None
) -> tuple[float, float, float, float | None]:
    """Validate the M3ID hyper-parameters at a public boundary; return them as floats."""
    lambda_ = check_float("lambda_", lambda_, low=0.0)
    alpha = check_float("alpha", alpha, low=0.0, high=1.0)
    t0 = check_float("t0", t0, low=0.0)
    if max_weight is not None:
        max_weight = check_float("max_weight", max_weight, low=0.0)
    return lambda_, alpha, t0, max_weight


def m3id_weight(t: int, lambda_: float = 0.02, t0: float = 0.0, max_weight: float | None = None) -> float:
    """The correction weight ``(1 - gamma_t) / gamma_t = exp(lambda (t + t0)) - 1``, optionally clamped.

    Example
    -------
    >>> round(m3id_weight(200, lambda_=0.02), 1)
    53.6
    >>> m3id_weight(200, lambda_=0.02, max_weight=5.0)
    5.0
    """
    w = math.expm1(lambda_ * (t + t0))  # expm1: exact near 0, where the weight matters most
    return w if max_weight is None else min(w, max_weight)


def m3id_scores(
    cond_logprobs: torch.Tensor,
    uncond_logprobs: torch.Tensor,
    t: int,
    *,
    lambda_: float = 0.02,
    alpha: float = 0.3,
    t0: float = 0.0,
    max_weight: float | None = None,
    plausibility: float | None = None,
) -> torch.Tensor:
    """Apply the gated M3ID rule to log-probabilities.

    Parameters
    ----------
    cond_logprobs : (batch, vocab) log-softmax scores with the condition (image); ``-inf`` entries (tokens
        masked by earlier processors) stay ``-inf``.
    uncond_logprobs : (batch, vocab) log-softmax scores of the same model without the condition.
    t : number of tokens generated so far (0 at the first generated token).
    lambda_, alpha, t0, max_weight : the rule's parameters (see the module docstring).
    plausibility : optional cutoff ``beta`` in (0, 1]: on corrected rows, tokens with ``p_c < beta max p_c``
        get ``-inf`` (off by default; see the module docstring).

    Returns
    -------
    (batch, vocab) float tensor ``l*`` (not normalised; take argmax or softmax of it).

    Example
    -------
    >>> lc = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    >>> lu = torch.log(torch.tensor([[0.1, 0.4, 0.5]]))
    >>> m3id_scores(lc, lu, t=0).equal(lc)          # t = 0, t0 = 0: weight 0, unchanged
    True
    >>> m3id_scores(lc, lu, t=50, alpha=0.6).argmax().item()   # unsure (0.5 < 0.6) and token 0 is visual
    0
    """
    if cond_logprobs.shape != uncond_logprobs.shape:
        raise ParameterError(
            f"cond_logprobs and uncond_logprobs must have the same shape, got {tuple(cond_logprobs.shape)} "
            f"and {tuple(uncond_logprobs.shape)}"
        )
    w = m3id_weight(t, lambda_, t0, max_weight)
    if w == 0.0 or alpha == 0.0:
        return cond_logprobs.clone()
    log_alpha = math.log(alpha)
    gate = cond_logprobs.max(dim=-1, keepdim=True).values < log_alpha  # (batch, 1): the model is unsure
    keep = gate & torch.isfinite(cond_logprobs)  # never turn a masked token (-inf) into NaN
    out = torch.where(keep, cond_logprobs + w * (cond_logprobs - uncond_logprobs), cond_logprobs)
    if plausibility is not None:
        floor = cond_logprobs.max(dim=-1, keepdim=True).values + math.log(plausibility)  # (batch, 1)
        out = out.masked_fill(gate & (cond_logprobs < floor), -math.inf)
    return out


class M3IDLogitsProcessor:
    """A Hugging Face logits processor applying M3ID, with its own image-free forward pass and KV cache.

    Use it with greedy decoding or sampling, one processor per ``generate`` call: ``with proc.attach():
    model.generate(...)`` applies M3ID before ``generate``'s own processors, as the paper's rule does (see
    :meth:`attach`); ``model.generate(..., logits_processor=LogitsProcessorList([proc]))`` also works but
    sees the scores after them. The image-free branch runs the same ``model`` on
    ``unconditional_inputs`` (first call: the whole prompt; then one token per step) with a cache that it
    creates itself, so ``generate``'s cache is never touched. Left padding is handled through position ids
    ``cumsum(mask) - 1``. With ``num_return_sequences = k`` the unconditional rows are repeated ``k`` times.
    Beam search is refused: it reorders rows, which a private cache cannot follow.

    Parameters
    ----------
    model : a transformers causal LM or Llava-family model (the one passed to ``generate``).
    unconditional_inputs : mapping with ``input_ids`` (batch, length_u), optional ``attention_mask``
        (batch, length_u) and optional ``position_ids`` (batch, length_u) (given when image positions are
        kept, see :func:`layerwise.decoding.unconditional_inputs`). Build it with that function.
    lambda_ : forgetting rate (>= 0); 0 disables M3ID.
    alpha : gate threshold in [0, 1]; the correction applies when ``max p_c < alpha``; 0 disables M3ID.
    t0 : offset of the step count (0 for captioning, about the question length for VQA).
    max_weight : optional clamp of the weight ``exp(lambda (t + t0)) - 1``.
    plausibility : optional cutoff (see :func:`m3id_scores`; off by default, as in the paper).

    Attributes
    ----------
    weights_ : list of the weights used at each step (for inspection).

    Example
    -------
    >>> unc = unconditional_inputs(inputs, image_token_id=model.config.image_token_id)  # doctest: +SKIP
    >>> proc = M3IDLogitsProcessor(model, unc, lambda_=0.02, alpha=0.3)     # doctest: +SKIP
    >>> with proc.attach():                                                 # doctest: +SKIP
    ...     out = model.generate(**inputs, bad_words_ids=[[5]])
    """

    def __init__(
        self,
        model: Any,
        unconditional_inputs: Mapping[str, torch.Tensor],
        lambda_: float = 0.02,
        alpha: float = 0.3,
        t0: float = 0.0,
        max_weight: float | None = None,
        plausibility: float | None = None,
    ) -> None:
        self.lambda_, self.alpha, self.t0, self.max_weight = check_m3id_params(lambda_, alpha, t0, max_weight)
        self.plausibility = check_plausibility(plausibility)
        if not isinstance(unconditional_inputs, Mapping) or "input_ids" not in unconditional_inputs:
            raise ParameterTypeError(
                "unconditional_inputs must be a mapping with 'input_ids' (and optionally 'attention_mask', "
                f"'position_ids'), got {type(unconditional_inputs).__name__}"
            )
        ids = unconditional_inputs["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            raise ParameterError(f"unconditional_inputs['input_ids'] must be a 2-D tensor, got {ids!r}")
        mask = unconditional_inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.device).long()
        pos = unconditional_inputs.get("position_ids")
        pos = positions_from_mask(mask) if pos is None else pos.to(ids.device).long()
        if mask.shape != ids.shape or pos.shape != ids.shape:
            raise ParameterError(
                "unconditional_inputs: attention_mask and position_ids must have the shape of input_ids "
                f"{tuple(ids.shape)}, got {tuple(mask.shape)} and {tuple(pos.shape)}"
            )
        self.model = model
        self._ids, self._mask, self._pos = ids, mask, pos
        self._cache: Any = None
        self._prompt_len: int | None = None
        self._prev: torch.Tensor | None = None
        self._hook_handle: Any = None
        self._in_own_forward = False
        self.weights_: list[float] = []

    def _unconditional_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, vocab) log p(. | y_<t, x) from the image-free branch, advancing its private cache."""
        if self._prompt_len is None:  # first call: run the whole unconditional prompt
            n, b = input_ids.shape[0], self._ids.shape[0]
            if n != b:
                if n % b:
                    raise ParameterError(
                        f"generate has {n} rows but unconditional_inputs has {b}; beam search is not "
                        "supported by M3IDLogitsProcessor (use greedy or sampling)"
                    )
                # num_return_sequences = k: generate repeats each prompt k times (repeat_interleave)
                k = n // b
                self._ids, self._mask, self._pos = (
                    x.repeat_interleave(k, dim=0) for x in (self._ids, self._mask, self._pos)
                )
            self._prompt_len = input_ids.shape[1]
            ids, pos = self._ids, self._pos
        else:
            prev = self._prev
            if input_ids.shape[1] != prev.shape[1] + 1 or not torch.equal(input_ids[:, :-1], prev):
                raise ParameterError(
                    "M3IDLogitsProcessor saw rows that do not extend the previous step's rows: beam search "
                    "(or reuse of one processor across generate calls) is not supported; use greedy "
                    "decoding or sampling and a new processor per generate call"
                )
            ids = input_ids[:, -1:]
            self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
            pos = self._pos[:, -1:] + 1
            self._pos = pos
        self._prev = input_ids
        self._in_own_forward = True
        try:
            with torch.no_grad():
                logits, self._cache = forward_step(
                    self.model, ids.to(input_ids.device), self._mask, pos, self._cache
                )
        finally:
            self._in_own_forward = False
        return torch.log_softmax(logits, dim=-1)

    @contextlib.contextmanager
    def attach(self) -> Iterator[M3IDLogitsProcessor]:
        """Apply M3ID to the model's own output logits, *before* any of ``generate``'s logits processors.

        Inside the ``with`` block, a forward hook on ``model`` replaces the last-position logits of every
        forward pass that ``generate`` runs by the M3ID scores (computed from the raw conditional
        log-probabilities and this processor's image-free branch). ``generate``'s own processors
        (``bad_words_ids``, repetition penalty, temperature, top-k, ...) then act on the M3ID scores, exactly
        as in the batched path (:func:`layerwise.decoding.m3id_custom_generate`). Do not also pass the
        processor in ``logits_processor``. ``output_scores``/``output_logits`` then report M3ID scores.

        Example
        -------
        >>> with M3IDLogitsProcessor(model, unc).attach():          # doctest: +SKIP
        ...     out = model.generate(**inputs, bad_words_ids=[[5]])  # doctest: +SKIP
        """
        if self._hook_handle is not None:
            raise RuntimeError("this M3IDLogitsProcessor is already attached to its model")
        self._hook_handle = self.model.register_forward_hook(self._output_hook, with_kwargs=True)
        try:
            yield self
        finally:
            self._hook_handle.remove()
            self._hook_handle = None

    def _output_hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._in_own_forward:  # the image-free branch's own forward pass: leave it alone
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ParameterError("M3IDLogitsProcessor.attach needs generate to pass input_ids to the model")
        # generate feeds the whole prompt first, then one new token per step (the rest is in its cache)
        full = ids if self._prev is None else torch.cat([self._prev, ids[:, -1:].to(self._prev.device)], 1)
        logits = output.logits  # (batch, positions, vocab); generate reads the last position
        scores = self(full, logits[:, -1])
        new = logits.float().clone()
        new[:, -1] = scores.to(new.device)
        output.logits = new
        return output

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids: (batch, length) so far; scores: (batch, vocab) -> M3ID scores (batch, vocab).

        Used in ``logits_processor=[...]``, the processor sees the scores *after* the processors that
        ``generate`` builds from its own arguments (they always come first in ``generate``'s chain); with
        any such processor active, use :meth:`attach` instead so that M3ID acts on the model's
        log-probabilities as the paper's rule does.
        """
        cond = torch.log_softmax(scores.float(), dim=-1)
        uncond = self._unconditional_logprobs(input_ids)
        t = input_ids.shape[1] - self._prompt_len
        self.weights_.append(m3id_weight(t, self.lambda_, self.t0, self.max_weight))
        return m3id_scores(
            cond,
            uncond,
            t,
            lambda_=self.lambda_,
            alpha=self.alpha,
            t0=self.t0,
            max_weight=self.max_weight,
            plausibility=self.plausibility,
        )
