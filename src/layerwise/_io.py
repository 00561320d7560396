"""Atomic file output shared by experiments, the CLI and the library.

Every writer goes through a temporary file in the destination folder and ``os.replace`` so that an
interrupted run never leaves a half-written file behind (``os.replace`` is atomic on POSIX and Windows
when source and destination are on the same file system).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "OUTPUT_MARKER",
    "atomic_path",
    "atomic_directory",
    "check_output_dir",
    "check_output_file",
    "is_temporary_name",
    "read_npy",
    "read_yaml",
    "write_json",
    "write_csv",
    "save_figure",
    "to_jsonable",
]


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file is removed if the block raises, so ``path`` is either the old file or the new one.
    The suffix of ``path`` is kept on the temporary name because some writers (``np.savez``,
    ``matplotlib``) pick their format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates files readable by the owner only; give the result the usual permissions.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


OUTPUT_MARKER = ".layerwise-output"
"""Name of the small JSON file that marks a folder as created by layerwise (see :func:`atomic_directory`)."""

_MARKER_NEW = OUTPUT_MARKER + ".new"  # the marker being rewritten (see _drop_writer)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(?P<kind>tmp|old)$")


def is_temporary_name(name: str) -> bool:
    """True for the names :func:`atomic_directory` gives its temporary and set-aside folders.

    Listings of results (the HTML report) skip these: ``.NAME.xxxxxxxx.tmp`` and ``.NAME.xxxxxxxx.old``.
    """
    return _LEFTOVER.match(name) is not None


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("created_by") == "layerwise" else None


def _write_marker(folder: Path, info: Mapping[str, Any]) -> None:
    text = json.dumps({"created_by": "layerwise", **info}, indent=1, sort_keys=True)
    (folder / OUTPUT_MARKER).write_text(text + "\n", encoding="utf-8")


_HASHES: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256: a folder checked twice is read once


def _hash_key(p: Path) -> tuple:
    """Key of :data:`_HASHES`: a change of the file's content changes its size or mtime."""
    st = p.lstat()
    return (str(p), st.st_ino, st.st_size, st.st_mtime_ns)


def _sha256(p: Path) -> str:
    """sha256 of a file's bytes (of the target text for a symbolic link), in hex."""
    if p.is_symlink():
        return hashlib.sha256(os.readlink(p).encode("utf-8", "surrogateescape")).hexdigest()
    key = _hash_key(p)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def remember_sha256(path: str | os.PathLike, hexdigest: str) -> None:
    """Record the sha256 of a file just written, computed while writing it, so that the folder marker of
    :func:`atomic_directory` does not read it back. Keyed by (path, inode, size, mtime) like the cache of
    files hashed by reading: a later change of the file is a new key, and the file is read and hashed."""
    _HASHES[_hash_key(Path(path))] = hexdigest


def _listing(folder: Path) -> dict[str, Path]:
    """``{relative path: path}`` of every file under ``folder`` (the marker excluded; links not followed)."""
    out = {}
    for root, dirs, files in os.walk(folder):  # links to folders are listed (in dirs), not followed
        for f in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            p = Path(root) / f
            rel = p.relative_to(folder).as_posix()
            if rel not in (OUTPUT_MARKER, _MARKER_NEW):
                out[rel] = p
    return out


def _drop_writer(folder: Path) -> None:
    """Rewrite the marker of a finished output without the writer's pid and host (atomically), so that two
    runs writing the same files give byte-identical folders and no host name ships with the output."""
    marker = _read_marker(folder)
    if marker is None:
        return
    info = {k: v for k, v in marker.items() if k not in ("created_by", "pid", "host")}
    new = folder / _MARKER_NEW
    new.write_text(json.dumps({"created_by": "layerwise", **info}, indent=1, sort_keys=True) + "\n",
                   encoding="utf-8")
    os.replace(new, folder / OUTPUT_MARKER)


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of the files under ``folder`` (marker excluded)."""
    return {rel: {"size": p.lstat().st_size, "sha256": _sha256(p)} for rel, p in _listing(folder).items()}


def _unchanged(p: Path, entry: Any) -> bool:
    """True when the file ``p`` still has the size and sha256 recorded for it in a marker."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return False
    try:
        return p.lstat().st_size == entry.get("size") and _sha256(p) == entry["sha256"]
    except OSError:
        return False


