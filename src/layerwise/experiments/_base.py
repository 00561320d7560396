"""The experiment contract: a config dataclass with named scales, and ``run(config, out) -> summary``.

An experiment module defines a frozen ``Config`` dataclass and a ``run(config, out)`` function that writes
its results (JSON/CSV) and figures (PNG) into the folder ``out`` and returns its summary: a flat dict of
key numbers plus the reserved keys below. It registers itself with::

    EXPERIMENTS.register("my-exp", Experiment(
        name="my-exp", run=run, scales={"quick": Config(...), "full": Config(...)},
        description="one line for --help and the report", systems=("Random Hierarchy Model",)))

The summary's reserved keys ``claims``, ``tables``, ``figures`` and ``text`` feed the report (see
:mod:`._results`); ``run_experiment`` stores them (``claims.json``, ``tables/``), adds ``config.json``,
``summary.json`` (the other, flat key numbers, with ``runtime_s``) and ``run.json`` (version, commit,
machine, times), and makes the whole folder appear atomically.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_directory, write_json
from .._provenance import provenance, utc_now
from .._registry import Registry
from ..errors import ParameterError
from ._results import split_summary, write_parts

__all__ = ["Experiment", "EXPERIMENTS", "SCALES", "grid", "run_experiment"]

SCALES = ("quick", "full")


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its runner, a config per scale, a one-line description and the optional
    extras (keys of ``layerwise._extras.EXTRAS``, e.g. ``("hf", "dpo")``) it needs, checked before it runs."""

    name: str
    run: Callable[[Any, Path], Mapping[str, Any]]
    scales: Mapping[str, Any]
    description: str
    extras: tuple[str, ...] = ()
    # The systems (names in claims.SYSTEMS) whose findings this experiment tests: the report lists a system
    # whose experiments were not run as "not run" rather than "not built".
    systems: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from .claims import SYSTEMS

        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ParameterError(f"Experiment {self.name!r}: systems {unknown} not in {list(SYSTEMS)}")

    def check_extras(self) -> None:
        """Raise :class:`~layerwise.errors.MissingExtraError` naming the first extra that is not installed."""
        from .._extras import require_extras

        require_extras(self.extras, f"experiment {self.name}")

    def config(self, scale: str = "quick", **overrides: Any) -> Any:
        """The config of ``scale``, with fields replaced by ``overrides`` (unknown fields raise)."""
        if scale not in self.scales:
            raise ParameterError(f"scale must be one of {sorted(self.scales)}, got {scale!r}")
        base = self.scales[scale]
        names = {f.name for f in dataclasses.fields(base)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ParameterError(f"unknown config field(s) {unknown} for {self.name}; valid: {sorted(names)}")
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
    exp.check_extras()  # before the output folder is touched
    target = Path(out_dir) / name
    with atomic_directory(target) as tmp:
        write_json(tmp / "config.json", {"experiment": name, "scale": scale, "config": config})
        started, prov = utc_now(), provenance()  # machine load as the run starts
        start = time.perf_counter()
        summary, parts = split_summary(exp.run(config, tmp))  # claims, tables, figures, text: see _results
        summary.setdefault("runtime_s", round(time.perf_counter() - start, 2))
        write_parts(tmp, parts)
        write_json(tmp / "summary.json", summary)
        write_json(tmp / "run.json", {"experiment": name, "scale": scale, "overrides": overrides,
                                      "started_utc": started, "finished_utc": utc_now(),
                                      "runtime_s": summary["runtime_s"], **prov})
    return summary
