"""``layerwise merge-data CONFIG.yaml --out DIR``: data-dependent merges (RegMean, Fisher merging) of
fine-tuned checkpoints from per-model statistics files (:mod:`layerwise.editing.merge.data_dependent`).

Config::

    method: regmean            # or fisher
    parameters: {alpha: 0.9}   # regmean: alpha, gram (sum | mean); fisher: eps
    models:
      - model: ft_a            # checkpoint file or folder
        statistics: a.safetensors   # from layerwise.editing.merge.save_statistics
        weight: 1.0            # optional
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_KEYS = ("method", "parameters", "models")
_MODEL_KEYS = ("model", "statistics", "weight")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge-data",
        help="data-dependent merges (regmean, fisher) from per-model statistics files",
        description="Merge fine-tuned checkpoints with RegMean or Fisher merging, from statistics "
        "computed on a few of your batches (collect_regmean_stats / collect_fisher, saved with "
        "save_statistics). Writes model.safetensors and merge_info.json into OUT, atomically.",
    )
    p.add_argument("config", help="YAML: method, parameters, models (model, statistics, weight)")
    p.add_argument("--out", required=True, help="output folder; new or empty unless --overwrite")
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if an earlier layerwise run wrote it"
    )
    p.add_argument("--dry-run", action="store_true", help="validate the config and print it; merge nothing")
    p.set_defaults(func=_run)


def _parse(path: str) -> dict[str, Any]:
    from .._io import read_yaml
    from ..errors import ConfigError

    raw = read_yaml(path, what="config file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {list(_KEYS)}")
    unknown = sorted(set(map(str, raw)) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {list(_KEYS)}")
    if not isinstance(raw.get("method"), str):
        raise ConfigError(f"{path}: method must be a name (regmean or fisher)")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: parameters must be a mapping")
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{path}: models must be a non-empty list of {{model, statistics, weight}}")
    base = Path(path).parent
    entries = []
    for i, m in enumerate(models):
        if (
            not isinstance(m, dict)
            or set(map(str, m)) - set(_MODEL_KEYS)
            or "model" not in m
            or "statistics" not in m
        ):
            raise ConfigError(f"{path}: models[{i}] must be a mapping with model, statistics (and weight)")
        for key in ("model", "statistics"):
            if not isinstance(m[key], str):
                raise ConfigError(f"{path}: models[{i}].{key} must be a path")
        entries.append(
            {
                "model": base / m["model"],
                "statistics": base / m["statistics"],
                "weight": m.get("weight", 1.0),
            }
        )
    return {"method": raw["method"], "parameters": params, "models": entries}


def _run(args: argparse.Namespace) -> int:
    from .._io import atomic_directory, check_output_dir, write_json
    from ..editing.checkpoints import ShardedSafetensorsWriter
    from ..editing.merge.data_dependent import merge_with_statistics

    cfg = _parse(args.config)
    inputs = [args.config, *(p for m in cfg["models"] for p in (m["model"], m["statistics"]))]
    out = check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    print(f"method: {cfg['method']}  parameters: {cfg['parameters']}")
    for i, m in enumerate(cfg["models"]):
        print(f"model {i}: {m['model']}  statistics: {m['statistics']}  weight: {m['weight']}")
    if args.dry_run:
        return 0
    merged, info = merge_with_statistics(
        cfg["method"],
        [str(m["model"]) for m in cfg["models"]],
        [str(m["statistics"]) for m in cfg["models"]],
        weights=[m["weight"] for m in cfg["models"]],
        params=cfg["parameters"],
        return_info=True,
    )
    with atomic_directory(out) as tmp:
        writer = ShardedSafetensorsWriter(tmp, [(k, v.shape, v.dtype) for k, v in merged.items()], 10**15)
        for k, v in merged.items():
            writer.write(k, v)
        writer.close()
        write_json(tmp / "merge_info.json", {**info, "models": [str(m["model"]) for m in cfg["models"]]})
    print(f"merged {len(merged)} tensors into {out}")
    return 0
