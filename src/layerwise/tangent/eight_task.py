"""The 8-task protocol of task arithmetic on CLIP (Ilharco et al. 2023; Ortiz-Jimenez et al. 2023; LiNeS,
Wang et al. 2025) for the user's own image folders and FusionBench-style fine-tunes.

For each task the user supplies a test folder (``root/<class>/*.png``), optionally a validation folder (used
to choose coefficients; without it they are chosen on the test folder and the results say so), the class
names, and the fine-tuned ``CLIPVisionModel`` folder (:mod:`.fusionbench`). Heads are CLIP's zero-shot heads
from the text tower of the pre-trained ``CLIPModel`` (:func:`.clip.zeroshot_head`). Reported, on the test
folders, as absolute accuracy and normalized accuracy (accuracy / the task's individual fine-tuned accuracy):

- ``addition``: ``theta0 + alpha sum_t tau_t``, ``alpha`` maximizing the mean normalized accuracy
  (grid ``0, 0.05, ..., 1``).
- ``negation``: per task ``theta0 - alpha tau_t``, ``alpha`` minimizing the target accuracy while the control
  keeps ``keep`` (0.95) of its zero-shot accuracy; the control is the ``control`` task if given, else the
  mean accuracy over the other tasks. Normalized: target and control accuracy / their zero-shot accuracy.
- ``tangent``: task addition inside the linearized model ``f0 + J (theta - theta0)``
  (:class:`.linearize.LinearizedModel`), with linearly fine-tuned checkpoints when given (``linearized``),
  else post-hoc linearization of the ordinary task vectors; normalized by the linearized model's own
  individual accuracies ``f_lin(theta0 + tau_t)``.
- ``lines``: LiNeS on the summed task vector: block ``l`` scaled by ``1/T + beta l / (L - 1)``, ``beta``
  from ``0.1, ..., 1.0`` maximizing the mean normalized accuracy.

:func:`run_eight_task` writes ``results.json``, ``results.csv`` and ``accuracy.png`` (``layerwise eight-task
CONFIG.yaml --out DIR``). The configuration format is :func:`parse_eight_task_config`'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._device import resolve_device
from ..errors import ConfigError
from .evaluation import ADDITION_GRID, LINES_BETA_GRIDS, NEGATION_GRID, search_addition, search_negation

__all__ = [
    "METHODS",
    "TaskData",
    "EightTaskConfig",
    "parse_eight_task_config",
    "load_eight_task_config",
    "run_eight_task",
]

METHODS = ("addition", "negation", "tangent", "lines")
_TOP = (
    "pretrained",
    "local_files_only",
    "model_name",
    "finetuned_root",
    "linearized_root",
    "tasks",
    "methods",
    "grids",
    "control",
    "negation_keep",
    "batch_size",
    "max_images",
    "seed",
    "device",
)
_TASK = ("name", "data", "val", "classes", "folders", "templates", "finetuned", "linearized")
_GRIDS = ("addition", "negation", "tangent", "lines_beta")


@dataclass(frozen=True)
class TaskData:
    """One task: test (and validation) image folders, class names, and where its fine-tunes are."""

    name: str
    data: Path
    val: Path | None = None
    classes: tuple[str, ...] | None = None
    folders: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None
    finetuned: Path | None = None
    linearized: Path | None = None


@dataclass(frozen=True)
class EightTaskConfig:
    """A validated configuration (see :func:`parse_eight_task_config`)."""

    pretrained: str
    tasks: tuple[TaskData, ...]
    methods: tuple[str, ...] = METHODS
    grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    control: TaskData | None = None
    negation_keep: float = 0.95
    batch_size: int = 32
    max_images: int | None = None
    seed: int = 0
    device: str = "cpu"
    local_files_only: bool = False

    def grid(self, name: str) -> tuple[float, ...]:
        """The coefficient grid of ``name`` (``addition``, ``negation``, ``tangent``, ``lines_beta``)."""
        default = {
            "addition": ADDITION_GRID,
            "negation": NEGATION_GRID,
            "tangent": ADDITION_GRID,
            "lines_beta": LINES_BETA_GRIDS["task_arithmetic"],
        }[name]
        return self.grids.get(name, default)


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"{key}: {msg}")


def _path(raw: Any, key: str, base: Path) -> Path:
    if not isinstance(raw, str) or not raw:
        raise _err(key, f"must be a path, got {raw!r}")
    return base / raw


def _names(raw: Any, key: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v for v in raw):
        raise _err(key, "must be a non-empty list of strings")
    return tuple(raw)


def _task(raw: Any, key: str, base: Path) -> TaskData:
    if not isinstance(raw, dict):
        raise _err(key, f"must be a mapping with keys {list(_TASK)}")
    unknown = sorted(set(map(str, raw)) - set(_TASK))
    if unknown:
        raise _err(key, f"unknown key(s) {unknown}; allowed: {list(_TASK)}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise _err(f"{key}.name", "must be a task name (e.g. sun397)")
    classes, folders = (
        _names(raw.get("classes"), f"{key}.classes"),
        _names(raw.get("folders"), f"{key}.folders"),
    )
    if classes and folders and len(classes) != len(folders):
        raise _err(f"{key}.classes", f"has {len(classes)} names but folders has {len(folders)}")
    templates = _names(raw.get("templates"), f"{key}.templates")
    if templates and not all("{}" in t for t in templates):
        raise _err(f"{key}.templates", "each template must contain '{}' (the class name)")
    opt = {k: _path(raw[k], f"{key}.{k}", base) for k in ("val", "finetuned", "linearized") if raw.get(k)}
    return TaskData(
        name=raw["name"],
        data=_path(raw.get("data"), f"{key}.data", base),
        classes=classes,
        folders=folders,
        templates=templates,
        **opt,
    )


def parse_eight_task_config(raw: Any, base_dir: str | os.PathLike = ".") -> EightTaskConfig:
    """Validate a configuration mapping (paths relative to ``base_dir``)::

    pretrained: openai-clip-vit-base-patch32   # CLIPModel folder or hub id (text tower, projection)
    finetuned_root: fusionbench/               # holds clip-vit-base-patch32_<task>/ folders
    model_name: clip-vit-base-patch32          # which <model>_ folders (if several models)
    linearized_root: linear/                   # optional, same layout: tangent-space fine-tunes
    tasks:                                     # one entry per task (the 8 of the protocol, or any)
      - {name: sun397, data: images/sun397/test, val: images/sun397/val,
         classes: [abbey, airport, ...], folders: [abbey, airport, ...], templates: ["a photo of a {}."],
         finetuned: path (overrides finetuned_root), linearized: path}
    methods: [addition, negation, tangent, lines]
    grids: {addition: [0, 0.05, ...], negation: [...], tangent: [...], lines_beta: [0.1, ...]}
    control: {name: imagenet, data: images/imagenet_val, classes: [...]}   # negation control (optional)
    negation_keep: 0.95
    batch_size: 32
    max_images: 500        # per task and split, a seeded subset (optional)
    seed: 0
    device: cpu
    """
    from .._validation import check_float, check_int, check_seed

    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping with keys {list(_TOP)}")
    unknown = sorted(set(map(str, raw)) - set(_TOP))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; allowed: {list(_TOP)}")
    base = Path(base_dir)
    pretrained = raw.get("pretrained")
    if not isinstance(pretrained, str) or not pretrained:
        raise _err("pretrained", "must be a CLIPModel folder or hub id")
    if (base / pretrained).exists():
        pretrained = str(base / pretrained)
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise _err("tasks", "must be a non-empty list of tasks")
    tasks = [_task(t, f"tasks[{i}]", base) for i, t in enumerate(tasks_raw)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise _err("tasks", f"task names repeat: {names}")
    roots = {}
    for key in ("finetuned_root", "linearized_root"):
        if raw.get(key) is not None:
            roots[key] = _path(raw[key], key, base)
    model_name = raw.get("model_name")
    if model_name is not None and not isinstance(model_name, str):
        raise _err("model_name", f"must be a model name such as clip-vit-base-patch32, got {model_name!r}")
    for key, attr in (("finetuned_root", "finetuned"), ("linearized_root", "linearized")):
        if key not in roots:
            continue
        from .fusionbench import find_finetuned

        found = find_finetuned(roots[key], model_name)
        tasks = [
            t
            if getattr(t, attr) is not None or t.name not in found
            else TaskData(**{**t.__dict__, attr: found[t.name]})
            for t in tasks
        ]
    lacking = [t.name for t in tasks if t.finetuned is None]
    if lacking:
        raise _err("tasks", f"no fine-tuned model for {lacking} (give finetuned: or finetuned_root:)")
    methods = raw.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods):
        raise _err("methods", f"must be a non-empty list of {list(METHODS)}, got {methods!r}")
    grids_raw = raw.get("grids") or {}
    if not isinstance(grids_raw, dict) or set(map(str, grids_raw)) - set(_GRIDS):
        raise _err("grids", f"must be a mapping with keys among {list(_GRIDS)}")
    grids = {}
    for k, v in grids_raw.items():
        if not isinstance(v, list) or not v or len(set(v)) != len(v):
            raise _err(f"grids.{k}", "must be a non-empty list of distinct numbers")
        grids[k] = tuple(check_float(f"grids.{k}", x) for x in v)
    control = _task(raw["control"], "control", base) if raw.get("control") is not None else None
    keep = check_float("negation_keep", raw.get("negation_keep", 0.95), low=0.0, high=1.0, low_open=True)
    max_images = raw.get("max_images")
    local = raw.get("local_files_only", False)
    if not isinstance(local, bool):
        raise _err("local_files_only", f"must be true or false, got {local!r}")
    device = raw.get("device", "cpu")
    resolve_device(device)  # refused here, before any work, if malformed or not available
    return EightTaskConfig(
        pretrained=pretrained,
        tasks=tuple(tasks),
        methods=tuple(dict.fromkeys(methods)),
        grids=grids,
        control=control,
        negation_keep=keep,
        batch_size=check_int("batch_size", raw.get("batch_size", 32), low=1),
        max_images=None if max_images is None else check_int("max_images", max_images, low=1),
        seed=check_seed(raw.get("seed", 0)),
        device=device,
        local_files_only=local,
    )


def load_eight_task_config(path: str | os.PathLike) -> EightTaskConfig:
    """Read and validate a YAML configuration file (safe loader; paths relative to its folder)."""
    from .._io import read_yaml

    p = Path(path)
    try:
        return parse_eight_task_config(read_yaml(p, what="config file"), p.parent)
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from None


# -- running --------------------------------------------------------------------------------------------
def _subset(ds: Any, limit: int | None, seed: int) -> Any:
    if limit is None or len(ds) <= limit:
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit]
    return torch.utils.data.Subset(ds, sorted(order.tolist()))


@torch.no_grad()
def _accuracy(model: Callable, head: Callable, data: Any, batch_size: int, device: torch.device) -> float:
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(data, batch_size=batch_size):
        pred = head(model(x.to(device))).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += int(y.shape[0])
    return correct / total


class _Bench:
    """The pre-trained encoder, heads, data and task vectors; evaluates edited weights."""

    def __init__(self, cfg: EightTaskConfig, log: Callable[[str], None]) -> None:
        from .clip import (
            DEFAULT_TEMPLATES,
            ClipImageEncoder,
            ImageFolder,
            load_clip,
            preprocess_settings,
            zeroshot_head,
        )
        from .fusionbench import check_against, read_clip_vision

        self.cfg, self.log = cfg, log
        self.device = resolve_device(cfg.device)
        clip, tokenizer = load_clip(cfg.pretrained, local_files_only=cfg.local_files_only)
        self.encoder = ClipImageEncoder(clip).to(self.device).eval()
        self.theta0 = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        pre = preprocess_settings(
            cfg.pretrained if Path(cfg.pretrained).is_dir() else None, clip.config.vision_config.image_size
        )
        self.heads, self.splits = {}, {}
        for i, t in enumerate([*cfg.tasks, *([cfg.control] if cfg.control else [])]):
            folders = t.folders or t.classes
            test = ImageFolder(t.data, pre["size"], folders, pre["mean"], pre["std"])
            classes = t.classes or tuple(c.replace("_", " ") for c in test.classes)
            self.heads[t.name] = zeroshot_head(clip, tokenizer, classes, t.templates or DEFAULT_TEMPLATES).to(
                self.device
            )
            split = {"test": _subset(test, cfg.max_images, cfg.seed + 2 * i)}
            if t.val is not None:
                val = ImageFolder(t.val, pre["size"], test.classes, pre["mean"], pre["std"])
                split["val"] = _subset(val, cfg.max_images, cfg.seed + 2 * i + 1)
            self.splits[t.name] = split
            log(f"task {t.name}: {len(split['test'])} test images, {len(classes)} classes")
        self.select = "val" if all(t.val is not None for t in cfg.tasks) else "test"
        if self.select == "test":
            log("not every task has a val folder: coefficients are chosen on the test images")
        self.names = [t.name for t in cfg.tasks]
        self.taus, self.lin_taus = {}, {}
        for t in cfg.tasks:
            ft = check_against(read_clip_vision(t.finetuned), self.theta0, str(t.finetuned))
            self.taus[t.name] = {k: v.to(self.device) - self.theta0[k] for k, v in ft.items()}
            if t.linearized is not None:
                lin = check_against(read_clip_vision(t.linearized), self.theta0, str(t.linearized))
                self.lin_taus[t.name] = {k: v.to(self.device) - self.theta0[k] for k, v in lin.items()}
        self._linearized = None

    def split(self, name: str, split: str) -> Any:
        return self.splits[name].get(split, self.splits[name]["test"])

    def _set(self, delta: Mapping[str, torch.Tensor]) -> None:
        state = {k: (v + delta[k].to(v.dtype) if k in delta else v) for k, v in self.theta0.items()}
        self.encoder.load_state_dict(state, strict=True)

    def evaluate(
        self, delta: Mapping[str, torch.Tensor], tasks: Sequence[str], split: str, linearized: bool = False
    ) -> dict[str, float]:
        """Accuracy on each of ``tasks`` of ``theta0 + delta`` (in the linearized model if asked)."""
        if linearized:
            if self._linearized is None:
                from .linearize import LinearizedModel

                self._set({})
                self._linearized = LinearizedModel(self.encoder)
            model = self._linearized.set_task_vector(
                {n: delta.get(n, torch.zeros_like(p)) for n, p in self._linearized.base.named_parameters()}
            )
        else:
            self._set(delta)
            model = self.encoder
        bs = self.cfg.batch_size
        return {t: _accuracy(model, self.heads[t], self.split(t, split), bs, self.device) for t in tasks}


def _scaled(taus: Sequence[Mapping[str, torch.Tensor]], coef: float | Mapping[str, float]) -> dict:
    keys = taus[0].keys()
    total = {k: sum(t[k] for t in taus) for k in keys}
    if isinstance(coef, Mapping):
        return {k: v * coef.get(k, 1.0) for k, v in total.items()}
    return {k: v * coef for k, v in total.items()}


def _multi(
    bench: _Bench,
    name: str,
    make: Callable[[float], dict],
    grid: Sequence[float],
    refs: Mapping[str, Mapping[str, float]],
    linearized: bool = False,
) -> dict[str, Any]:
    """Grid search of a multi-task edit on the selection split, then test accuracies at the choice."""
    sel = bench.select
    search = search_addition(lambda c: bench.evaluate(make(c), bench.names, sel, linearized), refs[sel], grid)
    best = search.best
    test = (
        bench.evaluate(make(best), bench.names, "test", linearized)
        if sel != "test"
        else dict(search.best_evaluation)
    )
    norm = {t: test[t] / refs["test"][t] if refs["test"][t] > 0 else None for t in bench.names}
    valid = [v for v in norm.values() if v is not None]
    bench.log(f"{name}: coefficient {best:g}, mean accuracy {sum(test.values()) / len(test):.4f}")
    return {
        "coefficient": best,
        "accuracy": test,
        "normalized": norm,
        "mean_accuracy": sum(test.values()) / len(test),
        "mean_normalized": sum(valid) / len(valid) if valid else None,
        "search": {"split": sel, "grid": list(search.grid), "scores": list(search.scores)},
    }


def _individual(
    bench: _Bench, taus: Mapping[str, Mapping[str, torch.Tensor]], split: str, linearized: bool = False
) -> dict[str, float]:
    return {t: bench.evaluate(taus[t], [t], split, linearized)[t] for t in bench.names}


def _negation(bench: _Bench, zeroshot: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    cfg, sel, out = bench.cfg, bench.select, {}
    control = cfg.control.name if cfg.control is not None else None

    def measure(t: str, alpha: float, split: str) -> tuple[float, float]:
        others = [control] if control else [o for o in bench.names if o != t]
        accs = bench.evaluate({k: -alpha * v for k, v in bench.taus[t].items()}, [t, *others], split)
        return accs[t], sum(accs[o] for o in others) / len(others)

    def zs_control(t: str, split: str) -> float:
        others = [control] if control else [o for o in bench.names if o != t]
        return sum(zeroshot[split][o] for o in others) / len(others)

    for t in bench.names:
        search = search_negation(
            lambda a, t=t: measure(t, a, sel),
            zs_control(t, sel),
            cfg.grid("negation"),
            keep=cfg.negation_keep,
        )
        target, ctrl = measure(t, search.best, "test") if sel != "test" else search.best_evaluation
        zt, zc = zeroshot["test"][t], zs_control(t, "test")
        out[t] = {
            "coefficient": search.best,
            "feasible": search.feasible,
            "target_accuracy": target,
            "target_zeroshot": zt,
            "target_normalized": target / zt if zt > 0 else None,
            "control_accuracy": ctrl,
            "control_zeroshot": zc,
            "control_normalized": ctrl / zc if zc > 0 else None,
            "control": control or "mean of the other tasks",
        }
        bench.log(
            f"negation {t}: alpha {search.best:g}, target {target:.4f} (zero-shot {zt:.4f}), "
            f"control {ctrl:.4f} (zero-shot {zc:.4f})"
        )
    return out


def run_eight_task(
    cfg: EightTaskConfig, out: str | os.PathLike | None = None, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the protocol; return the results (and write them into ``out`` atomically when given).

    Returns
    -------
    dict
        ``tasks``, ``selected_on`` (``"val"`` or ``"test"``), ``zeroshot`` / ``finetuned`` test accuracies,
        and per method: ``coefficient``, ``accuracy`` and ``normalized`` per task, their means, the search
        (``negation``: per task ``target_*`` and ``control_*``; ``tangent``: ``mode`` and ``individual``;
        ``lines``: ``alpha``, ``beta``).
    """
    from ..editing.lines import lines_scales

    if not isinstance(cfg, EightTaskConfig):
        raise ConfigError(f"cfg must be an EightTaskConfig, got {type(cfg).__name__}")
    torch.manual_seed(cfg.seed)
    bench = _Bench(cfg, log)
    splits = sorted({"test", bench.select})
    every = [*bench.names, *([cfg.control.name] if cfg.control else [])]
    zeroshot = {s: bench.evaluate({}, every, s) for s in splits}
    finetuned = {s: _individual(bench, bench.taus, s) for s in splits}
    results: dict[str, Any] = {
        "tasks": bench.names,
        "pretrained": cfg.pretrained,
        "finetuned_models": {t.name: str(t.finetuned) for t in cfg.tasks},
        "selected_on": bench.select,
        "zeroshot": zeroshot["test"],
        "finetuned": finetuned["test"],
        "methods": {},
    }
    taus = [bench.taus[t] for t in bench.names]
    if "addition" in cfg.methods:
        results["methods"]["addition"] = _multi(
            bench, "addition", lambda a: _scaled(taus, a), cfg.grid("addition"), finetuned
        )
    if "negation" in cfg.methods:
        results["methods"]["negation"] = _negation(bench, zeroshot)
    if "tangent" in cfg.methods:
        given = all(t in bench.lin_taus for t in bench.names)
        lin = bench.lin_taus if given else bench.taus
        refs = {s: _individual(bench, lin, s, linearized=True) for s in splits}
        res = _multi(
            bench,
            "tangent",
            lambda a: _scaled([lin[t] for t in bench.names], a),
            cfg.grid("tangent"),
            refs,
            linearized=True,
        )
        res["mode"] = (
            "linearized fine-tunes" if given else "post-hoc linearization of the ordinary fine-tunes"
        )
        res["individual"] = refs["test"]
        results["methods"]["tangent"] = res
    if "lines" in cfg.methods:
        keys = list(taus[0])
        alpha = 1.0 / len(taus)  # (||sum tau||_1 / ||tau_merged||_1) / T with tau_merged = sum tau

        def make(beta: float) -> dict:
            return _scaled(taus, lines_scales(keys, alpha, beta))

        res = _multi(bench, "lines", make, cfg.grid("lines_beta"), finetuned)
        res.update({"alpha": alpha, "beta": res["coefficient"]})
        results["methods"]["lines"] = res
    if out is not None:
        _write(results, Path(out))
    return results


