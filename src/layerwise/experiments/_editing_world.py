"""Shared set-up of the ``task-arithmetic`` and ``lines`` experiments: a small encoder pre-trained on a broad
task, frozen prototype heads, and fine-tunes on downstream tasks (non-linear and linearized), cached per
process so that running both experiments together pre-trains and fine-tunes once.

Not public API: experiment logic only. The library pieces are in :mod:`layerwise.editing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..tangent.finetune import FinetuneConfig, finetune
from ..tangent.linearize import linearized_jvp
from ..tangent.toy_models import PrototypeHead, build_encoder, class_prototypes
from ..tangent.toy_tasks import ImageTask, make_tasks, pretrain_encoder

CONTROL = "upright"
MODES = ("nonlinear", "linearized")
ENCODER_KW = {
    "vit": {
        "image_size": 16,
        "patch_size": 4,
        "dim": 32,
        "depth": 4,
        "heads": 2,
        "mlp_ratio": 2,
        "out_dim": 32,
    },
    "cnn": {"width": 8, "depth": 4, "out_dim": 32},
}


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines the pre-trained model, the heads and the fine-tunes of one seed."""

    arch: str
    tasks: tuple[str, ...]
    seed: int
    pretrain_seed: int = 0
    n_train: int = 500
    n_val: int = 150
    n_test: int = 199
    pretrain_steps: int = 400
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    ft_steps: int = 50
    ft_batch: int = 32
    ft_lr: float = 2e-3
    ft_warmup: int = 5
    ft_weight_decay: float = 0.1
    head_scale: float = 10.0
    device: str = "cpu"  # fine-tunes and evaluations (pre-training runs on the CPU, cached per process)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models: one torch thread is as fast and far faster on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_PRETRAINED: dict[tuple, dict[str, torch.Tensor]] = {}


def _pretrain(spec: WorldSpec) -> nn.Module:
    """The encoder pre-trained on upright digits with affine jitter (one model shared by all seeds of a
    run, as one CLIP is shared by all fine-tunes in the papers); cached per process."""
    key = (spec.arch, spec.pretrain_seed, spec.pretrain_steps, spec.pretrain_batch, spec.pretrain_lr)
    torch.manual_seed(spec.pretrain_seed)
    enc = build_encoder(spec.arch, **ENCODER_KW[spec.arch])
    if key in _PRETRAINED:
        enc.load_state_dict(_PRETRAINED[key])
        return enc.eval()
    pretrain_encoder(
        enc,
        spec.pretrain_steps,
        batch_size=spec.pretrain_batch,
        lr=spec.pretrain_lr,
        seed=spec.pretrain_seed,
        feature_dim=ENCODER_KW[spec.arch]["out_dim"],
    )
    _PRETRAINED[key] = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    return enc.eval()