_UNVERIFIABLE = "unverifiable"


def _foreign_files(folder: Path) -> list[str] | str | None:
    """Files under ``folder`` that layerwise did not write there, or that changed since: None when the
    folder has no valid marker (nothing in it is known to be ours); ``"unverifiable"`` when the marker was
    written by an older layerwise that recorded sizes but no content hashes; ``[]`` when every file is listed
    in the marker with its size and sha256 and still has them."""
    marker = _read_marker(folder)
    if marker is None or not isinstance(marker.get("files"), dict):
        return None
    listed = marker["files"]
    if any(not isinstance(v, dict) or not isinstance(v.get("sha256"), str) for v in listed.values()):
        return _UNVERIFIABLE
    return sorted(rel for rel, p in _listing(folder).items() if not _unchanged(p, listed.get(rel)))


def _replaceable(path: Path) -> str | None:
    """None when ``path`` may be replaced by a new layerwise output; otherwise why not (one line)."""
    if path.is_symlink():
        return f"{path} is a symbolic link; give the folder it points to, or a new folder"
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{path} is an existing file, not a folder; choose a new folder name"
    if not any(path.iterdir()):
        return None
    foreign = _foreign_files(path)
    if foreign is None:
        return (
            f"{path} is a non-empty folder that layerwise did not create (no {OUTPUT_MARKER} file); "
            "refusing to replace it: choose a new or empty folder"
        )
    if foreign == _UNVERIFIABLE:
        return (
            f"{path} was written by an older layerwise whose {OUTPUT_MARKER} file records no content "
            "hashes, so it cannot be verified that its files are unchanged; refusing to replace it: delete "
            "it yourself or choose a new folder"
        )
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return (
            f"{path} holds files layerwise did not write or that changed since ({shown}); refusing to "
            "replace it: move them away or choose a new folder"
        )
    return None


