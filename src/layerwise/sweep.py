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
* ``"dask"``: Dask distributed (extra ``dask``), on the existing cluster whose scheduler is at ``scheduler``
  (``tcp://HOST:PORT``) or, without one, on a ``LocalCluster`` of ``max_workers`` single-threaded worker
  processes started for the sweep;
* ``"slurm"``: SLURM jobs through submitit (extra ``slurm``), submitted as one job array on ``partition``;
  each job runs ``slurm_points_per_job`` points (default 1) one after the other and writes each point's
  file as soon as it finishes, so a job that dies keeps its finished points. The ``slurm_*`` options set
  the job resources (time, CPUs, memory, GPUs, account, QoS, how many array jobs run at once); with
  ``slurm_requeue`` the jobs are submitted with ``--requeue`` and are checkpointable: a job that is
  preempted or reaches its time limit is requeued by submitit and skips the points it had finished. Job
  logs go to ``<folder>/submitit/``. Where no SLURM cluster is reachable (no ``sbatch``) it refuses in one
  line instead of falling back to this machine as submitit would; ``slurm_cluster="local"`` or ``"debug"``
  asks for submitit's stand-ins on this machine explicitly (see :func:`check_slurm_cluster`).

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
import shutil
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
    "SLURM_CLUSTERS",
    "Point",
    "PointResult",
    "SweepError",
    "SweepOptions",
    "SweepResult",
    "check_slurm_cluster",
    "current_options",
    "point_key",
    "run_sweep",
    "slurm_parameters",
    "sweep_options",
]

EXECUTORS = ("inprocess", "process", "dask", "slurm")
#: ``slurm_cluster`` values: None or "slurm" need a reachable SLURM cluster (``sbatch`` on PATH); "local"
#: and "debug" are submitit's stand-ins that run the jobs on this machine (asked for explicitly, never a
#: silent fallback).
SLURM_CLUSTERS = (None, "slurm", "local", "debug")
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
    scheduler : address (``tcp://HOST:PORT``) of the scheduler of an existing Dask cluster
        (``executor="dask"``); None starts a LocalCluster.
    partition : SLURM partition (``executor="slurm"``).
    max_workers : worker processes (process pool, LocalCluster); default ``min(4, os.cpu_count())``.
    threads : torch threads per point (the same for every executor, so results match); None leaves torch's.
    resume : reuse the result files of finished points found in the folder.
    progress : show a tqdm bar over points.
    store : root folder under which experiments keep their sweep points between runs (set by the CLI);
        None means each experiment keeps them inside its own output folder.
    slurm_timeout_min, slurm_cpus_per_task, slurm_mem_gb : SLURM job resources: time limit (minutes),
        CPUs and memory (GB) per job.
    slurm_gpus_per_job : GPUs per job (``--gpus-per-node``); 0 asks for none.
    slurm_account, slurm_qos : SLURM account to charge and quality of service (``--account``, ``--qos``).
    slurm_array_parallelism : at most this many jobs of the array run at once (``--array=0-N%K``); None
        leaves submitit's default (256).
    slurm_points_per_job : points run one after the other by each job (>= 1); results are still one file per
        point, written by the job as each finishes.
    slurm_requeue : submit with ``--requeue`` and make the jobs checkpointable, so that a preempted or timed
        out job is requeued and goes on with the points it had not finished.
    slurm_cluster : submitit cluster type: None or "slurm" need a reachable SLURM cluster (refused in one
        line where ``sbatch`` is not on PATH, see :func:`check_slurm_cluster`); "local" or "debug" run the
        jobs on this machine, asked for explicitly (how the SLURM path is tested without a cluster).
    """

    executor: str = "inprocess"
    scheduler: str | None = None
    partition: str | None = None
    max_workers: int | None = None
    threads: int | None = 1
    resume: bool = False
    progress: bool = True
    store: str | None = None
    slurm_timeout_min: int = 60
    slurm_cpus_per_task: int = 1
    slurm_mem_gb: float | None = None
    slurm_gpus_per_job: int = 0
    slurm_account: str | None = None
    slurm_qos: str | None = None
    slurm_array_parallelism: int | None = None
    slurm_points_per_job: int = 1
    slurm_requeue: bool = False
    slurm_cluster: str | None = None

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ParameterError(f"executor must be one of {list(EXECUTORS)}, got {self.executor!r}")
        for name in ("max_workers", "threads", "slurm_array_parallelism"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ParameterError(f"{name} must be an integer >= 1 or None, got {value!r}")
        for name, low in (("slurm_timeout_min", 1), ("slurm_cpus_per_task", 1), ("slurm_gpus_per_job", 0),
                          ("slurm_points_per_job", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ParameterError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("scheduler", "partition", "slurm_account", "slurm_qos"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ParameterError(f"{name} must be a non-empty string or None, got {value!r}")
        if self.slurm_cluster not in SLURM_CLUSTERS:
            raise ParameterError(f"slurm_cluster must be one of {list(SLURM_CLUSTERS)}, got "
                                 f"{self.slurm_cluster!r}")
        if not isinstance(self.slurm_requeue, bool):
            raise ParameterTypeError(f"slurm_requeue must be True or False, got {self.slurm_requeue!r}")
        if self.scheduler is not None and self.executor != "dask":
            raise ParameterError(
                f"scheduler is only used with executor='dask', got executor={self.executor!r}")
        defaults = SweepOptions.__dataclass_fields__
        slurm_only = [name for name in ("partition", "slurm_gpus_per_job", "slurm_account", "slurm_qos",
                                        "slurm_array_parallelism", "slurm_points_per_job", "slurm_requeue",
                                        "slurm_cluster")
                      if getattr(self, name) != defaults[name].default]
        if slurm_only and self.executor != "slurm":
            verb = "is" if len(slurm_only) == 1 else "are"
            raise ParameterError(f"{', '.join(slurm_only)} {verb} only used with executor='slurm', got "
                                 f"executor={self.executor!r}")

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
@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Within the block torch uses ``threads`` threads (None: unchanged); restored afterwards. Changing the
    count costs milliseconds (torch rebuilds its thread pool), so an equal count is left alone."""
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _execute(fn: PointFn, config: dict[str, Any], seed: int, threads: int | None) -> dict[str, Any]:
    """Run one point wherever it lands; never raises (a failure comes back as data)."""
    start = time.perf_counter()
    try:
        with _torch_threads(threads):
            result = fn(dict(config), seed)
        if not isinstance(result, Mapping):
            raise TypeError(f"the point function must return a mapping, got {type(result).__name__}")
        out = {"result": _canonical(result)}
    except Exception as exc:  # reported with the point, the sweep goes on
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
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
            if options.scheduler is None:
                cluster = stack.enter_context(LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                    silence_logs=logging.ERROR))
                client = stack.enter_context(Client(cluster))
            else:
                client = stack.enter_context(Client(options.scheduler))
            yield client.get_executor()
    elif options.executor == "slurm":
        try:
            import submitit
        except ImportError as exc:
            raise MissingExtraError(
                "executor='slurm' needs submitit: pip install 'layerwise[slurm]'") from exc
        ex = submitit.AutoExecutor(folder=str(folder / "submitit"), cluster=check_slurm_cluster(options))
        ex.update_parameters(**slurm_parameters(options))
        yield ex
    else:  # pragma: no cover - validated in SweepOptions
        raise ParameterError(f"unknown executor {options.executor!r}")