@dataclass
class World:
    """One seed: pre-trained encoder, tasks (downstream + control), heads, fine-tunes and their vectors."""

    spec: WorldSpec
    encoder: nn.Module
    tasks: dict[str, ImageTask]
    heads: dict[str, PrototypeHead]
    theta0: dict[str, torch.Tensor]
    taus: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    ft_seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    _jvp: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _f0: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    # -- fine-tunes ---------------------------------------------------------------------------------------
    def tau(self, mode: str, task: str) -> dict[str, torch.Tensor]:
        """The task vector of ``task`` fine-tuned in ``mode`` (computed once)."""
        key = (mode, task)
        if key not in self.taus:
            s = self.spec
            cfg = FinetuneConfig(
                steps=s.ft_steps,
                batch_size=s.ft_batch,
                lr=s.ft_lr,
                weight_decay=s.ft_weight_decay,
                warmup_steps=s.ft_warmup,
                linearized=mode == "linearized",
                seed=s.seed,
            )
            start = time.process_time()  # CPU time: robust to other work on a shared machine
            res = finetune(self.encoder, self.heads[task], self.tasks[task].train, cfg)
            self.ft_seconds[key] = time.process_time() - start
            self.taus[key] = {k: res.state[k] - self.theta0[k] for k, _ in self.encoder.named_parameters()}
        return self.taus[key]

    # -- evaluation -----------------------------------------------------------------------------------------
    def data(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self.tasks[task], split)

    @torch.no_grad()
    def features(self, deltas: Mapping[str, torch.Tensor] | None, task: str, split: str) -> torch.Tensor:
        """Encoder features (N, D) at ``theta0 + deltas`` (the non-linear model)."""
        return self.features_many(deltas, (task,), split)[task]

    @torch.no_grad()
    def features_many(
        self, deltas: Mapping[str, torch.Tensor] | None, tasks: Sequence[str], split: str
    ) -> dict[str, torch.Tensor]:
        """``{task: features (N_task, D)}`` at ``theta0 + deltas`` for several tasks in one forward pass on
        their concatenated inputs (the encoder treats samples independently: the same numbers, bit for bit,
        as one pass per task, at a fraction of the per-call overhead)."""
        tasks = tuple(dict.fromkeys(tasks))
        if not deltas:
            missing = tuple(t for t in tasks if ("f0", t, split) not in self._f0)
            if missing:
                z = self._forward(self.theta0, missing, split)
                self._f0.update({("f0", t, split): v for t, v in z.items()})
            return {t: self._f0[("f0", t, split)] for t in tasks}
        params = {k: v + deltas[k] if k in deltas else v for k, v in self.theta0.items()}
        return self._forward(params, tasks, split)

    def _forward(self, params: Mapping[str, torch.Tensor], tasks: tuple[str, ...], split: str) -> dict:
        xs = [self.data(t, split)[0] for t in tasks]
        z = functional_call(self.encoder, dict(params), (torch.cat(xs) if len(xs) > 1 else xs[0],))
        return dict(zip(tasks, z.split([x.shape[0] for x in xs]), strict=True))

    @torch.no_grad()
    def jvp(self, mode: str, vec: str, task: str, split: str) -> torch.Tensor:
        """``J tau`` (N, D) of task vector ``(mode, vec)`` on ``task``'s split (cached). One forward-mode pass
        computes it on the validation and test splits of every task at once (the same numbers as one pass
        per split: samples are independent)."""
        key = (mode, vec, task, split)
        if key not in self._jvp:
            parts = [(t, s) for t in self.tasks for s in ("val", "test")]
            xs = [self.data(t, s)[0] for t, s in parts]
            f0, jt = linearized_jvp(self.encoder, self.params0(), self.tau(mode, vec), (torch.cat(xs),))
            sizes = [x.shape[0] for x in xs]
            for (t, s), f, j in zip(parts, f0.split(sizes), jt.split(sizes), strict=True):
                self._f0.setdefault(("f0", t, s), f)
                self._jvp[(mode, vec, t, s)] = j
        return self._jvp[key]

    def params0(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.theta0.items() if k in dict(self.encoder.named_parameters())}

    def accuracy_from_features(self, z: torch.Tensor, task: str, split: str) -> float:
        _, y = self.data(task, split)
        return float((self.heads[task](z).argmax(-1) == y).double().mean())

    def acc_combo(
        self, combo: Sequence[tuple[str, str, float]], task: str, split: str, linear: bool
    ) -> float:
        """Accuracy on ``task`` of ``theta0 + sum c * tau(mode, vec)`` for ``combo = [(mode, vec, c), ...]``:
        the non-linear model (``linear=False``) or the linearized one (``f0 + sum c J tau``)."""
        return self.acc_combo_many(combo, (task,), split, linear)[task]

    def acc_combo_many(
        self, combo: Sequence[tuple[str, str, float]], tasks: Sequence[str], split: str, linear: bool
    ) -> dict[str, float]:
        """:meth:`acc_combo` on several tasks (one forward pass for the non-linear model)."""
        if linear:
            out = {}
            for task in tasks:
                z = self.features(None, task, split).clone()
                for mode, vec, c in combo:
                    if c:
                        z += c * self.jvp(mode, vec, task, split)
                out[task] = self.accuracy_from_features(z, task, split)
            return out
        deltas: dict[str, torch.Tensor] = {}
        for mode, vec, c in combo:
            for k, v in self.tau(mode, vec).items():
                deltas[k] = deltas.get(k, 0) + c * v
        return self.acc_deltas_many(deltas if any(c for *_, c in combo) else None, tasks, split)

    def acc_deltas(self, deltas: Mapping[str, torch.Tensor] | None, task: str, split: str) -> float:
        return self.acc_deltas_many(deltas, (task,), split)[task]

    def acc_deltas_many(
        self, deltas: Mapping[str, torch.Tensor] | None, tasks: Sequence[str], split: str
    ) -> dict[str, float]:
        """``{task: accuracy}`` of ``theta0 + deltas`` on ``split`` of each task (one forward pass)."""
        z = self.features_many(deltas, tasks, split)
        return {t: self.accuracy_from_features(z[t], t, split) for t in z}