def _pid_alive(pid: Any) -> bool:
    if os.name != "posix" or not isinstance(pid, int) or pid <= 0:
        return True  # cannot tell: keep the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _clean_leftovers(path: Path) -> None:
    """Deal with the temporary folders a killed run of :func:`atomic_directory` left next to ``path``.

    ``.NAME.*.tmp`` folders whose marker names a process of this machine that no longer runs are deleted;
    a ``.NAME.*.old`` folder (the previous output, set aside just before the new one was renamed into place)
    is moved back to ``path`` when ``path`` is missing, and deleted otherwise. Folders without our marker
    are never touched.
    """
    try:
        entries = sorted(path.parent.iterdir())
    except OSError:
        return
    host = socket.gethostname()
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m is None or m["name"] != path.name or entry.is_symlink() or not entry.is_dir():
            continue
        marker = _read_marker(entry)
        if marker is None:
            continue
        if m["kind"] == "tmp":
            if marker.get("host") == host and not _pid_alive(marker.get("pid")):
                shutil.rmtree(entry, ignore_errors=True)
        elif not path.exists() and not path.is_symlink():
            os.replace(entry, path)  # the previous output, interrupted between the two renames
        elif _foreign_files(entry) == []:
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` as a whole.

    Only what layerwise created is ever replaced: ``path`` must be missing, an empty folder, or a folder
    written by an earlier ``atomic_directory`` whose files are all still as written (the folder carries a
    :data:`OUTPUT_MARKER` file listing them with their sizes and sha256 content hashes; a marker without
    hashes, from an older layerwise, cannot be verified and is refused). Anything else raises
    :class:`~layerwise.errors.OutputPathError` before the block runs, and again just before the rename.

    An existing ``path`` is moved aside first and deleted only after the new folder is in place. If the
    block raises (including ``KeyboardInterrupt``) the temporary folder is deleted and ``path`` is untouched.
    Temporary folders left by a killed run (``.NAME.xxxxxxxx.tmp`` / ``.old``) are cleaned up on the next
    call for the same ``path`` (see :func:`is_temporary_name`).
    """
    from .errors import OutputPathError

    path = Path(path)
    _clean_leftovers(path)
    problem = _replaceable(path)
    if problem:
        raise OutputPathError(problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_marker(tmp, {"pid": os.getpid(), "host": socket.gethostname(), "state": "being written"})
        yield tmp
        # the writer's pid and host stay in the marker until the rename, so that a run killed between here
        # and the rename leaves a folder the next run can recognise as abandoned and delete
        writer = {"pid": os.getpid(), "host": socket.gethostname()}
        _write_marker(tmp, {**writer, "files": _manifest(tmp)})
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp folders are owner-only
        problem = _replaceable(path)
        if problem:
            raise OutputPathError(problem)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
        os.replace(tmp, path)
        _drop_writer(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _resolve(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _check_against_inputs(out: Path, inputs: Sequence[Any], what: str, shown: Any) -> None:
    from .errors import OutputPathError

    for given in inputs:
        if not isinstance(given, (str, os.PathLike)):
            continue  # in-memory inputs (state dicts) have no path
        inp = _resolve(given)
        if not (inp.exists() or inp.is_symlink()):
            continue  # e.g. a model id of the Hugging Face hub: nothing on disk to protect
        for o in {out, Path(os.path.realpath(out))}:
            for cand in {inp, Path(os.path.realpath(inp))}:
                folder = cand if cand.is_dir() else cand.parent
                if o in (cand, folder):
                    raise OutputPathError(
                        f"{what} {shown} is the input {given} or its folder; choose a new folder"
                    )
                if o in cand.parents:
                    raise OutputPathError(f"{what} {shown} contains the input {given}; choose a new folder")


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike] = (),
    collection: bool = False,
) -> Path:
    """Check, before any work starts, that writing the output folder ``out`` cannot destroy anything.

    Call it in a command before loading models or computing, then write through
    :func:`atomic_directory` (which repeats the marker check right before its rename).

    Parameters
    ----------
    out : path
        The output folder the command will create (or replace as a whole).
    overwrite : bool
        Allow replacing a non-empty ``out`` that an earlier layerwise run created (it carries the
        :data:`OUTPUT_MARKER` file and holds only the files that run wrote, each with the sha256 recorded
        in the marker). A folder that layerwise did not create, one where files were added or changed since
        (even keeping their size), or one whose marker records no hashes, is refused even with
        ``overwrite``.
    inputs : sequence of paths
        Files or folders the command reads (checkpoints, configs, data). ``out`` may not be an input,
        an input's folder, or a folder containing an input, whatever ``overwrite`` says. Entries that are not
        paths, or do not exist on disk (model ids of the hub), are skipped.
    collection : bool
        ``out`` is a folder that receives named subfolders, each written by its own
        :func:`atomic_directory` (``layerwise reproduce``): an existing, non-empty ``out`` is then fine and
        ``overwrite`` is not consulted for it (check each subfolder with ``overwrite=True`` to fail early on
        one layerwise did not create).

    Returns
    -------
    Path
        ``out`` as an absolute path (symbolic links in parent folders kept; ``out`` itself may not be one).

    Raises
    ------
    OutputPathError
        One line naming the path: ``out`` is an existing file or a symbolic link, the current directory or a
        folder containing it, an input or an input's folder or a parent of an input, or a non-empty folder
        (without ``overwrite``, or not created by layerwise).
    ParameterTypeError
        ``out`` is not a path.
    """
    from .errors import OutputPathError, ParameterTypeError

    if not isinstance(out, (str, os.PathLike)) or str(out) == "":
        raise ParameterTypeError(f"out must be a folder path, got {out!r}")
    if not isinstance(overwrite, bool):
        raise ParameterTypeError(f"overwrite must be True or False, got {overwrite!r}")
    what = "output folder"
    path = _resolve(out)
    cwd = _resolve(os.getcwd())
    if path == cwd or path in cwd.parents:
        raise OutputPathError(
            f"{what} {out} is the current directory or contains it; give a new folder, e.g. {out}/merged"
            if path == cwd
            else f"{what} {out} contains the current directory; choose a new folder"
        )
    if path.is_symlink():
        raise OutputPathError(f"{what} {out} is a symbolic link; give the folder it points to, or a new one")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {out} is an existing file, not a folder; choose a new folder name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{what} {out} cannot be created: {ancestor} is a file, not a folder")
    _check_against_inputs(path, inputs, what, out)
    if collection:
        return path
    # a run killed between its two renames left the earlier output set aside (.NAME.xxxxxxxx.old): put it
    # back first, so that --overwrite is asked for exactly as if the kill had not happened
    _clean_leftovers(path)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputPathError(
                f"{what} {out} exists and is not empty; choose a new folder, or pass --overwrite to "
                "replace an earlier layerwise output"
            )
        problem = _replaceable(path)
        if problem:
            raise OutputPathError(problem)
    return path


def check_output_file(
    out: str | os.PathLike, *, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()
) -> Path:
    """Check, before any work starts, that writing the single file ``out`` cannot destroy anything.

    Refused (:class:`~layerwise.errors.OutputPathError`, one line naming the path): ``out`` is an existing
    folder, equals one of ``inputs``, or is an existing file while ``overwrite`` is False. Write it with
    :func:`atomic_path`. Returns ``out`` as an absolute path.
    """
    from .errors import OutputPathError, ParameterTypeError

    if not isinstance(out, (str, os.PathLike)) or str(out) == "":
        raise ParameterTypeError(f"out must be a file path, got {out!r}")
    path = _resolve(out)
    if path.is_dir():
        raise OutputPathError(f"output file {out} is an existing folder; give a file name")
    for given in inputs:
        if isinstance(given, (str, os.PathLike)) and (
            _resolve(given) == path or os.path.realpath(given) == os.path.realpath(path)
        ):
            raise OutputPathError(f"output file {out} is the input {given}; choose another name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputPathError(
            f"output file {out} exists; choose a new name, or pass --overwrite to replace it"
        )
    return path


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, paths and dataclasses into plain JSON types.

    Non-finite floats become ``None`` (JSON has no NaN); Python ints of any size stay exact.
    """
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically. Returns the path."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write a list of flat dicts as CSV (header from the union of keys, in first-seen order), atomically."""
    fields: list[str] = []
    for row in rows:
        for key in row:
            if key not in fields:
                fields.append(key)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: to_jsonable(v) for k, v in row.items()})
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def read_npy(path: str | os.PathLike, *, what: str = "data") -> Any:
    """Read a ``.npy`` file safely: a numeric numpy array in native byte order, or a one-line error.

    Pickles are never loaded (``allow_pickle=False``). Every way the file can be unusable (missing, a
    folder, empty (0 bytes), not a ``.npy`` (an ``.npz`` archive, text), truncated, object or string dtype)
    raises :class:`~layerwise.errors.InputDataError` naming ``what`` and the path.

    Parameters
    ----------
    path : path
        The ``.npy`` file.
    what : str
        What the file is, for the error message (e.g. ``"--data"``).

    Returns
    -------
    numpy.ndarray
        The array (bool, integer or floating dtype), C-contiguous.
    """
    import numpy as np

    from .errors import InputDataError

    p = Path(path)
    if not p.exists():
        raise InputDataError(f"{what} {p}: file not found")
    if not p.is_file():
        raise InputDataError(f"{what} {p} is not a file")
    if p.stat().st_size == 0:
        raise InputDataError(f"{what} {p} is empty (0 bytes), not a .npy array")
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError, TypeError, EOFError) as err:
        raise InputDataError(f"{what} {p} cannot be read as a .npy array: {err}") from None
    if not isinstance(arr, np.ndarray):  # np.load opens .npz archives too
        if hasattr(arr, "close"):
            arr.close()
        raise InputDataError(f"{what} {p} is a .npz archive, not a .npy array; save one array with np.save")
    if arr.dtype.kind not in "biuf":
        raise InputDataError(f"{what} {p} holds dtype {arr.dtype}, not numbers (bool, int or float)")
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))


def read_yaml(path: str | os.PathLike, *, what: str = "config") -> Any:
    """Read a YAML file with ``yaml.safe_load``; every failure is one :class:`~layerwise.errors.ConfigError`.

    Missing file, a folder, bytes that are not UTF-8, invalid YAML, values the YAML constructors refuse
    (``seed: 2001-13-45``) and nesting deep enough to exhaust Python's recursion limit all give one line that
    starts with the path.

    Parameters
    ----------
    path : path
        The YAML file.
    what : str
        What the file is, for the "not found" message.

    Returns
    -------
    Any
        What the document holds (a mapping, a list, a scalar or None).
    """
    import yaml

    from .errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p}: file not found" if not p.exists() else f"{what} {p} is not a file")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not a UTF-8 text file: {err}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML: nested too deeply") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as err:  # the constructors raise these too
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(err).split())}") from None
