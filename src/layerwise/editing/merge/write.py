"""Merge output: run a plan into a sharded safetensors folder (atomically) or into tensors in memory.

:func:`execute_plan` copies the base folder's side files (config, tokenizer), fixes the dtype recorded in
a copied ``config.json``, writes the record ``layerwise_merge.json`` and the model card;
:func:`merge_models` plans (:mod:`.plan`) and runs (:mod:`.stream`) a merge in one call.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..._io import OUTPUT_MARKER, atomic_directory, check_output_dir, is_temporary_name, write_json
from ..checkpoints import SAFETENSORS_INDEX, WEIGHT_SUFFIXES, ShardedSafetensorsWriter
from .plan import DTYPE_CHOICES, MergePlan, plan_merge
from .stream import MergeResult, run_passes

__all__ = ["execute_plan", "merge_models", "write_merged"]


def execute_plan(
    plan: MergePlan,
    out: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    copy_files: bool = True,
    record: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    model_card: bool = True,
) -> MergeResult:
    """Run a plan: write sharded safetensors into ``out`` atomically, or return the tensors (``out=None``).

    With ``out``, non-weight files of a base model folder (config, tokenizer…) are copied along when
    ``copy_files`` (a copied ``config.json`` gets its ``torch_dtype``/``dtype`` set to the dtype written),
    and ``layerwise_merge.json`` records the plan, the parameters and the LiNeS table. With ``model_card``
    the folder gets a ``README.md`` model card and, when ``record`` holds the ``config`` mapping (and the
    original file's text as ``config_text``), ``layerwise_merge.yaml`` re-running the merge
    (:mod:`..model_card`).
    With LiNeS and an automatic alpha, the merged task vector of the alpha pass is stashed (in memory, or
    in float32 safetensors inside the temporary output folder, deleted before it is renamed into place).

    ``out`` is checked first with :func:`layerwise._io.check_output_dir`: an existing non-empty folder is
    replaced only with ``overwrite`` and only if an earlier layerwise run created it; an input's folder
    (or one containing an input) is always refused. Every merged chunk is checked for inf/NaN before it is
    written: the first non-finite tensor raises :class:`~layerwise.errors.ParameterError`
    (:class:`~layerwise.errors.CheckpointError` if the base's tensor already holds inf/NaN) and nothing
    appears at ``out``.
    """
    if not isinstance(plan, MergePlan):  # a slices merge (several plans, one output)
        from .slices import execute_sliced

        return execute_sliced(
            plan,
            out,
            progress=progress,
            copy_files=copy_files,
            record=record,
            overwrite=overwrite,
            model_card=model_card,
        )
    if out is None:
        tensors = {k: torch.empty(plan.base.shape(k), dtype=plan.out_dtype(k)) for k in plan.base.keys()}

        def to_memory(key, chunk, start):
            tensors[key].view(-1)[start : start + chunk.numel()] = chunk

        result = run_passes(plan, to_memory, None, progress)
        result.tensors = tensors
        return result
    inputs = [c.source for c in (plan.base, *plan.models) if not c.source.startswith("<")]
    out = check_output_dir(out, overwrite=overwrite, inputs=inputs)
    specs = [(k, plan.base.shape(k), plan.out_dtype(k)) for k in plan.base.keys()]
    with atomic_directory(out) as tmp:
        def passes(sink):
            return run_passes(plan, sink, tmp / ".lines_stash", progress)

        result = write_merged(tmp, specs, plan.max_shard_bytes, passes)
        if copy_files:
            _copy_side_files(Path(plan.base.source), tmp)
            if plan.dtype is not None:
                _set_config_dtype(tmp / "config.json", plan.dtype)
        if plan.union_vocabulary is not None:  # the union tokenizer replaces the base's
            from ..vocab_union import write_tokenizer

            write_tokenizer(plan.union_vocabulary, tmp)
        result.info.update(record or {})
        if model_card:
            from ..model_card import finish_output

            finish_output(
                tmp,
                result.info,
                plan.method,
                config=(record or {}).get("config"),
                source_text=(record or {}).get("config_text"),
            )
        write_json(tmp / "layerwise_merge.json", result.info)
    result.out = out
    return result


def write_merged(
    folder: Path,
    specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
    max_shard_bytes: int,
    passes: Callable[[Callable[[str, torch.Tensor, int], None]], Any],
) -> Any:
    """Run ``passes(sink)`` into sharded safetensors in ``folder`` (laid out from ``specs``); its result.

    ``sink(key, chunk, start)`` hands each chunk to two background threads (:class:`WriteBehind`): one
    writes it, one hashes it, so that the folder marker of :func:`layerwise._io.atomic_directory` need not
    read the output back (hashing in the writer's own thread was slower whenever writing lagged). On an
    error or Ctrl-C the pending chunks are dropped (the temporary folder is discarded by the caller).
    """
    writer = ShardedSafetensorsWriter(
        folder, specs, max_shard_bytes, metadata={"format": "pt", "merged_by": "layerwise"}, hash_files=True
    )
    behind = (WriteBehind(writer.write), WriteBehind(writer.hash_chunk))

    def sink(key: str, chunk: torch.Tensor, start: int) -> None:
        for b in behind:
            b(key, chunk, start)

    try:
        result = passes(sink)
        for b in behind:
            b.close()  # raises the first write error
    except BaseException:
        for b in behind:
            b.abort()  # do not wait for pending writes
        raise
    writer.close()
    return result


class WriteBehind:
    """A sink that hands each chunk to ``write`` in a background thread (writing it, or hashing it: both
    release the GIL), so reading and merging the next chunks overlap the work on this one. At most
    ``depth`` chunks wait (memory ``depth`` chunks); the first error is raised by the next call or by
    :meth:`close`.

    >>> out = {}
    >>> sink = WriteBehind(lambda k, c, s: out.setdefault(k, []).append((s, c.tolist())))
    >>> sink("w", torch.ones(2), 0); sink("w", torch.zeros(1), 2); sink.close()
    >>> out["w"]
    [(0, [1.0, 1.0]), (2, [0.0])]
    """

    def __init__(self, write: Any, depth: int = 4) -> None:
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._loop, name="layerwise-write-behind", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None and not self._aborted:
                try:
                    self._write(*item)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self._error = err

    def __call__(self, key: str, chunk: torch.Tensor, start: int) -> None:
        """Queue ``chunk`` (not to be modified afterwards) for writing at element ``start`` of ``key``."""
        if self._error is not None:
            raise self._error
        self._queue.put((key, chunk, start))

    def abort(self) -> None:
        """Drop the queued chunks and return at once (the thread ends after the write in progress)."""
        self._aborted = True
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # pragma: no cover - emptied just above; the thread skips what is left
            pass

    def close(self) -> None:
        """Wait until every queued chunk is written; raise the first write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def _set_config_dtype(config: Path, dtype: torch.dtype) -> None:
    """Set ``torch_dtype``/``dtype`` (at any depth: text/vision sub-configs) of a copied ``config.json``."""
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return  # not ours to fix; copied as it was
    name = str(dtype).replace("torch.", "")
    known = set(DTYPE_CHOICES) | {"float", "half", "bfloat16"}

    def fix(node: Any) -> bool:
        changed = False
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("torch_dtype", "dtype") and isinstance(v, str) and v.replace("torch.", "") in known:
                    if v != name:
                        node[k] = name
                        changed = True
                else:
                    changed = fix(v) or changed
        elif isinstance(node, list):
            for v in node:
                changed = fix(v) or changed
        return changed

    if fix(data):
        config.unlink()  # a copy inside the temporary folder: replace it with the corrected one
        write_json(config, data)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copy config/tokenizer files (anything but weights and indexes, under 100 MB) of a model folder."""
    if not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        if (
            f.is_file()
            and f.name not in (OUTPUT_MARKER, "layerwise_merge.json")
            and not is_temporary_name(f.name)
            and f.suffix not in WEIGHT_SUFFIXES
            and not f.name.endswith(".index.json")
            and f.name != SAFETENSORS_INDEX
            and f.stat().st_size < 100 * 10**6
            and not (dst / f.name).exists()
        ):
            shutil.copy2(f, dst / f.name)


def merge_models(
    method: str,
    models: Sequence[Any],
    base: Any = None,
    *,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    overwrite: bool = False,
    **kwargs: Any,
) -> MergeResult:
    """Plan and run a merge in one call (keyword arguments as in :func:`plan_merge`; ``out`` and
    ``overwrite`` as in :func:`execute_plan`).

    Example
    -------
    >>> base = {"layers.0.w": torch.zeros(4), "layers.1.w": torch.zeros(4)}
    >>> ft = [{k: torch.full((4,), float(i + 1)) for k in base} for i in range(2)]
    >>> merge_models("task_arithmetic", ft, base).tensors["layers.1.w"]
    tensor([3., 3., 3., 3.])
    """
    plan = plan_merge(method, models, base, **kwargs)
    return execute_plan(plan, out, progress=progress, overwrite=overwrite)