def check_slurm_cluster(options: SweepOptions) -> str:
    """The submitit cluster ``options`` run on: ``"slurm"`` only where SLURM is reachable.

    submitit's auto-detection falls back to running the jobs on this machine when it finds no SLURM; a
    user who asked for SLURM would then wait on a queue that does not exist. So with ``slurm_cluster``
    None or ``"slurm"`` and no ``sbatch`` on PATH this refuses (``ParameterError``, one line); ``"local"``
    and ``"debug"`` (submitit's stand-ins, asked for explicitly) are returned as they are.

    Returns
    -------
    str
        ``"slurm"``, ``"local"`` or ``"debug"``.
    """
    if options.slurm_cluster in ("local", "debug"):
        return options.slurm_cluster
    if shutil.which("sbatch") is None:
        raise ParameterError(
            "executor='slurm' but no SLURM cluster is reachable from this machine (no sbatch on PATH); run "
            "where sbatch works, choose another executor, or ask for submitit's stand-in on this machine "
            "explicitly with slurm_cluster='local' or 'debug' (CLI: --slurm-cluster local|debug)")
    return "slurm"


def slurm_parameters(options: SweepOptions) -> dict[str, Any]:
    """The keyword arguments of submitit's ``AutoExecutor.update_parameters`` for ``options``' SLURM jobs."""
    params: dict[str, Any] = {"timeout_min": options.slurm_timeout_min,
                              "cpus_per_task": options.slurm_cpus_per_task}
    if options.slurm_mem_gb is not None:
        params["mem_gb"] = options.slurm_mem_gb
    if options.slurm_gpus_per_job:
        params["gpus_per_node"] = options.slurm_gpus_per_job  # one node per job
    if options.partition is not None:
        params["slurm_partition"] = options.partition
    if options.slurm_account is not None:
        params["slurm_account"] = options.slurm_account
    if options.slurm_qos is not None:
        params["slurm_qos"] = options.slurm_qos
    if options.slurm_array_parallelism is not None:
        params["slurm_array_parallelism"] = options.slurm_array_parallelism
    if options.slurm_requeue:
        params["slurm_additional_parameters"] = {"requeue": True}
    return params


