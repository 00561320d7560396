"""Learning-curve configurations (``layerwise kernels curve CONFIG.yaml``) and their output files.

A configuration is a mapping (YAML)::

    input: {type: hypercube, shape: [8]}        # or {type: sphere, d: 16}, {type: patch_spheres, d: 16, s: 4}
    teachers: {local_t2: {type: local, s: 2, sigma: 2.0}}      # name -> kernel spec (see .spec)
    students: {local_s2: {type: local, s: 2, sigma: 2.0}, conv_s2: {type: conv, s: 2, sigma: 2.0}}
    P: [64, 128, 256, 512]
    n_test: 512
    seeds: [0, 1, 2, 3]
    ridge: 0.0                                   # optional
    device: cpu                                  # optional (cpu, cuda, cuda:N, mps; CLI --device wins)
    max_hours: 24                                # optional: refuse runs estimated (after the first seed)
                                                 # to take longer (default 24)
    max_seeds: 10000                             # optional: refuse more seeds than this (default 10000)

Errors name the offending key (``ConfigError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._device import resolve_device
from ..errors import ConfigError, LayerwiseError
from .curves import MAX_SEEDS, LearningCurve, fit_exponent
from .data import hypercube, patch_spheres, sphere
from .spec import make_kernel

__all__ = ["parse_curve_config", "save_curves"]

_KEYS = {"input", "teachers", "students", "P", "n_test", "seeds", "ridge", "device", "max_hours",
         "max_seeds"}
DEFAULT_MAX_HOURS = 24.0
_REQUIRED = ("input", "teachers", "students", "P", "n_test", "seeds")


def _sampler(spec: Any):
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ConfigError("config key 'input' must be a mapping with a 'type' (hypercube, sphere, "
                          "patch_spheres)")
    spec = dict(spec)
    kind = spec.pop("type")
    makers = {"hypercube": (hypercube, {"shape"}), "sphere": (sphere, {"d"}),
              "patch_spheres": (patch_spheres, {"d", "s"})}
    if kind not in makers:
        raise ConfigError(f"config key 'input.type' must be one of {sorted(makers)}, got {kind!r}")
    maker, keys = makers[kind]
    if set(spec) != keys:
        raise ConfigError(f"config key 'input' of type {kind!r} needs exactly the keys {sorted(keys)}, got "
                          f"{sorted(spec)}")
    try:
        return maker(**spec)
    except LayerwiseError as err:
        raise ConfigError(f"config key 'input': {err}") from err


def _kernels(cfg: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = cfg[key]
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"config key {key!r} must be a non-empty mapping name -> kernel spec")
    out = {}
    for name, spec in value.items():
        try:
            out[str(name)] = make_kernel(spec)
        except LayerwiseError as err:
            raise ConfigError(f"config key '{key}.{name}': {err}") from err
    return out


def parse_curve_config(cfg: Any) -> dict[str, Any]:
    """Validate a curve configuration; return the keyword arguments of :func:`.learning_curve`."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"the config must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid: {sorted(_KEYS)}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"config lacks key(s) {missing}")
    for key in ("P", "seeds"):
        if not isinstance(cfg[key], list) or not all(isinstance(v, int) for v in cfg[key]):
            raise ConfigError(f"config key {key!r} must be a list of integers, got {cfg[key]!r}")
    if not isinstance(cfg["n_test"], int):
        raise ConfigError(f"config key 'n_test' must be an integer, got {cfg['n_test']!r}")
    ridge = cfg.get("ridge", 0.0)
    if not isinstance(ridge, (int, float)) or ridge < 0:
        raise ConfigError(f"config key 'ridge' must be a number >= 0, got {ridge!r}")
    max_hours = cfg.get("max_hours", DEFAULT_MAX_HOURS)
    if isinstance(max_hours, bool) or not isinstance(max_hours, (int, float)) or not max_hours > 0 \
            or max_hours == float("inf"):
        raise ConfigError(f"config key 'max_hours' must be a finite number > 0, got {max_hours!r}")
    try:
        device = cfg.get("device")
        device = None if device is None else resolve_device(device, name="config key 'device'")
    except LayerwiseError as err:
        raise ConfigError(str(err)) from err
    max_seeds = cfg.get("max_seeds", MAX_SEEDS)
    if isinstance(max_seeds, bool) or not isinstance(max_seeds, int) or max_seeds < 1:
        raise ConfigError(f"config key 'max_seeds' must be an integer >= 1, got {max_seeds!r}")
    return {"teacher": _kernels(cfg, "teachers"), "student": _kernels(cfg, "students"), "P_list": cfg["P"],
            "n_test": cfg["n_test"], "seeds": cfg["seeds"], "sampler": _sampler(cfg["input"]),
            "ridge": float(ridge), "device": device, "max_seconds": 3600.0 * float(max_hours),
            "max_seeds": max_seeds}


def save_curves(curves: Mapping[tuple[str, str], LearningCurve], out: Path) -> list[dict[str, Any]]:
    """Write ``curves.csv`` (teacher, student, P, seed, mse), ``exponents.csv`` and ``learning_curves.png``
    into the folder ``out``; return the exponent rows."""
    from .._io import save_figure, write_csv

    rows, fits = [], []
    for (t, s), c in curves.items():
        rows += [{"teacher": t, "student": s, "P": p, "seed": seed, "mse": float(c.mse[i, j])}
                 for i, p in enumerate(c.P) for j, seed in enumerate(c.seeds)]
        fit = fit_exponent(c.P, c.mse)
        fits.append({"teacher": t, "student": s, "beta": fit.beta, "ci_low": fit.low, "ci_high": fit.high,
                     "prefactor": fit.prefactor, "n_seeds": len(c.seeds)})
    write_csv(out / "curves.csv", rows)
    write_csv(out / "exponents.csv", fits)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for ((t, s), c), f in zip(curves.items(), fits, strict=True):
        ax.plot(c.P, c.mean().tolist(), "o-", label=f"{t} -> {s}: beta {f['beta']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="P", ylabel="test MSE (mean over seeds)")
    ax.legend(fontsize=7)
    save_figure(fig, out / "learning_curves.png")
    return fits