def world_spec(config, arch: str, seed: int) -> WorldSpec:
    """The :class:`WorldSpec` of ``seed`` for ``arch`` from an experiment ``Config`` (the fields the
    ``task-arithmetic`` and ``lines`` configs share; the rest keep their defaults)."""
    return WorldSpec(
        arch=arch,
        tasks=config.tasks,
        seed=seed,
        n_train=config.n_train,
        n_val=config.n_val,
        n_test=config.n_test,
        pretrain_steps=config.pretrain_steps,
        ft_steps=config.ft_steps,
        ft_batch=config.ft_batch,
        ft_lr=config.ft_lr,
        device=config.device,
    )


_CACHE: dict[WorldSpec, World] = {}


def get_world(spec: WorldSpec) -> World:
    """Build (or reuse) the world of ``spec``: pre-training, tasks and heads (fine-tunes come on demand).
    The encoder, the tasks' images and the heads live on ``spec.device`` (pre-training runs on the CPU)."""
    if spec not in _CACHE:
        from .._device import resolve_device

        device = resolve_device(spec.device, name="device")
        if len(_CACHE) >= 12:
            _CACHE.pop(next(iter(_CACHE)))
        encoder = _pretrain(spec).to(device)
        for p in encoder.parameters():
            p.requires_grad_(True)
        names = tuple(dict.fromkeys((*spec.tasks, CONTROL)))
        tasks = make_tasks(names, seed=spec.seed, n_train=spec.n_train, n_val=spec.n_val, n_test=spec.n_test)
        tasks = {name: dataclasses.replace(task, **{split: tuple(t.to(device) for t in getattr(task, split))
                                                    for split in ("train", "val", "test")})
                 for name, task in tasks.items()}
        heads = {}
        with torch.no_grad():
            for name, task in tasks.items():
                z = encoder(task.train[0])
                protos = class_prototypes(z, task.train[1], task.num_classes)
                heads[name] = PrototypeHead(protos, scale=spec.head_scale, center=z.mean(0))
        theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        _CACHE[spec] = World(spec, encoder, tasks, heads, theta0)
    return _CACHE[spec]


def point_config(config: Any, **extra: Any) -> dict[str, Any]:
    """The sweep-point config of one seed of an experiment ``Config``: every field but ``seeds`` and
    ``archs`` (the grid's axes), plus ``extra`` (e.g. ``arch``)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return {k: v for k, v in fields.items() if k not in ("seeds", "archs")} | extra


def config_from_point(cls: type, point: Mapping[str, Any]) -> Any:
    """Rebuild an experiment ``Config`` from :func:`point_config`'s dict after its JSON round trip (lists
    back to tuples; fields not in the point keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in point.items() if k in names})


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def paired_verdict(better: Sequence[float], worse: Sequence[float]) -> tuple[str, float, float]:
    """Verdict for "``better`` exceeds ``worse``" from paired per-seed values: ``(verdict, mean diff, sem)``.

    Rule (fixed before any run): "reproduced" when the mean paired difference is positive and larger than
    twice its standard error; "partly" when it is positive but within that noise; else "not reproduced".
    """
    diffs = [b - w for b, w in zip(better, worse, strict=True)]
    n = len(diffs)
    m = mean(diffs)
    sd = (sum((d - m) ** 2 for d in diffs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    sem = sd / n**0.5
    if m > 0 and m > 2 * sem:
        return "reproduced", m, sem
    return ("partly" if m > 0 else "not reproduced"), m, sem


PAIRED_RULE = (
    "paired over seeds: reproduced if the mean difference is > 0 and > 2 standard errors; partly if > 0 "
    "within noise; else not reproduced"
)