def _rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for t in results["tasks"]:
        rows.append(
            {
                "method": "zeroshot",
                "task": t,
                "coefficient": None,
                "accuracy": results["zeroshot"][t],
                "normalized": None,
            }
        )
        rows.append(
            {
                "method": "finetuned",
                "task": t,
                "coefficient": None,
                "accuracy": results["finetuned"][t],
                "normalized": 1.0,
            }
        )
    for m, res in results["methods"].items():
        if m == "negation":
            for t, r in res.items():
                rows.append(
                    {
                        "method": "negation",
                        "task": t,
                        "coefficient": r["coefficient"],
                        "accuracy": r["target_accuracy"],
                        "normalized": r["target_normalized"],
                        "control_accuracy": r["control_accuracy"],
                        "control_normalized": r["control_normalized"],
                    }
                )
            continue
        for t in results["tasks"]:
            rows.append(
                {
                    "method": m,
                    "task": t,
                    "coefficient": res["coefficient"],
                    "accuracy": res["accuracy"][t],
                    "normalized": res["normalized"][t],
                }
            )
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: Mapping[str, Any]) -> str:
    """The results as a plain-text table: accuracy (normalized) per task and method."""
    tasks = results["tasks"]
    cols = ["zeroshot", "finetuned", *[m for m in results["methods"] if m != "negation"]]
    lines = [f"{'task':<16}" + "".join(f"{c:>20}" for c in cols)]
    for t in tasks:
        cells = [f"{results['zeroshot'][t]:.4f}", f"{results['finetuned'][t]:.4f}"]
        for m in cols[2:]:
            r = results["methods"][m]
            n = r["normalized"][t]
            cells.append(f"{r['accuracy'][t]:.4f} ({'-' if n is None else f'{n:.3f}'})")
        lines.append(f"{t:<16}" + "".join(f"{c:>20}" for c in cells))
    lines.append("(accuracy on the test images; in parentheses: normalized by the fine-tuned accuracy)")
    neg = results["methods"].get("negation")
    if neg:
        lines.append("negation: alpha, target accuracy (/ zero-shot), control accuracy (/ zero-shot)")
        for t, r in neg.items():
            tn, cn = (_fmt(r["target_normalized"]), _fmt(r["control_normalized"]))
            lines.append(
                f"{t:<16}{r['coefficient']:>8g}  {r['target_accuracy']:.4f} ({tn})"
                f"  {r['control_accuracy']:.4f} ({cn})"
                + ("" if r["feasible"] else "  (no alpha kept the control)")
            )
    return "\n".join(lines)


def _write(results: Mapping[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_directory, save_figure, write_csv, write_json

    with atomic_directory(out) as tmp:
        write_json(tmp / "results.json", results)
        write_csv(tmp / "results.csv", _rows(results))
        (tmp / "results.txt").write_text(format_table(results) + "\n", encoding="utf-8")
        tasks = results["tasks"]
        series = {"zero-shot": results["zeroshot"], "fine-tuned": results["finetuned"]}
        series.update({m: r["accuracy"] for m, r in results["methods"].items() if m != "negation"})
        if "negation" in results["methods"]:
            series["negation (target)"] = {
                t: r["target_accuracy"] for t, r in results["methods"]["negation"].items()
            }
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * len(series) / 3), 4))
        width = 0.8 / len(series)
        for j, (label, accs) in enumerate(series.items()):
            ax.bar([i + j * width for i in range(len(tasks))], [accs[t] for t in tasks], width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("8-task protocol: absolute accuracy per task")
        save_figure(fig, tmp / "accuracy.png")
