"""YAML merge configurations for ``layerwise merge`` (in the spirit of mergekit's), validated with readable
errors.

Example file (paths are relative to the file's folder)::

    method: ties                    # one of MERGE_METHODS (layerwise merge --list-methods)
    base_model: ./clip-vit-b32      # safetensors file, HF folder, sharded folder or torch file
    models:
      - model: ./finetuned/eurosat
        parameters: {weight: 1.0, density: 0.2}
      - ./finetuned/svhn             # shorthand: default parameters
    parameters: {topk: global}      # method parameters; a per-model one given here applies to all models
    scale: 1.0                      # multiplies the merged task vector
    lines: {alpha: auto, beta: 0.5} # LiNeS; alpha: auto = multi-task norm ratio; omit beta for 1 - alpha
    dtype: bfloat16                 # output dtype of floating tensors (default: the base's)
    shard_size: 2GB
    seed: 0

>>> cfg = parse_merge_config({"method": "task_arithmetic", "base_model": "b.safetensors",
...                           "models": ["a.safetensors"]}, check_files=False)
>>> cfg.method, cfg.models[0].path.name, cfg.lines
('task_arithmetic', 'a.safetensors', None)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checkpoints import parse_size
from .lines import _compile
from .merge import MERGE_METHODS
from .merge.driver import DTYPE_CHOICES, LinesSpec, MergePlan, plan_merge

__all__ = ["ModelEntry", "MergeConfig", "load_merge_config", "parse_merge_config"]

_TOP_KEYS = (
    "method",
    "base_model",
    "models",
    "parameters",
    "scale",
    "lines",
    "dtype",
    "shard_size",
    "seed",
    "chunk_elements",
    "check_dtypes",
)
_LINES_KEYS = ("alpha", "beta", "pattern")


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration (see the module docstring for the file format)."""

    method: str
    models: tuple[ModelEntry, ...]
    base_model: Path | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    scale: float = 1.0
    lines: LinesSpec | None = None
    dtype: str | None = None
    shard_size: int = 5 * 10**9
    seed: int = 0
    chunk_elements: int = 1 << 20
    check_dtypes: bool = True

    def plan(self) -> MergePlan:
        """Open the checkpoints and validate the method parameters (no tensor data is read)."""
        return plan_merge(
            self.method,
            [m.path for m in self.models],
            self.base_model,
            params=self.parameters,
            model_params=[m.parameters for m in self.models],
            scale=self.scale,
            lines=self.lines,
            dtype=self.dtype,
            seed=self.seed,
            max_shard_bytes=self.shard_size,
            chunk_elements=self.chunk_elements,
            check_dtypes=self.check_dtypes,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings) for the record written next to the output."""
        lines = (
            None
            if self.lines is None
            else {
                "alpha": "auto" if self.lines.alpha is None else self.lines.alpha,
                "beta": self.lines.beta,
                "pattern": self.lines.pattern,
            }
        )
        return {
            "method": self.method,
            "base_model": None if self.base_model is None else str(self.base_model),
            "models": [{"model": str(m.path), "parameters": dict(m.parameters)} for m in self.models],
            "parameters": dict(self.parameters),
            "scale": self.scale,
            "lines": lines,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "seed": self.seed,
        }


def load_merge_config(path: str | os.PathLike, *, check_files: bool = True) -> MergeConfig:
    """Read and validate a YAML merge config; errors start with the file name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merge config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_merge_config(data, base_dir=path.parent, check_files=check_files)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise type(err)(f"{path}: {err}") from None


def parse_merge_config(
    data: Any, base_dir: str | os.PathLike = ".", *, check_files: bool = True
) -> MergeConfig:
    """Validate a config mapping (as read from YAML); relative paths are taken from ``base_dir``."""
    if not isinstance(data, Mapping):
        raise ValueError(
            f"the config must be a mapping with keys {list(_TOP_KEYS)}, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; valid keys: {list(_TOP_KEYS)}")
    if "method" not in data:
        raise ValueError(f"'method' is required; valid methods: {sorted(MERGE_METHODS.names())}")
    method = data["method"]
    if not isinstance(method, str) or method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {sorted(MERGE_METHODS.names())}, got {method!r}")
    base_dir = Path(base_dir)

    def resolve(where: str, value: Any) -> Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise TypeError(f"{where} must be a path, got {value!r}")
        p = Path(os.path.expanduser(str(value)))
        p = p if p.is_absolute() else base_dir / p
        if check_files and not p.exists():
            raise FileNotFoundError(f"{where}: not found: {p}")
        return p

    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ValueError(
            f"models must be a non-empty list of paths or {{model: PATH, parameters: {{...}}}}, "
            f"got {models_raw!r}"
        )
    models = []
    for i, entry in enumerate(models_raw):
        if isinstance(entry, (str, os.PathLike)):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ValueError(
                f"models[{i}] must be a path or a mapping with 'model' (and 'parameters'), got {entry!r}"
            )
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ValueError(f"models[{i}]: unknown key(s) {extra}; valid: ['model', 'parameters']")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ValueError(f"models[{i}].parameters must be a mapping, got {params!r}")
        models.append(ModelEntry(resolve(f"models[{i}].model", entry["model"]), dict(params)))
    base = data.get("base_model")
    base_path = None if base is None else resolve("base_model", base)
    if base_path is None and MERGE_METHODS.get(method).needs_base:
        raise ValueError(f"base_model is required by method {method!r}")
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"parameters must be a mapping, got {params!r}")
    # validate the method parameters now (names, ranges), before any checkpoint is opened
    MERGE_METHODS.get(method).resolve(params, [m.parameters for m in models])

    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ValueError(
            f"dtype must be one of {sorted(DTYPE_CHOICES)} (or omitted: keep the base's), got {dtype!r}"
        )
    check_dtypes = data.get("check_dtypes", True)
    if not isinstance(check_dtypes, bool):
        raise TypeError(f"check_dtypes must be true or false, got {check_dtypes!r}")
    return MergeConfig(
        method=method,
        models=tuple(models),
        base_model=base_path,
        parameters=dict(params),
        scale=_number("scale", data.get("scale", 1.0)),
        lines=_lines(data.get("lines")),
        dtype=dtype,
        shard_size=parse_size(data.get("shard_size", "5GB"), "shard_size"),
        seed=_int("seed", data.get("seed", 0)),
        chunk_elements=_int("chunk_elements", data.get("chunk_elements", 1 << 20), low=1),
        check_dtypes=check_dtypes,
    )


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _int(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _lines(raw: Any) -> LinesSpec | None:
    if raw is None or raw is False:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"lines must be a mapping with keys {list(_LINES_KEYS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(_LINES_KEYS))
    if unknown:
        raise ValueError(f"lines: unknown key(s) {unknown}; valid: {list(_LINES_KEYS)}")
    alpha = raw.get("alpha", "auto")
    if alpha == "auto":
        alpha = None
        if raw.get("beta") is None:
            raise ValueError(
                "lines: alpha 'auto' (multi-task) needs beta; for single-task LiNeS give alpha "
                "(beta defaults to 1 - alpha)"
            )
    else:
        alpha = _number("lines.alpha", alpha)
    beta = raw.get("beta")
    beta = None if beta is None else _number("lines.beta", beta)
    pattern = raw.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"lines.pattern must be a regular expression string, got {pattern!r}")
    if pattern is not None:
        _compile(pattern)
    return LinesSpec(alpha=alpha, beta=beta, pattern=pattern)
