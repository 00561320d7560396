"""Fine-tuning an image encoder under a frozen classification head, non-linearly or in the tangent space.

The recipe of both papers (Ilharco et al.; Ortiz-Jimenez et al.; Wang et al.): the classification head of
each task is fixed (CLIP zero-shot head, or class prototypes) and only the encoder is trained, with AdamW,
a linear warm-up and a cosine decay. ``linearized=True`` trains ``theta`` of
:class:`~layerwise.tangent.linearize.LinearizedModel` instead of the network itself. The result is a state
dict of the encoder (``theta``; buffers from ``theta0`` for the linearized model), so that fine-tunes can
be stored with :func:`~layerwise.editing.checkpoints.save_checkpoint` and merged by ``layerwise merge``.

Example
-------
>>> enc, head = torch.nn.Linear(4, 3), torch.nn.Identity()
>>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
>>> r = finetune(enc, head, (x, y), FinetuneConfig(steps=5, batch_size=8, lr=1e-2, warmup_steps=1))
>>> sorted(r.state), len(r.losses)
(['bias', 'weight'], 5)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._validation import check_float, check_int
from ..editing.task_vector import TaskVector
from ..errors import InputDataError, ParameterError, ParameterTypeError
from .linearize import LinearizedModel

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "warmup_cosine", "predict"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning hyper-parameters (defaults: the papers' CLIP recipe, except ``steps``).

    Attributes
    ----------
    steps : optimizer steps. batch_size : images per step. lr : peak learning rate (AdamW).
    weight_decay : AdamW decoupled weight decay. warmup_steps : linear warm-up from 0 to ``lr``, then
    cosine decay to 0 at ``steps``. linearized : train in the tangent space. seed : batch order.
    grad_clip : max global gradient norm (None: no clipping).
    """

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    linearized: bool = False
    seed: int = 0
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        check_int("steps", self.steps, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_int("seed", self.seed, low=0)
        if not isinstance(self.linearized, bool):
            raise ParameterTypeError(f"linearized must be true or false, got {self.linearized!r}")
        if self.grad_clip is not None:
            check_float("grad_clip", self.grad_clip, low=0.0, low_open=True)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-serialisable)."""
        return asdict(self)


@dataclass
class FinetuneResult:
    """``state``: the fine-tuned encoder's state dict; ``losses``: training loss per step."""

    state: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    pretrained: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def task_vector(self) -> TaskVector:
        """``theta - theta0`` over the floating-point tensors."""
        return TaskVector(self.pretrained, self.state)


def warmup_cosine(step: int, steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based): ``(step + 1) / warmup`` during warm-up, then
    ``0.5 (1 + cos(pi * progress))`` with progress from 0 (end of warm-up) to 1 (``steps``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(data: Any, batch_size: int, gen: torch.Generator) -> Iterator[tuple[Any, torch.Tensor]]:
    """Endless shuffled mini-batches from ``(x, y)`` tensors or a map-style Dataset of ``(x, y)`` pairs."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        x, y = data
        if not isinstance(x, torch.Tensor) or x.shape[0] != y.shape[0] or y.ndim != 1 or y.shape[0] == 0:
            raise InputDataError(
                f"data must be (x (N, ...), y (N,)) tensors with N > 0, got {getattr(x, 'shape', x)} and "
                f"{tuple(y.shape)}"
            )
        while True:
            perm = torch.randperm(x.shape[0], generator=gen)
            for i in range(0, x.shape[0] - batch_size + 1 if x.shape[0] >= batch_size else 1, batch_size):
                idx = perm[i : i + batch_size]
                yield x[idx], y[idx]
    elif isinstance(data, torch.utils.data.Dataset):
        if len(data) == 0:  # type: ignore[arg-type]
            raise InputDataError("data: the dataset is empty")
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)
        while True:
            yield from loader
    else:
        raise ParameterTypeError(
            f"data must be a pair of tensors (x, y) or a torch Dataset of (x, y), got {type(data).__name__}"
        )


def finetune(
    encoder: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    data: Any,
    config: FinetuneConfig,
    *,
    progress: bool = False,
    desc: str = "fine-tuning",
    callback: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``encoder`` (copied; the argument is not modified) to minimise the cross-entropy of
    ``head(encoder(x))`` on ``data``; the head is frozen.

    Parameters
    ----------
    encoder : image encoder ``(N, ...) -> (N, D)`` at the pre-trained weights ``theta0``.
    head : frozen map ``(N, D) -> (N, C)`` logits (e.g. :class:`~layerwise.tangent.toy_models.PrototypeHead`).
    data : ``(x (N, ...), y (N,))`` tensors or a map-style Dataset of ``(x, y)``.
    config : :class:`FinetuneConfig`.
    progress : show a progress bar. callback : called as ``callback(step, loss)`` after each step.

    Returns
    -------
    FinetuneResult with the encoder's fine-tuned state dict (same keys as ``encoder.state_dict()``).
    """
    if not isinstance(encoder, nn.Module):
        raise ParameterTypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    if not isinstance(config, FinetuneConfig):
        raise ParameterTypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    if isinstance(head, nn.Module):
        head = copy.deepcopy(head).eval().requires_grad_(False)
    with torch.enable_grad():  # also when called under no_grad (e.g. lazily, from an evaluation)
        return _train(encoder, head, data, config, progress, desc, callback, pretrained)


def _train(encoder, head, data, config, progress, desc, callback, pretrained) -> FinetuneResult:
    from tqdm.auto import tqdm

    if config.linearized:
        model: nn.Module = LinearizedModel(encoder)
        params = [p for p in model.model.parameters() if p.requires_grad]
    else:
        model = copy.deepcopy(encoder).train()
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ParameterError("encoder has no trainable parameters (all have requires_grad=False)")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, config.steps, config.warmup_steps)
    )
    gen = torch.Generator().manual_seed(config.seed)
    device = params[0].device
    losses = []
    batches = _batches(data, config.batch_size, gen)
    for step in tqdm(range(config.steps), desc=desc, disable=not progress, leave=False):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        try:
            logits = head(model(x))
        except RuntimeError as err:
            if step:
                raise
            raise InputDataError(
                f"data: a batch of shape {tuple(x.shape)} does not fit the encoder and head: "
                f"{str(err).splitlines()[0]}"
            ) from None
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
    if config.linearized:
        state = model.theta()  # type: ignore[operator]
    else:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return FinetuneResult(state=state, losses=losses, pretrained=pretrained)


@torch.no_grad()
def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_size: int = 512,
) -> torch.Tensor:
    """``head(model(x))`` in batches, without gradients: logits (N, C). ``model`` may be linearized (its
    jvp runs without building a graph)."""
    was = getattr(model, "training", None)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        return torch.cat([head(model(x[i : i + batch_size])) for i in range(0, x.shape[0], batch_size)])
    finally:
        if isinstance(model, nn.Module) and was is not None:
            model.train(was)
