"""What an experiment hands to the report, and how it is stored in its results folder.

``run(config, out)`` returns its summary dict with reserved keys (see :mod:`.claims`):

``"claims"``
    list of :class:`~.claims.Claim`: the papers' findings tested, each with a verdict.
``"tables"``
    list of :class:`~.claims.Table`: compact result tables.
``"figures"``
    ``{"file.png": "caption saying what the reader should see"}`` for PNG files written into ``out``.
``"text"``
    two or three sentences: what the experiment does and what to look at.

:func:`split_summary` takes them out (the rest is the flat ``summary.json`` of key numbers) and
:func:`write_parts` stores them: ``claims.json`` (the claims, the text and the figure captions),
``tables/<name>.csv`` (one file per table) and ``tables/tables.json`` (captions, column order and typed
rows, for the report). :func:`read_parts` reads them back.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_path, to_jsonable, write_json
from .claims import Claim, Table

__all__ = ["RESERVED_KEYS", "ReportParts", "split_summary", "write_parts", "read_parts"]

RESERVED_KEYS = ("claims", "tables", "figures", "text")
CLAIMS_FILE = "claims.json"
TABLES_DIR = "tables"


@dataclass(frozen=True)
class ReportParts:
    """The report-facing part of an experiment's summary."""

    claims: tuple[Claim, ...] = ()
    tables: tuple[Table, ...] = ()
    figures: Mapping[str, str] = field(default_factory=dict)
    text: str = ""


def _as_part(obj: Any, cls: type, key: str, i: int) -> Any:
    """``obj`` as a ``cls`` (a :class:`Claim` or :class:`Table`, or its dict form) for ``summary[key][i]``."""
    if isinstance(obj, cls):
        return obj
    if isinstance(obj, Mapping):
        return cls.from_dict(obj)
    raise TypeError(f"summary[{key!r}][{i}] must be a {cls.__name__}, got {type(obj).__name__}")


def split_summary(summary: Mapping[str, Any]) -> tuple[dict[str, Any], ReportParts]:
    """``(flat key numbers, report parts)`` of an experiment's returned summary; checks the reserved keys."""
    flat = {k: v for k, v in summary.items() if k not in RESERVED_KEYS}
    claims = summary.get("claims", ()) or ()
    tables = summary.get("tables", ()) or ()
    figures = summary.get("figures", {}) or {}
    text = summary.get("text", "") or ""
    if not isinstance(claims, (list, tuple)):
        raise TypeError(f"summary['claims'] must be a list of Claim, got {type(claims).__name__}")
    if not isinstance(tables, (list, tuple)):
        raise TypeError(f"summary['tables'] must be a list of Table, got {type(tables).__name__}")
    if not isinstance(figures, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in figures.items()
    ):
        raise TypeError("summary['figures'] must map PNG file names (str) to captions (str)")
    if not isinstance(text, str):
        raise TypeError(f"summary['text'] must be a str, got {type(text).__name__}")
    table_objs = tuple(_as_part(t, Table, "tables", i) for i, t in enumerate(tables))
    names = [t.name for t in table_objs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"summary['tables'] has duplicate table name(s) {dupes}")
    for name in figures:
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".png"):
            raise ValueError(f"summary['figures'] keys must be PNG file names in the folder, got {name!r}")
    parts = ReportParts(
        claims=tuple(_as_part(c, Claim, "claims", i) for i, c in enumerate(claims)),
        tables=table_objs,
        figures=dict(figures),
        text=text,
    )
    return flat, parts


def _write_table_csv(path: Path, table: Table) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table.columns)
        for row in table.rows:
            writer.writerow([to_jsonable(row[c]) for c in table.columns])


def write_parts(folder: str | Path, parts: ReportParts) -> None:
    """Write ``claims.json`` and, when there are tables, ``tables/<name>.csv`` and ``tables/tables.json``."""
    folder = Path(folder)
    write_json(folder / CLAIMS_FILE, {"text": parts.text, "figures": dict(parts.figures),
                                      "claims": [c.to_dict() for c in parts.claims]})
    if parts.tables:
        for table in parts.tables:
            _write_table_csv(folder / TABLES_DIR / f"{table.name}.csv", table)
        write_json(folder / TABLES_DIR / "tables.json",
                   [{**t.to_dict(), "rows": [{c: r[c] for c in t.columns} for r in t.rows]}
                    for t in parts.tables])


def read_parts(folder: str | Path) -> ReportParts | None:
    """The parts stored in ``folder``, or None when it has no ``claims.json`` (an older results folder)."""
    import json

    folder = Path(folder)
    path = folder / CLAIMS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tables_path = folder / TABLES_DIR / "tables.json"
        tables = json.loads(tables_path.read_text(encoding="utf-8")) if tables_path.is_file() else []
        figures = data.get("figures", {}) or {}
        if not isinstance(figures, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in figures.items()
        ):
            raise TypeError("'figures' must map file names to captions")
        return ReportParts(
            claims=tuple(Claim.from_dict(c) for c in data.get("claims", [])),
            tables=tuple(Table.from_dict(t) for t in tables),
            figures=dict(figures),
            text=str(data.get("text", "")),
        )
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        from ..errors import InputDataError

        raise InputDataError(
            f"{path} (or its tables/tables.json) is not a claims file written by layerwise: {exc}"
        ) from None
