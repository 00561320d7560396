"""The experiment contract: a config dataclass with named scales, and ``run(config, out) -> summary``.

An experiment module defines a frozen ``Config`` dataclass and a ``run(config, out)`` function that writes
its results (JSON/CSV) and figures (PNG) into the folder ``out`` and returns a flat dict of the key numbers
shown in the HTML report. It registers itself with::

    EXPERIMENTS.register("my-exp", Experiment(
        name="my-exp", run=run, scales={"quick": Config(...), "full": Config(...)},
        description="one line for --help and the report"))

``run_experiment`` adds ``config.json`` and ``summary.json`` and makes the whole folder appear atomically.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_directory, write_json
from .._registry import Registry

__all__ = ["Experiment", "EXPERIMENTS", "SCALES", "grid", "run_experiment"]

SCALES = ("quick", "full")


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its runner, a config per scale and a one-line description."""

    name: str
    run: Callable[[Any, Path], Mapping[str, Any]]
    scales: Mapping[str, Any]
    description: str

    def config(self, scale: str = "quick", **overrides: Any) -> Any:
        """The config of ``scale``, with fields replaced by ``overrides`` (unknown fields raise)."""
        if scale not in self.scales:
            raise ValueError(f"scale must be one of {sorted(self.scales)}, got {scale!r}")
        base = self.scales[scale]
        names = {f.name for f in dataclasses.fields(base)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown} for {self.name}; valid: {sorted(names)}")
        return dataclasses.replace(base, **overrides)


EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def grid(lo: float, hi: float, step: float) -> tuple[float, ...]:
    """Evenly spaced values from ``lo`` to ``hi`` inclusive, rounded to 6 decimals (clean configs)."""
    n = int(round((hi - lo) / step))
    return tuple(round(lo + k * step, 6) for k in range(n + 1))


def run_experiment(name: str, out_dir: str | Path, scale: str = "quick", **overrides: Any) -> dict[str, Any]:
    """Run experiment ``name`` into ``out_dir/<name>/`` and return its summary (key numbers).

    The folder is built in a temporary location and renamed into place only when the run succeeds, so an
    interrupted run leaves the previous results (or nothing) rather than a partial folder.
    """
    exp = EXPERIMENTS.get(name)
    config = exp.config(scale, **overrides)
    target = Path(out_dir) / name
    with atomic_directory(target) as tmp:
        write_json(tmp / "config.json", {"experiment": name, "scale": scale, "config": config})
        start = time.perf_counter()
        summary = dict(exp.run(config, tmp))
        summary.setdefault("runtime_s", round(time.perf_counter() - start, 2))
        write_json(tmp / "summary.json", summary)
    return summary
