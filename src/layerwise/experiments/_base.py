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
machine, times, device), and makes the whole folder appear atomically.

Devices: an experiment whose work can run on a GPU gives its ``Config`` a field ``device: str = "cpu"``
and passes it to the library calls that take ``device=`` (inside its sweep points too: the device is part of
each point's config). ``run_experiment(..., device=...)`` validates the device once
(:func:`layerwise._device.resolve_device`) and sets that field; an experiment without it runs on the CPU
whatever the device, and says so in ``run.json``.
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

    @property
    def uses_device(self) -> bool:
        """Whether the experiment's work can run on a device other than the CPU (its ``Config`` has a
        ``device`` field, passed to the library calls that take ``device=``)."""
        return any(f.name == "device" for f in dataclasses.fields(next(iter(self.scales.values()))))

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


def check_device(device: Any, name: str = "device") -> str:
    """``device`` checked once for the experiments about to run, as a normalised name (``" CUDA"`` ->
    ``"cuda"``); raises :class:`~layerwise.errors.ParameterError` naming ``name``.

    Where the sweep points run on other machines (``--executor slurm`` on a SLURM cluster, ``--executor
    dask --scheduler ADDRESS``: every device computation of the experiments happens inside their points),
    only the name is checked here, so ``cuda`` is accepted on a login node without a GPU; the workers check
    that they have it. Everywhere else this machine must have the device.
    """
    from .._device import resolve_device
    from ..sweep import current_options

    opts = current_options()
    remote = (opts.executor == "slurm" and opts.slurm_cluster not in ("local", "debug")) or (
        opts.executor == "dask" and opts.scheduler is not None)
    return str(resolve_device(device, name=name, local=not remote))


def run_experiment(name: str, out_dir: str | Path, scale: str = "quick", *, device: str | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """Run experiment ``name`` into ``out_dir/<name>/`` and return its summary (key numbers).

    The folder is built in a temporary location and renamed into place only when the run succeeds, so an
    interrupted run leaves the previous results (or nothing) rather than a partial folder.

    Parameters
    ----------
    name : str
        A registered experiment (``EXPERIMENTS.names()``).
    out_dir : str or Path
        The results go to ``out_dir/<name>/``.
    scale : str
        ``"quick"`` or ``"full"``.
    device : str, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``: where the experiment's tensor work runs (its
        ``Config.device``); None keeps the config's (``"cpu"``). Validated before anything is written
        (:func:`check_device`). An
        experiment without a ``device`` field (:attr:`Experiment.uses_device`) runs on the CPU; ``run.json``
        records the device that ran it.
    **overrides
        Config fields to replace.

    Returns
    -------
    dict
        The flat summary (key numbers and ``runtime_s``).
    """
    exp = EXPERIMENTS.get(name)
    chosen = None if device is None else check_device(device)
    fields = {**overrides, "device": chosen} if chosen is not None and exp.uses_device else overrides
    config = exp.config(scale, **fields)
    ran_on = "cpu"
    if exp.uses_device:  # one checked, normalised name ("CUDA " -> "cuda") in config.json and every point
        ran_on = check_device(config.device)
        config = dataclasses.replace(config, device=ran_on)
    exp.check_extras()  # before the output folder is touched
    target = Path(out_dir) / name
    with atomic_directory(target) as tmp:
        write_json(tmp / "config.json", {"experiment": name, "scale": scale, "device": ran_on,
                                         "config": config})
        started, prov = utc_now(), provenance()  # machine load as the run starts
        start = time.perf_counter()
        summary, parts = split_summary(exp.run(config, tmp))  # claims, tables, figures, text: see _results
        summary.setdefault("runtime_s", round(time.perf_counter() - start, 2))
        write_parts(tmp, parts)
        write_json(tmp / "summary.json", summary)
        asked = {"device_requested": chosen} if chosen not in (None, ran_on) else {}  # CPU-only experiment
        write_json(tmp / "run.json", {"experiment": name, "scale": scale, "overrides": overrides,
                                      "started_utc": started, "finished_utc": utc_now(),
                                      "runtime_s": summary["runtime_s"], "device": ran_on, **asked, **prov})
    return summary
