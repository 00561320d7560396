"""Sweeps: run a function over many (config, seed) points, one result file per point, on any executor.

A *point* is a JSON config plus a seed; its key is a hash of both (and of the point function's name), so a
changed config never reuses a stale result. Every finished point is written atomically to
``<folder>/<key>.json`` as soon as it completes; with ``resume=True`` points whose file exists are read back
instead of recomputed, so an interrupted sweep (Ctrl-C, a killed job, a lost node) loses only the points that
were running.

Executors (``executor=``):

* ``"inprocess"`` (default): one point after the other in this process, in the order given;
* ``"process"``: a local process pool with the ``spawn`` start method (forked workers can deadlock in
  torch's thread pool);
* ``"dask"``: Dask distributed (extra ``dask``), on the scheduler at ``address`` (``tcp://HOST:PORT``) or,
  without one, on a ``LocalCluster`` of ``max_workers`` single-threaded worker processes started for the
  sweep;
* ``"slurm"``: one SLURM job per point (submitted as one job array) through submitit (extra ``slurm``) on
  ``partition``; job logs go to ``<folder>/submitit/``.

The point function ``fn(config: dict, seed: int) -> dict`` must be importable (a module-level function)
and deterministic given its arguments; a script that runs a ``"process"`` sweep needs the usual
``if __name__ == "__main__":`` guard (spawned workers re-import it). A worker that dies (a crash, an
out-of-memory kill, a lost node) fails the points it was running (and, for a process pool, the queued ones),
which are reported like any failure and rerun by ``resume``.

Each point runs with ``threads`` torch threads (default 1) whatever the executor, and configs and results
travel as JSON, so the numbers do not depend on the executor. A point that raises is reported (config
and traceback) in :attr:`SweepResult.failures` and in ``<folder>/<key>.failed.json``; the other points
still run and are kept.

Example
-------
In a module ``mypkg/points.py``::

    def square(config, seed):
        return {"square": config["n"] ** 2}

then::

    from layerwise.sweep import Point, run_sweep
    res = run_sweep(square, [Point({"n": n}, seed=0) for n in (1, 2, 3)], "out/squares",
                    executor="process", resume=True)
    [r["square"] for r in res.results()]   # [1, 4, 9]
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import to_jsonable, write_json
from .errors import LayerwiseError, MissingExtraError, ParameterError, ParameterTypeError

__all__ = [
    "EXECUTORS",
    "Point",
    "PointResult",
    "SweepError",
    "SweepOptions",
    "SweepResult",
    "current_options",
    "point_key",
    "run_sweep",
    "sweep_options",
]

EXECUTORS = ("inprocess", "process", "dask", "slurm")
_FORMAT = "layerwise-sweep-point/1"

PointFn = Callable[[dict[str, Any], int], Mapping[str, Any]]


class SweepError(LayerwiseError, RuntimeError):
    """Some points of a sweep failed; the message lists their configs and tracebacks."""


def _canonical(obj: Any) -> Any:
    """JSON round trip: tuples become lists, tensors lists, NaN None -- what every executor sees."""
    return json.loads(json.dumps(to_jsonable(obj), sort_keys=True))


def _fn_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def point_key(fn: Callable[..., Any] | str, config: Mapping[str, Any], seed: int) -> str:
    """The 20-hex-digit key of a point: SHA-256 of the function's name, the canonical config and the seed."""
    name = fn if isinstance(fn, str) else _fn_name(fn)
    text = json.dumps({"fn": name, "config": _canonical(config), "seed": int(seed)}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class Point:
    """One point of a sweep: a JSON-serializable ``config`` (a mapping) and a ``seed`` (int >= 0)."""

    config: Mapping[str, Any]
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.config, Mapping):
            raise ParameterTypeError(f"Point.config must be a mapping, got {type(self.config).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ParameterError(f"Point.seed must be an integer >= 0, got {self.seed!r}")
        try:
            canonical = _canonical(self.config)
        except (TypeError, ValueError) as exc:
            raise ParameterTypeError(f"Point.config must be JSON-serializable: {exc}") from exc
        object.__setattr__(self, "config", canonical)


@dataclass(frozen=True)
class PointResult:
    """What became of one point.

    Attributes
    ----------
    point : the point.
    key : its key (file ``<folder>/<key>.json``).
    result : the function's return value after a JSON round trip, or None if it failed.
    error : ``"ExceptionType: message"`` when the point failed, else None.
    traceback : the formatted traceback of the failure, else None.
    runtime_s : seconds the point took (as recorded when it ran, also for resumed points).
    resumed : True when the result was read from an earlier run's file.
    """

    point: Point
    key: str
    result: dict[str, Any] | None
    error: str | None = None
    traceback: str | None = None
    runtime_s: float = 0.0
    resumed: bool = False

    @property
    def ok(self) -> bool:
        """True when the point finished without an error."""
        return self.error is None


@dataclass(frozen=True)
class SweepResult:
    """All points of a sweep, in the order they were given, plus where they live."""

    points: tuple[PointResult, ...]
    folder: Path
    executor: str
    wall_s: float

    @property
    def failures(self) -> tuple[PointResult, ...]:
        """The points that raised, each with its config and traceback."""
        return tuple(p for p in self.points if not p.ok)

    @property
    def n_resumed(self) -> int:
        """How many points were read back from an earlier run instead of recomputed."""
        return sum(p.resumed for p in self.points)

    def results(self) -> list[dict[str, Any]]:
        """The results of all points in order; raises :class:`SweepError` if any point failed."""
        self.raise_for_failures()
        return [p.result for p in self.points]  # type: ignore[misc]

    def raise_for_failures(self) -> None:
        """Raise :class:`SweepError` naming every failed point's config, seed, error and traceback."""
        if not self.failures:
            return
        parts = [f"{len(self.failures)} of {len(self.points)} sweep points failed (results of the others are "
                 f"kept in {self.folder}):"]
        for p in self.failures:
            parts.append(f"- point {p.key} config={json.dumps(p.point.config)} seed={p.point.seed}: "
                         f"{p.error}\n{p.traceback}")
        raise SweepError("\n".join(parts))


@dataclass(frozen=True)
class SweepOptions:
    """How sweeps run: the executor and its settings (see the module docstring).

    Attributes
    ----------
    executor : one of :data:`EXECUTORS`.
    address : Dask scheduler address (``tcp://HOST:PORT``); None starts a LocalCluster.
    partition : SLURM partition (``executor="slurm"``).
    max_workers : worker processes (process pool, LocalCluster); default ``min(4, os.cpu_count())``.
    threads : torch threads per point (the same for every executor, so results match); None leaves torch's.
    resume : reuse the result files of finished points found in the folder.
    progress : show a tqdm bar over points.
    store : root folder under which experiments keep their sweep points between runs (set by the CLI);
        None means each experiment keeps them inside its own output folder.
    slurm_timeout_min, slurm_cpus_per_task, slurm_mem_gb : SLURM job resources.
    slurm_cluster : submitit cluster type (None: auto-detect SLURM; "local" or "debug" run jobs on this
        machine, which is how the SLURM path is tested without a cluster).
    """

    executor: str = "inprocess"
    address: str | None = None
    partition: str | None = None
    max_workers: int | None = None
    threads: int | None = 1
    resume: bool = False
    progress: bool = True
    store: str | None = None
    slurm_timeout_min: int = 60
    slurm_cpus_per_task: int = 1
    slurm_mem_gb: float | None = None
    slurm_cluster: str | None = None

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ParameterError(f"executor must be one of {list(EXECUTORS)}, got {self.executor!r}")
        for name in ("max_workers", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ParameterError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.address is not None and self.executor != "dask":
            raise ParameterError(f"address is only used with executor='dask', got executor={self.executor!r}")
        if self.partition is not None and self.executor != "slurm":
            raise ParameterError(
                f"partition is only used with executor='slurm', got executor={self.executor!r}")

    def folder_for(self, name: str, default: str | os.PathLike) -> Path:
        """Where experiment ``name`` keeps its points: ``<store>/<name>`` if a store is set, else
        ``default``."""
        return Path(self.store) / name if self.store is not None else Path(default)


_OPTIONS: contextvars.ContextVar[SweepOptions | None] = contextvars.ContextVar(
    "layerwise_sweep_options", default=None)


def current_options() -> SweepOptions:
    """The sweep options in effect (set with :func:`sweep_options`; defaults otherwise)."""
    return _OPTIONS.get() or SweepOptions()


def _replace_options(opts: SweepOptions, changes: Mapping[str, Any]) -> SweepOptions:
    """``opts`` with the fields in ``changes`` replaced; unknown names raise :class:`ParameterError`."""
    names = {f.name for f in dataclasses.fields(SweepOptions)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ParameterError(f"unknown sweep option(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(opts, **changes)


@contextlib.contextmanager
def sweep_options(**changes: Any) -> Iterator[SweepOptions]:
    """Within the block, sweeps run with the current options updated by ``changes`` (e.g. the CLI's
    ``--executor dask --resume``); experiments pick them up through :func:`run_sweep`'s defaults."""
    new = _replace_options(current_options(), changes)
    token = _OPTIONS.set(new)
    try:
        yield new
    finally:
        _OPTIONS.reset(token)


# --------------------------------------------------------------------------------------------- one point
def _execute(fn: PointFn, config: dict[str, Any], seed: int, threads: int | None) -> dict[str, Any]:
    """Run one point wherever it lands; never raises (a failure comes back as data)."""
    start = time.perf_counter()
    previous = None
    try:
        if threads is not None:
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
        result = fn(dict(config), seed)
        if not isinstance(result, Mapping):
            raise TypeError(f"the point function must return a mapping, got {type(result).__name__}")
        out = {"result": _canonical(result)}
    except Exception as exc:  # reported with the point, the sweep goes on
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        if previous is not None:
            import torch

            torch.set_num_threads(previous)
    out["runtime_s"] = round(time.perf_counter() - start, 4)
    return out


def _read_finished(path: Path, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: recompute (the write is atomic, so this is a foreign file)
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("key") != key:
        return None
    return data


def _record(folder: Path, fn_name: str, point: Point, key: str, out: Mapping[str, Any]) -> PointResult:
    """Write a finished point's file (atomically) and return its PointResult."""
    base = {"format": _FORMAT, "key": key, "fn": fn_name, "config": point.config, "seed": point.seed,
            "runtime_s": out["runtime_s"]}
    failed = folder / f"{key}.failed.json"
    if "error" in out:
        write_json(failed, {**base, "error": out["error"], "traceback": out["traceback"]})
        return PointResult(point, key, None, out["error"], out["traceback"], out["runtime_s"])
    write_json(folder / f"{key}.json", {**base, "result": out["result"]})
    if failed.exists():
        failed.unlink()  # an earlier failure of this very point, written by a sweep
    return PointResult(point, key, out["result"], runtime_s=out["runtime_s"])


# --------------------------------------------------------------------------------------------- executors
@contextlib.contextmanager
def _pool(options: SweepOptions, folder: Path) -> Iterator[Any]:
    workers = options.max_workers or min(4, os.cpu_count() or 1)
    if options.executor == "process":
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=context)
        try:
            yield ex
        except BaseException:  # Ctrl-C or a failure here: drop the queued points, do not wait for them
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown(wait=True)
    elif options.executor == "dask":
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise MissingExtraError(
                "executor='dask' needs Dask distributed: pip install 'layerwise[dask]'") from exc
        with contextlib.ExitStack() as stack:
            if options.address is None:
                cluster = stack.enter_context(LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                    silence_logs=logging.ERROR))
                client = stack.enter_context(Client(cluster))
            else:
                client = stack.enter_context(Client(options.address))
            yield client.get_executor()
    elif options.executor == "slurm":
        try:
            import submitit
        except ImportError as exc:
            raise MissingExtraError(
                "executor='slurm' needs submitit: pip install 'layerwise[slurm]'") from exc
        ex = submitit.AutoExecutor(folder=str(folder / "submitit"), cluster=options.slurm_cluster)
        params: dict[str, Any] = {"timeout_min": options.slurm_timeout_min,
                                  "cpus_per_task": options.slurm_cpus_per_task}
        if options.slurm_mem_gb is not None:
            params["mem_gb"] = options.slurm_mem_gb
        if options.partition is not None:
            params["slurm_partition"] = options.partition
        ex.update_parameters(**params)
        yield ex
    else:  # pragma: no cover - validated in SweepOptions
        raise ParameterError(f"unknown executor {options.executor!r}")


def _died(exc: BaseException) -> dict[str, Any]:
    """The output of a point whose worker or job died; call it inside the ``except`` block."""
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(), "runtime_s": 0.0}


def _as_completed(jobs: Mapping[Any, int], executor: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(index, output)`` as jobs finish (futures, or submitit jobs polled)."""
    if executor != "slurm":
        for fut in cf.as_completed(list(jobs)):
            try:
                out = fut.result()
            except Exception as exc:  # the worker died (crash, OOM kill, lost node): a failed point
                out = _died(exc)
            yield jobs[fut], out
        return
    pending = dict(jobs)
    while pending:
        done = [job for job in pending if job.done()]
        for job in done:
            index = pending.pop(job)
            try:
                out = job.result()
            except Exception as exc:  # the job itself died (node failure, timeout, preemption...)
                out = _died(exc)
            yield index, out
        if pending and not done:
            time.sleep(0.5)


def _submit_all(ex: Any, executor: str, calls: list[tuple[int, tuple[Any, ...]]]) -> dict[Any, int]:
    """Submit ``_execute(*args)`` for every ``(index, args)``; SLURM gets one job array (submitit batch)."""
    if executor != "slurm":
        return {ex.submit(_execute, *args): index for index, args in calls}
    submitted = []
    with ex.batch():
        for _, args in calls:
            submitted.append(ex.submit(_execute, *args))
    return {job: index for job, (index, _) in zip(submitted, calls, strict=True)}


# --------------------------------------------------------------------------------------------- public
def run_sweep(
    fn: PointFn,
    points: Sequence[Point],
    folder: str | os.PathLike,
    options: SweepOptions | None = None,
    **changes: Any,
) -> SweepResult:
    """Run ``fn(config, seed)`` at every point, writing each result to ``folder`` as soon as it finishes.

    Parameters
    ----------
    fn : a module-level function ``fn(config: dict, seed: int) -> dict`` (JSON-serializable values).
    points : the points; duplicates (same config and seed) run once.
    folder : where the point files go (created if missing).
    options : the executor settings (default: :func:`current_options`); ``changes`` override its fields,
        e.g. ``executor="process", max_workers=2, resume=True``.

    Returns
    -------
    SweepResult -- in the order of ``points``; failed points carry their error and traceback (call
    :meth:`SweepResult.results` to get the results or a :class:`SweepError`).
    """
    if not callable(fn):
        raise ParameterTypeError(f"fn must be callable, got {type(fn).__name__}")
    opts = options if options is not None else current_options()
    if changes:
        opts = _replace_options(opts, changes)
    points = list(points)
    for i, p in enumerate(points):
        if not isinstance(p, Point):
            raise ParameterTypeError(f"points[{i}] must be a Point, got {type(p).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = _fn_name(fn)
    keys = [point_key(name, p.config, p.seed) for p in points]
    start = time.perf_counter()

    done: dict[str, PointResult] = {}
    todo: dict[str, int] = {}  # key -> index of its first point
    for i, (p, key) in enumerate(zip(points, keys, strict=True)):
        if key in done or key in todo:
            continue
        data = _read_finished(folder / f"{key}.json", key) if opts.resume else None
        if data is not None:
            done[key] = PointResult(p, key, data["result"], runtime_s=float(data.get("runtime_s", 0.0)),
                                    resumed=True)
        else:
            todo[key] = i

    from tqdm.auto import tqdm

    bar = tqdm(total=len(done) + len(todo), initial=len(done), desc=f"sweep ({opts.executor})", unit="pt",
               disable=not opts.progress, file=sys.stderr)
    try:
        if opts.executor == "inprocess":
            for key, i in todo.items():
                done[key] = _record(folder, name, points[i], key,
                                    _execute(fn, points[i].config, points[i].seed, opts.threads))
                bar.update()
        elif todo:
            with _pool(opts, folder) as ex:
                calls = [(i, (fn, points[i].config, points[i].seed, opts.threads)) for i in todo.values()]
                jobs = _submit_all(ex, opts.executor, calls)
                for i, out in _as_completed(jobs, opts.executor):
                    done[keys[i]] = _record(folder, name, points[i], keys[i], out)
                    bar.update()
    finally:
        bar.close()
    results = tuple(dataclasses.replace(done[key], point=p) for p, key in zip(points, keys, strict=True))
    failures = [r for r in results if not r.ok]
    if failures and opts.progress:
        tqdm.write(f"[sweep] {len(failures)} point(s) failed; see {folder}/*.failed.json", file=sys.stderr)
    return SweepResult(points=results, folder=folder, executor=opts.executor,
                       wall_s=round(time.perf_counter() - start, 3))
