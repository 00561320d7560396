"""A seeded trainer for the RHM classifiers: SGD or Adam, constant or cosine learning rate, cross-entropy,
stopping at a training-loss threshold or at the epoch budget; CPU or CUDA.

Same seed, same data and same device give the same trained weights (mini-batch order is drawn from a CPU
generator seeded by ``seed``, so it is the same on every device).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..._device import resolve_device
from ..._validation import check_choice, check_float, check_int, make_generator

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig", "TrainResult", "train", "evaluate"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings.

    Attributes
    ----------
    optimizer : ``"sgd"`` (with ``momentum``) or ``"adam"``.
    lr : learning rate (> 0); momentum : SGD momentum in [0, 1); weight_decay : L2 penalty (>= 0).
    schedule : ``"constant"`` or ``"cosine"`` (decays to 0 over ``epochs * batches_per_epoch`` steps).
    epochs : epoch budget (>= 1).
    batch_size : mini-batch size (>= 1; clipped to the training-set size).
    loss_threshold : stop as soon as an epoch's mean training loss is below it (None: run the budget).
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    epochs: int = 100
    batch_size: int = 128
    loss_threshold: float | None = 1e-3

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("momentum", self.momentum, low=0.0, high=1.0)
        if self.momentum >= 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_int("epochs", self.epochs, low=1)
        check_int("batch_size", self.batch_size, low=1)
        if self.loss_threshold is not None:
            check_float("loss_threshold", self.loss_threshold, low=0.0, low_open=True)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did: epochs and optimizer steps run, the last epoch's mean training loss, the
    per-epoch mean losses, whether the loss threshold was reached, and the wall time in seconds."""

    epochs: int
    steps: int
    train_loss: float
    history: tuple[float, ...]
    converged: bool
    seconds: float


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if y.dtype != torch.long or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need x (N, ...) and long labels y (N,) with N >= 1, got x {tuple(x.shape)}, "
                         f"y {y.dtype} {tuple(y.shape)}")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig | None = None,
    *,
    seed: int | torch.Generator | None = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` on ``(x, y)`` with cross-entropy; the model is moved to ``device`` and trained there.

    Parameters
    ----------
    model : maps ``x`` (N, ...) to logits (N, n_c).
    x : inputs (N, ...), e.g. one-hot (N, v, d); y : (N,) long class labels.
    config : :class:`TrainConfig` (defaults if None).
    seed : seed of the mini-batch order.
    device : where to train (``"cpu"``, ``"cuda"``...); data are moved there once.
    progress : show a tqdm bar over epochs (with the current loss).
    """
    config = config if config is not None else TrainConfig()
    _check_data(x, y)
    device = resolve_device(device)
    gen = make_generator(seed)
    model.to(device)
    model.train()
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    batch = min(config.batch_size, n)
    per_epoch = math.ceil(n / batch)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                                     weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * per_epoch
    sched = None
    if config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    from tqdm.auto import tqdm

    bar = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    history: list[float] = []
    steps, converged, start = 0, False, time.perf_counter()
    for _ in bar:
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for k in range(per_epoch):
            idx = order[k * batch : (k + 1) * batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach().double() * idx.numel()
            steps += 1
        history.append(float(total) / n)
        bar.set_postfix(loss=f"{history[-1]:.3g}")
        if config.loss_threshold is not None and history[-1] < config.loss_threshold:
            converged = True
            break
    bar.close()
    return TrainResult(epochs=len(history), steps=steps, train_loss=history[-1], history=tuple(history),
                       converged=converged, seconds=round(time.perf_counter() - start, 4))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Mean cross-entropy and classification error of ``model`` on ``(x, y)`` (on the model's device)."""
    _check_data(x, y)
    batch_size = check_int("batch_size", batch_size, low=1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss = wrong = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        logits = model(xb)
        loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        wrong += float((logits.argmax(1) != yb).sum())
    model.train(was_training)
    return {"loss": loss / x.shape[0], "error": wrong / x.shape[0]}
