"""``layerwise finetune CONFIG.yaml --out DIR``: fine-tune one encoder on several tasks under frozen heads,
non-linearly and/or in the tangent space, and write checkpoints that ``layerwise merge`` merges.

Config (YAML; paths relative to the file's folder)::

    model:
      kind: hf_clip                      # hf_clip | toy_vit | toy_cnn
      path: openai/clip-vit-base-patch32 # hf_clip: local folder or hub id (trust_remote_code stays off)
      local_files_only: false            # hf_clip: never reach the network when true
      device: cuda                       # where to fine-tune (default cpu)
      # toy kinds: pretrain_steps: 400, seed: 0 (pre-trained here on sklearn digits)
    tasks:
      - name: eurosat
        train: data/eurosat/train        # hf_clip: one sub-folder per class
        val: data/eurosat/val            # optional: accuracies before/after in finetune.json
        classes: [annual crop land, forest, ...]   # optional: names used in prompts (default: folders)
        folders: [AnnualCrop, Forest, ...]          # optional: sub-folder per class, same order
        templates: ["a satellite photo of {}."]     # optional (default: generic photo prompts)
      - name: rot90                      # toy kinds: a task of layerwise.tangent.toy_tasks
    finetune:
      modes: [nonlinear, linearized]     # either or both
      steps: 2000
      batch_size: 128
      lr: 1.0e-5
      weight_decay: 0.1
      warmup_steps: 500
      seed: 0
      grad_clip: 1.0

Output folder (created atomically)::

    pretrained/            the encoder at theta0 (safetensors)
    <mode>/<task>/         the fine-tuned encoder theta_t (safetensors)
    heads/<task>/          the frozen head (prototypes, center) (safetensors)
    merge_<mode>.yaml      a ready task-arithmetic config: layerwise merge out/merge_nonlinear.yaml --out M
    finetune.json          config, classes, losses, accuracies

Merged linearized fine-tunes are evaluated in the tangent space:
``LinearizedModel.from_checkpoints(encoder, "out/pretrained", "M")``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from .._device import resolve_device
from .._io import atomic_directory, read_yaml, write_json
from ..editing.checkpoints import save_checkpoint
from ..errors import ConfigError, LayerwiseError, ParameterError
from .finetune import FinetuneConfig, finetune, predict
from .linearize import LinearizedModel

__all__ = ["TaskSpec", "FinetuneJob", "load_finetune_job", "parse_finetune_job", "run_finetune_job", "KINDS"]

KINDS = ("hf_clip", "toy_vit", "toy_cnn")
MODES = ("nonlinear", "linearized")
_FT_KEYS = tuple(f.name for f in fields(FinetuneConfig) if f.name != "linearized") + ("modes",)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    train: Path | None = None
    val: Path | None = None
    classes: tuple[str, ...] | None = None
    folders: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FinetuneJob:
    kind: str
    path: str | None
    local_files_only: bool
    pretrain_steps: int
    model_seed: int
    tasks: tuple[TaskSpec, ...]
    modes: tuple[str, ...]
    finetune: FinetuneConfig
    device: str = "cpu"


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"{key}: {msg}")


def _mapping(raw: Any, key: str, allowed: tuple[str, ...]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _err(key, f"must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise _err(key, f"unknown key(s) {unknown}; allowed: {list(allowed)}")
    return dict(raw)


def _strings(raw: Any, key: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and x for x in raw):
        raise _err(key, f"must be a non-empty list of strings, got {raw!r}")
    return tuple(raw)


# a Hugging Face hub id: "name" or "org/name" (letters, digits, "-", "_", "."; not starting with "." or "-")
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")


def parse_finetune_job(raw: Any, base_dir: str | os.PathLike = ".") -> FinetuneJob:
    """Validate a config mapping (see the module docstring); raise :class:`ConfigError` naming the key."""
    from .toy_tasks import TASKS as TOY_TASKS

    top = _mapping(raw, "config", ("model", "tasks", "finetune"))
    base = Path(base_dir)
    model = _mapping(
        top.get("model"), "model", ("kind", "path", "local_files_only", "pretrain_steps", "seed", "device")
    )
    kind = model.get("kind")
    if kind not in KINDS:
        raise _err("model.kind", f"must be one of {list(KINDS)}, got {kind!r}")
    path = model.get("path")
    if kind == "hf_clip":
        if not isinstance(path, str) or not path:
            raise _err("model.path", "a CLIP folder or hub id is required for kind hf_clip")
        local_path = base / os.path.expanduser(path)
        if local_path.exists():
            path = str(local_path)
        elif not _HUB_ID.fullmatch(path) or ".." in path or path.endswith(".git"):
            # "path/to/x", "./x", "/x", "~/x": a local path, never a hub id: do not go to the network
            raise _err("model.path", f"folder not found: {local_path}")
    elif path is not None:
        raise _err(
            "model.path", f"is only used with kind hf_clip (toy models are pre-trained here), got {path!r}"
        )
    for key, default in (("pretrain_steps", 400), ("seed", 0)):
        v = model.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _err(f"model.{key}", f"must be a non-negative integer, got {v!r}")
    try:  # the central device check: meta (no data), CUDA/MPS not available, an index out of range...
        device = str(resolve_device(model.get("device", "cpu"), name="model.device"))
    except ParameterError as err:
        raise ConfigError(str(err)) from None
    local = model.get("local_files_only", False)
    if not isinstance(local, bool):
        raise _err("model.local_files_only", f"must be true or false, got {local!r}")
    raw_tasks = top.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise _err("tasks", "must be a non-empty list of tasks")
    tasks = []
    for i, t in enumerate(raw_tasks):
        where = f"tasks[{i}]"
        t = _mapping(t, where, ("name", "train", "val", "classes", "folders", "templates"))
        name = t.get("name")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise _err(f"{where}.name", f"must be a plain name (used as a folder name), got {name!r}")
        paths = {}
        for key in ("train", "val"):
            v = t.get(key)
            if v is not None:
                if kind != "hf_clip":
                    raise _err(f"{where}.{key}", "toy tasks bring their own data; remove this key")
                p = base / str(v)
                if not p.is_dir():
                    raise _err(f"{where}.{key}", f"image folder not found: {p}")
                paths[key] = p
        if kind == "hf_clip" and "train" not in paths:
            raise _err(f"{where}.train", "an image folder (one sub-folder per class) is required")
        if kind != "hf_clip" and name not in TOY_TASKS:
            raise _err(f"{where}.name", f"must be one of the toy tasks {list(TOY_TASKS)}, got {name!r}")
        classes = _strings(t.get("classes"), f"{where}.classes")
        folders = _strings(t.get("folders"), f"{where}.folders")
        if folders is not None and classes is not None and len(folders) != len(classes):
            raise _err(
                f"{where}.folders", f"must have one entry per class ({len(classes)}), got {len(folders)}"
            )
        templates = _strings(t.get("templates"), f"{where}.templates")
        if templates is not None and not all("{}" in x for x in templates):
            raise _err(f"{where}.templates", f"each template must contain '{{}}', got {list(templates)}")
        tasks.append(TaskSpec(name, paths.get("train"), paths.get("val"), classes, folders, templates))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise _err("tasks", f"task names must be unique, got {names}")
    ft = _mapping(top.get("finetune"), "finetune", _FT_KEYS)
    modes = ft.pop("modes", ["nonlinear"])
    if isinstance(modes, str):
        modes = [modes]
    if (
        not isinstance(modes, list)
        or not modes
        or any(m not in MODES for m in modes)
        or len(set(modes)) != len(modes)
    ):
        raise _err("finetune.modes", f"must be a list of distinct modes among {list(MODES)}, got {modes!r}")
    try:
        cfg = FinetuneConfig(**ft)
    except (LayerwiseError, TypeError, ValueError) as err:
        raise _err("finetune", str(err)) from None
    return FinetuneJob(
        kind,
        path,
        local,
        model.get("pretrain_steps", 400),
        model.get("seed", 0),
        tuple(tasks),
        tuple(modes),
        cfg,
        str(device),
    )


def load_finetune_job(path: str | os.PathLike) -> FinetuneJob:
    """Read and validate a YAML config (``yaml.safe_load``)."""
    p = Path(path)
    raw = read_yaml(p, what="config file")
    try:
        return parse_finetune_job(raw, p.parent)
    except RecursionError:
        raise ConfigError(f"{p}: the config is nested too deeply") from None


# -- running --------------------------------------------------------------------------------------------
def _setup(job: FinetuneJob, log: Callable[[str], None]):
    """(encoder at theta0, {task: (head, train data, val data or None, classes)})."""
    if job.kind == "hf_clip":
        from .clip import (
            DEFAULT_TEMPLATES,
            ClipImageEncoder,
            ImageFolder,
            load_clip,
            preprocess_settings,
            zeroshot_head,
        )

        clip, tokenizer = load_clip(job.path, local_files_only=job.local_files_only)
        encoder = ClipImageEncoder(clip)
        pre = preprocess_settings(
            job.path if Path(str(job.path)).is_dir() else None, clip.config.vision_config.image_size
        )
        setup = {}
        for t in job.tasks:
            folders = t.folders or t.classes
            train = ImageFolder(t.train, pre["size"], folders, pre["mean"], pre["std"])
            classes = t.classes or tuple(train.classes)
            val = ImageFolder(t.val, pre["size"], train.classes, pre["mean"], pre["std"]) if t.val else None
            head = zeroshot_head(clip, tokenizer, classes, t.templates or DEFAULT_TEMPLATES)
            setup[t.name] = (head, train, val, list(classes))
            log(f"task {t.name}: {len(train)} training images, {len(classes)} classes")
    else:
        encoder, setup = _toy_setup(job, log)
    return encoder.to(job.device), {k: (v[0].to(job.device), *v[1:]) for k, v in setup.items()}


def _toy_setup(job: FinetuneJob, log: Callable[[str], None]):
    from .toy_models import PrototypeHead, build_encoder, class_prototypes
    from .toy_tasks import make_tasks, pretrain_encoder

    torch.manual_seed(job.model_seed)
    encoder = build_encoder(job.kind.removeprefix("toy_"))
    log(f"pre-training the toy encoder for {job.pretrain_steps} steps")
    pretrain_encoder(encoder, job.pretrain_steps, seed=job.model_seed)
    tasks = make_tasks([t.name for t in job.tasks], seed=job.finetune.seed)
    setup = {}
    with torch.no_grad():
        for name, task in tasks.items():
            z = encoder(task.train[0])
            head = PrototypeHead(class_prototypes(z, task.train[1], task.num_classes), 10.0, center=z.mean(0))
            setup[name] = (head, task.train, task.val, [str(c) for c in range(task.num_classes)])
    return encoder, setup


def _accuracy(model, head, data, batch_size: int, device: str = "cpu") -> float:
    if isinstance(data, tuple):
        x, y = data
        out = predict(model, head, x.to(device), batch_size).argmax(-1).cpu()
        return float((out == y).double().mean())
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(data, batch_size=batch_size):
        correct += int((predict(model, head, x.to(device), batch_size).argmax(-1).cpu() == y).sum())
        total += int(y.shape[0])
    return correct / total


def run_finetune_job(
    job: FinetuneJob, out: str | os.PathLike, *, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the job and write the output folder (module docstring) atomically; return the summary."""
    encoder, setup = _setup(job, log)
    theta0 = {k: v.detach().cpu().clone().contiguous() for k, v in encoder.state_dict().items()}
    summary: dict[str, Any] = {
        "model": {"kind": job.kind, "path": job.path},
        "finetune": job.finetune.to_dict(),
        "modes": list(job.modes),
        "tasks": {},
    }
    eval_bs = max(1, min(256, job.finetune.batch_size))
    with atomic_directory(out) as tmp:
        save_checkpoint(theta0, tmp / "pretrained")
        for name, (head, train, val, classes) in setup.items():
            save_checkpoint(
                {k: v.cpu().contiguous() for k, v in head.state_dict().items()}, tmp / "heads" / name
            )
            info: dict[str, Any] = {"classes": classes}
            if val is not None:
                info["val_accuracy_zeroshot"] = _accuracy(encoder, head, val, eval_bs, job.device)
            for mode in job.modes:
                cfg = FinetuneConfig(**{**job.finetune.to_dict(), "linearized": mode == "linearized"})
                start = time.perf_counter()
                res = finetune(encoder, head, train, cfg, progress=progress, desc=f"{name} ({mode})")
                entry = {
                    "seconds": round(time.perf_counter() - start, 2),
                    "loss_first": res.losses[0],
                    "loss_last": res.losses[-1],
                    "checkpoint": f"{mode}/{name}",
                }
                if val is not None:
                    model = (
                        LinearizedModel.posthoc(encoder, res.task_vector())
                        if mode == "linearized"
                        else _with_state(encoder, res.state)
                    )
                    entry["val_accuracy"] = _accuracy(model, head, val, eval_bs, job.device)
                save_checkpoint({k: v.cpu().contiguous() for k, v in res.state.items()}, tmp / mode / name)
                info[mode] = entry
                log(
                    f"{name} ({mode}): loss {entry['loss_first']:.3f} -> {entry['loss_last']:.3f}"
                    + (
                        f", val accuracy {info['val_accuracy_zeroshot']:.3f} -> {entry['val_accuracy']:.3f}"
                        if val is not None
                        else ""
                    )
                )
            summary["tasks"][name] = info
        for mode in job.modes:
            merge = {
                "method": "task_arithmetic",
                "base_model": "pretrained",
                "models": [f"{mode}/{t.name}" for t in job.tasks],
                "scale": 0.3,
            }
            (tmp / f"merge_{mode}.yaml").write_text(
                f"# task addition of the {mode} fine-tunes; choose scale on validation data "
                f"(layerwise.tangent.evaluation.search_addition)\n" + yaml.safe_dump(merge, sort_keys=False),
                encoding="utf-8",
            )
        write_json(tmp / "finetune.json", summary)
    return summary


def _with_state(encoder: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    import copy

    model = copy.deepcopy(encoder)
    model.load_state_dict(state)
    return model.eval()