class _Chunk:
    """One SLURM job: run its points one after the other, writing each point's file as soon as it finishes.

    Called with ``[(key, config, seed), ...]``; returns the points' outputs (as :func:`_execute`) in order.
    """

    def __init__(self, fn: PointFn, name: str, folder: str, threads: int | None) -> None:
        self.fn, self.name, self.folder, self.threads = fn, name, folder, threads
        self.finished: dict[str, dict[str, Any]] = {}  # key -> output, kept across a requeue

    def __call__(self, items: list[tuple[str, dict[str, Any], int]]) -> list[dict[str, Any]]:
        for key, config, seed in items:
            if key not in self.finished:
                out = _execute(self.fn, config, seed, self.threads)
                _record(Path(self.folder), self.name, Point(config, seed), key, out)
                self.finished[key] = out
        return [self.finished[key] for key, _, _ in items]


class _RequeueableChunk(_Chunk):
    """A :class:`_Chunk` that submitit checkpoints when the job is preempted or times out: the requeued job
    carries the outputs of the points already finished and runs only the others."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The submission that submitit requeues: this chunk, with its finished points, and its arguments."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _died(exc: BaseException) -> dict[str, Any]:
    """The output of a point whose worker or job died with ``exc``."""
    return {"error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "runtime_s": 0.0}


def _as_completed(jobs: Mapping[Any, list[int]], executor: str
                  ) -> Iterator[tuple[list[int], list[dict[str, Any]] | BaseException]]:
    """Yield ``(indices, outputs)`` as jobs finish (futures, or submitit jobs polled); ``outputs`` is the
    exception when the worker or job died."""
    if executor != "slurm":
        for fut in cf.as_completed(list(jobs)):
            try:
                outs: list[dict[str, Any]] | BaseException = [fut.result()]
            except Exception as exc:  # the worker died (crash, OOM kill, lost node): a failed point
                outs = exc
            yield jobs[fut], outs
        return
    pending = dict(jobs)
    while pending:
        done = [job for job in pending if job.done()]
        for job in done:
            indices = pending.pop(job)
            try:
                outs = job.result()
            except Exception as exc:  # the job itself died (node failure, timeout, preemption...)
                outs = exc
            yield indices, outs
        if pending and not done:
            time.sleep(0.5)


def _submit_all(ex: Any, opts: SweepOptions, fn: PointFn, name: str, folder: Path,
                items: list[tuple[int, str, Point]]) -> dict[Any, list[int]]:
    """Submit every ``(index, key, point)``: one :func:`_execute` per point to a pool; for SLURM one job
    array (submitit batch) whose jobs each run ``slurm_points_per_job`` points (a :class:`_Chunk`)."""
    if opts.executor != "slurm":
        return {ex.submit(_execute, fn, p.config, p.seed, opts.threads): [index] for index, _, p in items}
    size = opts.slurm_points_per_job
    chunks = [items[k:k + size] for k in range(0, len(items), size)]
    kind = _RequeueableChunk if opts.slurm_requeue else _Chunk
    submitted = []
    with ex.batch():
        for chunk in chunks:
            job_fn = kind(fn, name, str(folder), opts.threads)
            submitted.append(ex.submit(job_fn, [(key, p.config, p.seed) for _, key, p in chunk]))
    return {job: [index for index, _, _ in chunk] for job, chunk in zip(submitted, chunks, strict=True)}


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
            with _torch_threads(opts.threads):  # once for the whole sweep, not per point
                for key, i in todo.items():
                    done[key] = _record(folder, name, points[i], key,
                                        _execute(fn, points[i].config, points[i].seed, opts.threads))
                    bar.update()
        elif todo:
            with _pool(opts, folder) as ex:
                items = [(i, key, points[i]) for key, i in todo.items()]
                jobs = _submit_all(ex, opts, fn, name, folder, items)
                for indices, outs in _as_completed(jobs, opts.executor):
                    for n, i in enumerate(indices):
                        if not isinstance(outs, BaseException):
                            done[keys[i]] = _record(folder, name, points[i], keys[i], outs[n])
                        elif opts.executor == "slurm" and (
                                data := _read_finished(folder / f"{keys[i]}.json", keys[i])) is not None:
                            # the dead job had finished (and written) this point before it died
                            done[keys[i]] = PointResult(points[i], keys[i], data["result"],
                                                        runtime_s=float(data.get("runtime_s", 0.0)))
                        else:
                            done[keys[i]] = _record(folder, name, points[i], keys[i], _died(outs))
                        bar.update()
    finally:
        bar.close()
    results = tuple(dataclasses.replace(done[key], point=p) for p, key in zip(points, keys, strict=True))
    failures = [r for r in results if not r.ok]
    if failures and opts.progress:
        tqdm.write(f"[sweep] {len(failures)} point(s) failed; see {folder}/*.failed.json", file=sys.stderr)
    return SweepResult(points=results, folder=folder, executor=opts.executor,
                       wall_s=round(time.perf_counter() - start, 3))
