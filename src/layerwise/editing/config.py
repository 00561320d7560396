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

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, LayerwiseError, ParameterError, ParameterTypeError
from .checkpoints import parse_size
from .lines import _compile
from .merge import MERGE_METHODS
from .merge.data_dependent import refuse_data_method
from .merge.gradients import split_schedules
from .merge.plan import DTYPE_CHOICES, LinesSpec, MergePlan, plan_merge
from .merge.registry import _r
from .merge.slices import OutputSlice, SlicedPlan, SliceSource, plan_slices
from .mergekit_config import is_mergekit_config, translate_mergekit

__all__ = ["ModelEntry", "MergeConfig", "MissingPathError", "load_merge_config", "parse_merge_config"]

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
    "tokenizer_source",
    "slices",
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
    tokenizer_source: str | None = None
    slices: tuple[OutputSlice, ...] | None = None
    source_text: str | None = field(default=None, compare=False, repr=False)

    def plan(self) -> MergePlan | SlicedPlan:
        """Open the checkpoints and validate the method parameters (no tensor data is read).

        A parameter refused at this stage (e.g. a weight beyond float32) raises
        :class:`~layerwise.errors.ConfigError`; broken or mismatched checkpoints raise
        :class:`~layerwise.errors.CheckpointError`.
        """
        try:
            return self._plan()
        except (ParameterError, ParameterTypeError) as err:
            raise ConfigError(str(err)) from None

    def _plan(self) -> MergePlan | SlicedPlan:
        if self.slices is not None:
            return plan_slices(
                self.method,
                self.slices,
                self.base_model,
                params=self.parameters,
                scale=self.scale,
                lines=self.lines,
                dtype=self.dtype,
                seed=self.seed,
                max_shard_bytes=self.shard_size,
                chunk_elements=self.chunk_elements,
                check_dtypes=self.check_dtypes,
                tokenizer_source=self.tokenizer_source,
            )
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
            tokenizer_source=self.tokenizer_source,
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
        out = {
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
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        if self.slices is not None:
            del out["models"]
            out["slices"] = [
                {
                    "sources": [
                        {
                            "model": str(src.model),
                            "layer_range": list(src.layer_range),
                            "parameters": dict(src.parameters),
                        }
                        for src in sl.sources
                    ],
                    "parameters": dict(sl.parameters),
                    **({} if sl.base_model is None else {"base_model": str(sl.base_model)}),
                }
                for sl in self.slices
            ]
        return out


class MissingPathError(ConfigError, FileNotFoundError):
    """A path given in a merge config does not exist (also a ``FileNotFoundError``)."""


def load_merge_config(path: str | os.PathLike, *, check_files: bool = True) -> MergeConfig:
    """Read and validate a YAML merge config; errors (:class:`~layerwise.errors.ConfigError`) start with the
    file name and name the key."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"merge config not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except yaml.composer.ComposerError as err:
        if "expected a single document" not in str(err):
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        raise ConfigError(
            f"{path}: holds several YAML documents (a mergekit-multimerge / mergekit-mega file); layerwise "
            "merge runs one merge per file: put each document in a file of its own and run them in order"
        ) from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as err:  # the constructors raise these too
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    try:
        config = parse_merge_config(data, base_dir=path.parent, check_files=check_files)
    except ConfigError as err:
        raise type(err)(f"{path}: {err}") from None
    return replace(config, source_text=text)


def parse_merge_config(
    data: Any, base_dir: str | os.PathLike = ".", *, check_files: bool = True
) -> MergeConfig:
    """Validate a config mapping (as read from YAML); relative paths are taken from ``base_dir``.

    A mergekit config (one with ``merge_method``) is translated first (:mod:`.mergekit_config`).

    Every problem raises :class:`~layerwise.errors.ConfigError` (a ``ValueError``) naming the key;
    a missing file raises :class:`MissingPathError` (also a ``FileNotFoundError``).
    """
    try:
        return _parse(data, Path(base_dir), check_files)
    except ConfigError:
        raise
    except (LayerwiseError, ValueError, TypeError) as err:  # from the method/LiNeS/size validators
        raise ConfigError(str(err)) from None
    except RecursionError:
        raise ConfigError("the config is nested too deeply") from None


def _parse(data: Any, base_dir: Path, check_files: bool) -> MergeConfig:
    if is_mergekit_config(data):
        data = translate_mergekit(data)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"the config must be a mapping with keys {list(_TOP_KEYS)}, got {type(data).__name__}"
        )
    unknown = sorted((k for k in data if k not in _TOP_KEYS), key=repr)
    if unknown:
        raise ConfigError(f"unknown key(s) {_r(unknown)}; valid keys: {list(_TOP_KEYS)}")
    if "method" not in data:
        raise ConfigError(f"'method' is required; valid methods: {sorted(MERGE_METHODS.names())}")
    method = data["method"]
    try:
        refuse_data_method(method)  # regmean/fisher: one line pointing to `layerwise merge-data`
    except ParameterError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(method, str) or method not in MERGE_METHODS:
        raise ConfigError(f"method must be one of {sorted(MERGE_METHODS.names())}, got {_r(method)}")

    def resolve(where: str, value: Any) -> Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value) or "\0" in str(value):
            raise ConfigError(f"{where} must be a path, got {_r(value)}")
        p = Path(os.path.expanduser(str(value)))
        p = p if p.is_absolute() else base_dir / p
        if check_files and not p.exists():
            raise MissingPathError(
                f"{where}: not found: {p} (folder not found; a merge reads local checkpoint folders or "
                "files and never downloads from the hub)"
            )
        return p

    slices = None
    if "slices" in data:
        if "models" in data:
            raise ConfigError("give either 'models' or 'slices', not both")
        slices = _slices(data["slices"], resolve)
        seen: dict[Path, None] = {}
        for sl in slices:
            for src in sl.sources:
                seen.setdefault(src.model, None)
        models_raw = [str(p) for p in seen]
    else:
        models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError(
            f"models must be a non-empty list of paths or {{model: PATH, parameters: {{...}}}}, "
            f"got {_r(models_raw)}"
        )
    models = []
    for i, entry in enumerate(models_raw):
        if isinstance(entry, (str, os.PathLike)):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ConfigError(
                f"models[{i}] must be a path or a mapping with 'model' (and 'parameters'), got {_r(entry)}"
            )
        extra = sorted((k for k in entry if k not in ("model", "parameters")), key=repr)
        if extra:
            raise ConfigError(f"models[{i}]: unknown key(s) {_r(extra)}; valid: ['model', 'parameters']")
        params = entry.get("parameters")
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise ConfigError(f"models[{i}].parameters must be a mapping, got {_r(params)}")
        models.append(ModelEntry(resolve(f"models[{i}].model", entry["model"]), dict(params)))
    base = data.get("base_model")
    base_path = None if base is None else resolve("base_model", base)
    per_slice_base = slices is not None and all(sl.base_model is not None for sl in slices)
    if base_path is None and MERGE_METHODS.get(method).needs_base and not per_slice_base:
        raise ConfigError(f"base_model is required by method {_r(method)}")
    params = data.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise ConfigError(f"parameters must be a mapping, got {_r(params)}")
    # validate the method parameters now (names, ranges, cross-checks), before any checkpoint is opened
    # (list values are per-layer gradients or filters: every number is range-checked here too)
    spec = MERGE_METHODS.get(method)
    if slices is None:
        spec.resolve(*split_schedules(spec, params, [m.parameters for m in models])[:2])
    else:
        for sl in slices:
            base_ref = sl.base_model if sl.base_model is not None else base_path
            merged = [s.parameters for s in sl.sources if not (spec.needs_base and s.model == base_ref)] or [
                {}
            ]
            spec.resolve(*split_schedules(spec, {**params, **sl.parameters}, merged)[:2])
    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source is not None and tokenizer_source not in ("base", "union"):
        raise ConfigError(
            f"tokenizer_source must be 'base' (keep the base's vocabulary: embedding rows of models with "
            f"added tokens are truncated/padded), 'union' (the union of the models' tokenizers, rows aligned "
            f"by token) or omitted, got {_r(tokenizer_source)}"
        )

    dtype = data.get("dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPE_CHOICES):
        raise ConfigError(
            f"dtype must be one of {sorted(DTYPE_CHOICES)} (or omitted: keep the base's), got {_r(dtype)}"
        )
    check_dtypes = data.get("check_dtypes", True)
    if not isinstance(check_dtypes, bool):
        raise ConfigError(f"check_dtypes must be true or false, got {_r(check_dtypes)}")
    return MergeConfig(
        method=method,
        models=tuple(models),
        base_model=base_path,
        parameters=dict(params),
        scale=_number("scale", data.get("scale", 1.0)),
        lines=_lines(data.get("lines")),
        dtype=dtype,
        shard_size=parse_size(data.get("shard_size", "5GB"), "shard_size"),
        seed=_int("seed", data.get("seed", 0), high=2**63 - 1),
        chunk_elements=_int("chunk_elements", data.get("chunk_elements", 1 << 20), low=1, high=2**62),
        check_dtypes=check_dtypes,
        tokenizer_source=tokenizer_source,
        slices=slices,
    )


def _slices(raw: Any, resolve) -> tuple[OutputSlice, ...]:
    """``slices`` (see :mod:`.merge.slices`): a list of ``{sources: [{model, layer_range, parameters}],
    parameters, base_model}``; paths resolved, ranges checked for shape (against the models at planning)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"slices must be a non-empty list of {{sources: [...]}}, got {_r(raw)}")
    out = []
    for s, sl in enumerate(raw):
        where = f"slices[{s}]"
        if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise ConfigError(f"{where} must be a mapping with a non-empty 'sources' list, got {_r(sl)}")
        extra = sorted((k for k in sl if k not in ("sources", "parameters", "base_model")), key=repr)
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {_r(extra)}; valid: sources, parameters, base_model")
        sources = []
        for k, src in enumerate(sl["sources"]):
            w = f"{where}.sources[{k}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{w} must be a mapping with 'model' and 'layer_range', got {_r(src)}")
            bad = sorted((x for x in src if x not in ("model", "layer_range", "parameters")), key=repr)
            if bad:
                raise ConfigError(f"{w}: unknown key(s) {_r(bad)}; valid: model, layer_range, parameters")
            lr = src["layer_range"]
            if (
                not isinstance(lr, list)
                or len(lr) != 2
                or not all(type(x) is int for x in lr)
                or not 0 <= lr[0] < lr[1]
            ):
                raise ConfigError(f"{w}.layer_range must be [start, end] with 0 <= start < end, got {_r(lr)}")
            params = src.get("parameters") or {}
            if not isinstance(params, Mapping):
                raise ConfigError(f"{w}.parameters must be a mapping, got {_r(params)}")
            sources.append(SliceSource(resolve(f"{w}.model", src["model"]), (lr[0], lr[1]), dict(params)))
        sparams = sl.get("parameters") or {}
        if not isinstance(sparams, Mapping):
            raise ConfigError(f"{where}.parameters must be a mapping, got {_r(sparams)}")
        base = sl.get("base_model")
        base = None if base is None else resolve(f"{where}.base_model", base)
        out.append(OutputSlice(tuple(sources), dict(sparams), base))
    return tuple(out)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a finite number, got {_r(value)}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ConfigError(f"{name} must be a finite number, got {_r(value)}")
    return out


def _int(name: str, value: Any, low: int = 0, high: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {_r(value)}")
    return value


def _lines(raw: Any) -> LinesSpec | None:
    if raw is None or raw is False:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"lines must be a mapping with keys {list(_LINES_KEYS)}, got {_r(raw)}")
    unknown = sorted((k for k in raw if k not in _LINES_KEYS), key=repr)
    if unknown:
        raise ConfigError(f"lines: unknown key(s) {_r(unknown)}; valid: {list(_LINES_KEYS)}")
    alpha = raw.get("alpha", "auto")
    if isinstance(alpha, str) and alpha == "auto":
        alpha = None
        if raw.get("beta") is None:
            raise ConfigError(
                "lines: alpha 'auto' (multi-task) needs beta; for single-task LiNeS give alpha "
                "(beta defaults to 1 - alpha)"
            )
    else:
        alpha = _number("lines.alpha", alpha)
    beta = raw.get("beta")
    beta = None if beta is None else _number("lines.beta", beta)
    pattern = raw.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise ConfigError(f"lines.pattern must be a regular expression string, got {_r(pattern)}")
    if pattern is not None:
        _compile(pattern)
    return LinesSpec(alpha=alpha, beta=beta, pattern=pattern)
