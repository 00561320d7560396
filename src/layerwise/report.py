"""The reproduction report: one self-contained HTML page answering "which of the papers' findings hold?".

``build_report(DIR)`` reads every experiment folder ``DIR/<name>/`` written by
:func:`layerwise.experiments.run_experiment` and writes ``DIR/report.html``:

1. a header: layerwise version and git commit, date, machine, scale, total run time, the command;
2. the scorecard: every claim of every experiment, grouped by the nine systems (in the order of
   :data:`layerwise.experiments.claims.SYSTEMS`), paper value next to the measured one, with its verdict
   and a link to the experiment's section; a system whose registered experiments were not run in ``DIR``
   is listed as "not run", a system without any registered experiment as "not built";
3. one section per experiment, ordered by system: its text, its claims with their rules, its compact
   tables (also saved as CSV), its figures (embedded as ``data:`` URIs) with captions, its run time, and
   its config, provenance and files folded away.

Folders whose name starts with ``.`` (temporary or left over by an interrupted run) are never shown.
The page needs no JavaScript and no network, and prints.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_path
from ._provenance import utc_now
from .experiments._results import ReportParts, read_parts
from .experiments.claims import SYSTEMS, VERDICTS, Claim, Table

__all__ = ["ExperimentResult", "ScoreRow", "NOT_RUN", "NOT_BUILT", "NO_CLAIMS", "load_results", "scorecard",
           "order_sections", "render_report", "build_report", "check_report_target", "run_times"]

NOT_RUN = "not run"
NOT_BUILT = "not built"
NO_CLAIMS = "no claims recorded"
# mark and CSS class of every status shown in the scorecard
_MARKS = {
    "reproduced": ("\u2714", "ok"),
    "partly": ("\u25d0", "partly"),
    "not reproduced": ("\u2718", "bad"),
    "not tested at this scale": ("\u2013", "untested"),
    NOT_RUN: ("\u25cb", "notrun"),
    NOT_BUILT: ("\u00b7", "notbuilt"),
    NO_CLAIMS: ("?", "notrun"),
}

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1250px;margin:1.2em auto;
 padding:0 1em;color:#222;line-height:1.35}
h1{font-size:1.5em;margin:.2em 0 .3em}h2{margin-top:2em;border-bottom:1px solid #bbb;font-size:1.3em}
h2 small{font-weight:normal;color:#555;font-size:.75em}h3{font-size:1.05em;margin:1.2em 0 .3em}
.meta{color:#444;font-size:.88em;margin:.2em 0}.meta code{font-size:.95em}
.counts{margin:.6em 0;font-size:1.02em}
table{border-collapse:collapse;margin:.4em 0;font-size:.86em}
td,th{border:1px solid #ccc;padding:2px 7px;text-align:left;vertical-align:top}
thead th{background:#eef0f3}tbody th{background:#f6f7f9;font-weight:600}
table.score{width:100%}table.score td.v-cell{white-space:nowrap}
table.glance td{text-align:center;min-width:5em}table.glance th{font-weight:normal}
.v{font-weight:600;white-space:nowrap}.v-ok{color:#176b2c}.v-partly{color:#a15c00}.v-bad{color:#b3261e}
.v-untested,.v-notrun{color:#666}.v-notbuilt{color:#999;font-weight:normal}
tr.notbuilt td,tr.notbuilt th{color:#888}
.muted{color:#777}.exp{color:#777;font-size:.9em}
figure{margin:.8em 0}figcaption{font-size:.88em;color:#333;max-width:900px}
.figs{display:flex;flex-wrap:wrap;gap:0 1.5em;align-items:flex-start}
figure.fig{flex:1 1 100%;max-width:100%}figure.fig.half{flex:0 1 calc(50% - 1em)}
figure.fig img{max-width:100%;border:1px solid #eee}
.scroll{overflow-x:auto}
details{margin:.8em 0;font-size:.88em}pre{background:#f6f6f6;padding:.5em;overflow-x:auto;font-size:.85em}
a{color:#1a4f9c;text-decoration:none}a:hover{text-decoration:underline}
@media print{body{max-width:none}.v{-webkit-print-color-adjust:exact;print-color-adjust:exact}
 section{break-before:page}figure{break-inside:avoid}}
"""


@dataclass
class ExperimentResult:
    """One experiment folder: what ``run_experiment`` wrote there."""

    name: str
    folder: Path
    config: dict[str, Any] = field(default_factory=dict)  # config.json
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json (flat key numbers)
    run: dict[str, Any] = field(default_factory=dict)  # run.json (provenance); {} for older folders
    parts: ReportParts | None = None  # None: no claims.json (written by an older layerwise)

    @property
    def scale(self) -> str:
        """The scale the experiment ran at (``"?"`` when not recorded)."""
        return str(self.config.get("scale") or self.run.get("scale") or "?")

    @property
    def runtime_s(self) -> float | None:
        """Wall time of the run in seconds, or None when not recorded."""
        value = self.run.get("runtime_s", self.summary.get("runtime_s"))
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def claims(self) -> tuple[Claim, ...]:
        """The experiment's claims (empty when its claims.json is missing)."""
        return self.parts.claims if self.parts is not None else ()

    @property
    def anchor(self) -> str:
        """The HTML id of the experiment's section in report.html."""
        return "exp-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)


@dataclass(frozen=True)
class ScoreRow:
    """One row of the scorecard: a claim with its verdict, or a system/experiment without claims."""

    system: str
    status: str  # a verdict, NOT_RUN, NOT_BUILT or NO_CLAIMS
    experiment: str | None = None
    claim: Claim | None = None
    anchor: str | None = None  # id of the row in the experiment's section (or of the section)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, nested too deeply
        return None


def load_results(out_dir: str | Path) -> list[ExperimentResult]:
    """Every experiment folder of ``out_dir`` (a visible subfolder with ``summary.json``), sorted by name."""
    out_dir = Path(out_dir)
    results = []
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        summary = _read_json(folder / "summary.json")
        if not isinstance(summary, dict):
            continue
        config = _read_json(folder / "config.json")
        run = _read_json(folder / "run.json")
        results.append(ExperimentResult(
            name=folder.name, folder=folder, summary=summary,
            config=config if isinstance(config, dict) else {}, run=run if isinstance(run, dict) else {},
            parts=read_parts(folder)))
    return results


def _registry(registry: Any) -> Any:
    if registry is None:
        from .experiments import EXPERIMENTS

        return EXPERIMENTS
    return registry


def _declared_systems(registry: Any) -> dict[str, tuple[str, ...]]:
    return {name: tuple(getattr(registry.get(name), "systems", ()) or ()) for name in registry.names()}


def _systems_of(result: ExperimentResult, declared: Mapping[str, tuple[str, ...]]) -> list[str]:
    found = set(declared.get(result.name, ())) | {c.system for c in result.claims}
    return [s for s in SYSTEMS if s in found]


def order_sections(results: Sequence[ExperimentResult], registry: Any = None) -> list[ExperimentResult]:
    """Results ordered by the first system they test (SYSTEMS order), then registry order, then name."""
    registry = _registry(registry)
    declared = _declared_systems(registry)
    order = {name: i for i, name in enumerate(registry.names())}

    def key(r: ExperimentResult) -> tuple[int, int, str]:
        systems = _systems_of(r, declared)
        first = SYSTEMS.index(systems[0]) if systems else len(SYSTEMS)
        return first, order.get(r.name, len(order)), r.name

    return sorted(results, key=key)


def scorecard(results: Sequence[ExperimentResult], registry: Any = None) -> list[ScoreRow]:
    """The scorecard rows, grouped by system in SYSTEMS order (see the module docstring)."""
    registry = _registry(registry)
    declared = _declared_systems(registry)
    ordered = order_sections(results, registry)
    present = {r.name for r in results}
    rows: list[ScoreRow] = []
    for system in SYSTEMS:
        group = [ScoreRow(system, c.verdict, r.name, c, f"{r.anchor}-c{k}")
                 for r in ordered for k, c in enumerate(r.claims, 1) if c.system == system]
        for r in ordered:  # ran, declares this system, but recorded no claim for it
            if system in declared.get(r.name, ()) and not any(c.system == system for c in r.claims):
                group.append(ScoreRow(system, NO_CLAIMS, r.name, None, r.anchor))
        for name in registry.names():
            if system in declared[name] and name not in present:
                group.append(ScoreRow(system, NOT_RUN, name))
        rows.extend(group or [ScoreRow(system, NOT_BUILT)])
    return rows


# ----------------------------------------------------------------------------------------------- rendering
_e = html.escape


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return "; ".join(f"{k} = {_fmt(v)}" for k, v in value.items())
    return str(value)


def _badge(status: str) -> str:
    mark, css = _MARKS.get(status, ("?", "notrun"))
    return f'<span class="v v-{css}">{mark} {_e(status)}</span>'


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _when(stamp: str | None) -> str:
    return stamp.replace("T", " ").replace("Z", " UTC") if stamp else "n/a"


def _machine(run: Mapping[str, Any]) -> str:
    m = run.get("machine") or {}
    if not m:
        return "n/a"
    cores = m.get("cores")
    usable = m.get("usable_cores")
    core_text = f"{cores} cores" + (f" ({usable} usable)" if usable not in (None, cores) else "")
    gpu = m.get("gpu") or "no GPU"
    return f"{m.get('cpu', '?')}, {core_text}, {gpu}"


def _commit(run: Mapping[str, Any]) -> str:
    commit = run.get("git_commit")
    if not commit:
        return "not a git checkout"
    return commit[:12] + (" (with uncommitted changes)" if run.get("git_dirty") else "")


def _distinct(values: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{v} ({n} experiments)" for v, n in counts.items())


def _commands(results: Sequence[ExperimentResult], registry: Any, out_dir: str) -> list[str]:
    by_scale: dict[str, list[str]] = {}
    order = {name: i for i, name in enumerate(registry.names())}
    for r in sorted(results, key=lambda r: (order.get(r.name, len(order)), r.name)):
        by_scale.setdefault(r.scale, []).append(r.name)
    registered = list(registry.names())
    cmds = []
    for scale, names in by_scale.items():
        what = "all" if set(registered) <= set(names) and len(by_scale) == 1 else " ".join(names)
        cmds.append(f"layerwise reproduce {what} --scale {scale} --out {out_dir}")
    return cmds


def _header(results: Sequence[ExperimentResult], rows: Sequence[ScoreRow], registry: Any, title: str,
            out_dir: str) -> str:
    runs = [r.run for r in results if r.run]
    version = _distinct(str(r.get("layerwise_version", "?")) for r in runs) if runs else "n/a"
    commit = _distinct(_commit(r) for r in runs) if runs else "n/a"
    machine = _distinct(_machine(r) for r in runs) if runs else "n/a"
    finished = max((r.get("finished_utc") or "" for r in runs), default="") or None
    total = sum(r.runtime_s or 0.0 for r in results)
    scale = _distinct(r.scale for r in results)
    commands = _commands(results, registry, out_dir)
    overrides = [r.name for r in results if r.run.get("overrides")]
    note = (f" (with config overrides in {', '.join(overrides)}: see their run.json)" if overrides else "")
    claims = [row for row in rows if row.claim is not None]
    counts = {v: sum(row.status == v for row in claims) for v in VERDICTS}
    built = sum(1 for s in SYSTEMS if not any(r.system == s and r.status == NOT_BUILT for r in rows))
    with_results = len({row.system for row in claims})
    count_text = ", ".join(_badge(v).replace("</span>", "").replace(f"{_e(v)}", f"{n} {_e(v)}", 1)
                           + "</span>" for v, n in counts.items() if n)
    return (
        f"<h1>{_e(title)}</h1>"
        f'<p class="meta">layerwise {_e(version)}, commit {_e(commit)} &middot; run finished '
        f"{_e(_when(finished))}"
        f" &middot; report built {_e(_when(utc_now()))}</p>"
        f'<p class="meta">machine: {_e(machine)} &middot; scale: <b>{_e(scale)}</b> &middot; total run time '
        f"{_e(_duration(total))} (sum over {len(results)} experiments)</p>"
        f'<p class="meta">reproduce with: {"; ".join(f"<code>{_e(c)}</code>" for c in commands)}'
        f"{_e(note)}</p>"
        f'<p class="counts"><b>{len(claims)} claims</b> tested: {count_text or "none"} &middot; '
        f"{built} of {len(SYSTEMS)} systems built, {with_results} with results here</p>"
    )


def _glance_html(rows: Sequence[ScoreRow]) -> str:
    """One line per system: how many of its claims got each verdict, and its experiments not run."""
    statuses = (*VERDICTS, NOT_RUN)
    head = "".join(f"<th>{_badge(s)}</th>" for s in statuses)
    body = []
    for k, system in enumerate(SYSTEMS, 1):
        group = [r for r in rows if r.system == system]
        link = f'<a href="#sys-{k}">{_e(system)}</a>'
        if group and group[0].status == NOT_BUILT:
            body.append(f'<tr class="notbuilt"><th>{link}</th><td colspan="{len(statuses)}">'
                        f"{_badge(NOT_BUILT)}</td></tr>")
            continue
        cells = "".join(f"<td>{n}</td>" if (n := sum(r.status == s for r in group)) else "<td></td>"
                        for s in statuses)
        body.append(f"<tr><th>{link}</th>{cells}</tr>")
    return (f'<table class="glance"><thead><tr><th>System</th>{head}</tr></thead><tbody>{"".join(body)}'
            "</tbody></table>")


def _scorecard_html(rows: Sequence[ScoreRow], out_dir: str) -> str:
    parts = ['<table class="score"><thead><tr><th>System</th><th>Finding (experiment)</th><th>Paper</th>'
             "<th>Paper value</th><th>Here</th><th>Verdict</th></tr></thead>"]
    for system in SYSTEMS:
        group = [r for r in rows if r.system == system]
        cls = ' class="notbuilt"' if group and group[0].status == NOT_BUILT else ""
        parts.append("<tbody>")
        for i, row in enumerate(group):
            head = (f'<th rowspan="{len(group)}" id="sys-{SYSTEMS.index(system) + 1}">{_e(system)}</th>'
                    if i == 0 else "")
            if row.claim is not None:
                c = row.claim
                cells = (f'<td><a href="#{_e(row.anchor or "")}">{_e(c.claim)}</a> '
                         f'<span class="exp">({_e(row.experiment or "")})</span></td>'
                         f"<td>{_e(c.paper)}, {_e(c.where)}</td><td>{_e(c.paper_value)}</td>"
                         f"<td>{_e(c.measured)}</td>")
            elif row.status == NOT_RUN:
                cells = (f'<td colspan="4" class="muted">experiment <b>{_e(row.experiment or "")}</b> is '
                         f"registered but was not run for this report: <code>layerwise reproduce "
                         f"{_e(row.experiment or '')} --out {_e(out_dir)}</code></td>")
            elif row.status == NO_CLAIMS:
                cells = (f'<td colspan="4" class="muted">experiment <a href="#{_e(row.anchor or "")}">'
                         f"{_e(row.experiment or '')}</a> ran but recorded no claim for this system</td>")
            else:
                cells = '<td colspan="4" class="muted">no experiment in layerwise yet</td>'
            parts.append(f"<tr{cls}>{head}{cells}<td class=\"v-cell\">{_badge(row.status)}</td></tr>")
        parts.append("</tbody>")
    parts.append("</table>")
    return "".join(parts)


def _cell(value: Any) -> str:
    return _e(_fmt(value))


def _table_html(table: Table, csv_href: str | None) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row[c])}</td>" for c in table.columns) + "</tr>"
                   for row in table.rows)
    link = f' (<a href="{_e(csv_href)}">CSV</a>)' if csv_href else ""
    return (f'<figure class="tab"><figcaption>{_e(table.caption)}{link}</figcaption><div class="scroll">'
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div></figure>")


def _claims_html(result: ExperimentResult) -> str:
    rows = []
    for k, c in enumerate(result.claims, 1):
        rows.append(
            f'<tr id="{result.anchor}-c{k}"><td>{k}</td><td>{_e(c.claim)}<br><span class="exp">'
            f"{_e(c.paper)}, {_e(c.where)} &middot; {_e(c.system)}</span></td><td>{_e(c.paper_value)}</td>"
            f'<td>{_e(c.measured)}</td><td class="v-cell">{_badge(c.verdict)}</td><td>{_e(c.rule)}</td></tr>')
    return ('<div class="scroll"><table class="claims"><thead><tr><th>#</th><th>Finding</th>'
            "<th>Paper value</th><th>Here</th><th>Verdict</th><th>Rule (fixed before the run)</th></tr>"
            "</thead><tbody>"
            + "".join(rows) + "</tbody></table></div>")


def _png_width(data: bytes) -> int | None:
    """Width in pixels from a PNG's IHDR chunk (None if ``data`` is not a PNG)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big")


# magic bytes of the image formats a figure may have, and their MIME type
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))
MAX_FIGURE_BYTES = 50 * 2**20
"""Largest figure file embedded in report.html (bytes); a larger one is listed as too large."""


def _image_mime(data: bytes) -> str | None:
    """The MIME type of ``data`` from its magic bytes (PNG, JPEG, GIF), or None when it is not one of them."""
    for magic, mime in _IMAGE_MAGIC:
        if data.startswith(magic):
            return mime
    return None


def _figure_html(folder: Path, name: str, caption: str) -> str:
    """A figure of the experiment folder ``folder``, embedded as a ``data:`` URI.

    Only an image file (PNG, JPEG or GIF by its magic bytes) that lies inside ``folder`` once symbolic links
    are resolved is embedded: a name from claims.json pointing elsewhere (an absolute path, ``..``, a link
    out of the folder) or at a file that is not an image is listed as refused, never read into the page.
    """
    shown = _e(Path(name).name or name)
    try:
        root = folder.resolve(strict=True)
        path = (folder / name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a link loop, a NUL in the name
        return f'<p class="muted">figure {shown} is missing from the results folder.</p>'
    if path != root and root not in path.parents:
        return f'<p class="muted">figure {shown} is not inside the experiment folder; not embedded.</p>'
    if not path.is_file():
        return f'<p class="muted">figure {shown} is missing from the results folder.</p>'
    if path.stat().st_size > MAX_FIGURE_BYTES:
        return (f'<p class="muted">figure {shown} is larger than {MAX_FIGURE_BYTES >> 20} MiB; '
                "not embedded.</p>")
    raw = path.read_bytes()
    mime = _image_mime(raw)
    if mime is None:
        return f'<p class="muted">figure {shown} is not a PNG, JPEG or GIF image; not embedded.</p>'
    width = _png_width(raw)
    half = " half" if width is not None and width <= 900 else ""  # two narrow figures side by side
    data = base64.b64encode(raw).decode("ascii")
    return (f'<figure class="fig{half}"><img alt="{shown}" src="data:{mime};base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _section(result: ExperimentResult, registry: Any, out_dir: str) -> str:
    description = ""
    if result.name in registry.names():
        description = getattr(registry.get(result.name), "description", "")
    declared = _declared_systems(registry)
    systems = ", ".join(_systems_of(result, declared)) or "n/a"
    run = result.run
    load = (run.get("machine") or {}).get("load_average_1_5_15min")
    load_text = f" (load average at start {load[0]:g} on {run['machine'].get('cores')} cores)" if load else ""
    device = run.get("device")  # where the numbers were computed (reproduce --device); older runs: unknown
    device_text = f" &middot; device: {_e(device)}" if isinstance(device, str) else ""
    device_flag = f" --device {device}" if isinstance(device, str) and device != "cpu" else ""
    out = [f'<section id="{result.anchor}"><h2>{_e(result.name)} <small>{_e(description)}</small></h2>',
           f'<p class="meta">systems: {_e(systems)} &middot; scale: {_e(result.scale)} &middot; run time '
           f"{_e(_duration(result.runtime_s))}{_e(load_text)}{device_text} &middot; "
           f"<code>layerwise reproduce {_e(result.name)} --scale {_e(result.scale)}{_e(device_flag)} "
           f"--out {_e(out_dir)}</code></p>"]
    parts = result.parts
    if parts is None:
        out.append('<p class="muted">This folder has no claims.json: it was written by an older layerwise. '
                   "Run the experiment again for its claims and tables.</p>")
    else:
        if parts.text:
            out.append("".join(f"<p>{_e(p.strip())}</p>" for p in parts.text.split("\n\n") if p.strip()))
        if parts.claims:
            out.append("<h3>Claims</h3>" + _claims_html(result))
        if parts.tables:
            out.append("<h3>Results</h3>")
            for table in parts.tables:
                csv_path = result.folder / "tables" / f"{table.name}.csv"
                href = f"{result.name}/tables/{table.name}.csv" if csv_path.is_file() else None
                out.append(_table_html(table, href))
    captions = dict(parts.figures) if parts is not None else {}
    pngs = sorted(p.name for p in result.folder.glob("*.png") if not p.name.startswith("."))
    names = list(captions) + [n for n in pngs if n not in captions]
    if names:
        out.append('<h3>Figures</h3><div class="figs">'
                   + "".join(_figure_html(result.folder, n, captions.get(n, n)) for n in names) + "</div>")
    config = result.config.get("config", result.config)
    prov = {k: v for k, v in run.items() if k not in ("experiment",)}
    out.append(
        "<details><summary>config, provenance and files</summary>"
        f"<h3>config ({_e(result.scale)})</h3><pre>{_e(json.dumps(config, indent=2))}</pre>"
        + (f"<h3>run</h3><pre>{_e(json.dumps(prov, indent=2))}</pre>" if prov else "")
        + f"<h3>files in {_e(result.name)}/</h3><p>{_e(', '.join(_files(result.folder)))}</p></details>")
    out.append("</section>")
    return "".join(out)


def _undeclared(results: Sequence[ExperimentResult], registry: Any) -> str:
    """A note naming registered experiments that were not run here and declare no system (not placed)."""
    present = {r.name for r in results}
    names = [n for n, systems in _declared_systems(registry).items() if not systems and n not in present]
    if not names:
        return ""
    return (" Registered but not run here, and declaring no system (so not placed above): "
            + ", ".join(f"<b>{_e(n)}</b>" for n in names) + ".")


def render_report(results: Sequence[ExperimentResult], registry: Any = None,
                  title: str = "layerwise: reproduction report", out_dir: str = "results") -> str:
    """The HTML page for ``results`` (see the module docstring); ``out_dir`` is shown in the commands."""
    registry = _registry(registry)
    rows = scorecard(results, registry)
    ordered = order_sections(results, registry)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_STYLE}</style></head>'
        f"<body><header>{_header(results, rows, registry, title, out_dir)}</header>"
        f"<main><h2 id=\"scorecard\">Scorecard: which findings hold?</h2>{_glance_html(rows)}"
        f"<h3>Every claim</h3>{_scorecard_html(rows, out_dir)}"
        f'<p class="meta">Each verdict follows the rule written in the experiment\'s code before the run '
        f"(shown in its section). {_badge(NOT_RUN)}: the experiment exists but is not in this folder; "
        f"{_badge(NOT_BUILT)}: no experiment for that system yet.{_undeclared(results, registry)}</p>"
        + "".join(_section(r, registry, out_dir) for r in ordered)
        + "</main></body></html>"
    )


REPORT_NAME = "report.html"
_SIGNATURE = re.compile(rb"\n<!-- layerwise-report sha256=([0-9a-f]{64}) -->\n\Z")


def _signed(page: str) -> bytes:
    """``page`` as UTF-8 followed by a last line holding the sha256 of everything before it."""
    body = page.encode("utf-8")
    return body + f"\n<!-- layerwise-report sha256={hashlib.sha256(body).hexdigest()} -->\n".encode("ascii")


def _is_own_report(path: Path) -> bool:
    """True when ``path`` is a report.html that layerwise wrote and nobody changed since (its last line holds
    the sha256 of the rest of the file)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    m = _SIGNATURE.search(data)
    return m is not None and hashlib.sha256(data[: m.start()]).hexdigest() == m.group(1).decode("ascii")


def check_report_target(out_dir: str | Path) -> Path:
    """Check that ``out_dir/report.html`` may be (re)written; return its path.

    It may be written when it does not exist, or when it is a report that layerwise wrote and that is
    unchanged since: every page ends with a comment holding the sha256 of the rest of the file, so a file of
    the user's (or a report edited by hand, or one written by a layerwise older than this check, which cannot
    be verified) is never replaced.

    Raises
    ------
    OutputPathError
        One line naming the file: it is a folder or a symbolic link, or not layerwise's own unchanged output.
    """
    from .errors import OutputPathError

    target = Path(out_dir) / REPORT_NAME
    if target.is_symlink():
        raise OutputPathError(f"{target} is a symbolic link; refusing to replace it: remove it or give "
                              "another folder")
    if not target.exists():
        return target
    if not target.is_file():
        raise OutputPathError(f"{target} exists and is not a file; refusing to replace it: move it away")
    if not _is_own_report(target):
        raise OutputPathError(
            f"{target} exists and is not an unchanged report written by layerwise (a file of yours, an "
            "edited report, or one from an older layerwise that cannot be verified); refusing to replace it: "
            "move it away or give another folder"
        )
    return target


def build_report(out_dir: str | Path, title: str = "layerwise: reproduction report",
                 registry: Any = None) -> Path:
    """Write ``out_dir/report.html`` from the experiment folders found in ``out_dir``; return its path.

    An existing ``report.html`` is replaced only when it is layerwise's own unchanged output (see
    :func:`check_report_target`).

    Parameters
    ----------
    out_dir : a results folder written by ``layerwise reproduce`` (one subfolder per experiment).
    title : the page title.
    registry : the experiment registry that decides "not run" vs "not built" (default: the built-in one).

    Raises
    ------
    FileNotFoundError
        ``out_dir`` is not a folder.
    ValueError
        ``out_dir`` holds no experiment results.
    OutputPathError
        ``out_dir/report.html`` exists and is not layerwise's own unchanged output.
    """
    path = Path(out_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"out_dir {str(out_dir)!r} is not a folder")
    check_report_target(path)
    results = load_results(path)
    if not results:
        raise ValueError(f"no experiment results (<name>/summary.json) found in {str(out_dir)!r}")
    page = render_report(results, registry, title, out_dir=str(out_dir))
    target = check_report_target(path)  # again, right before replacing it
    with atomic_path(target) as tmp:
        tmp.write_bytes(_signed(page))
    return target


def run_times(out_dir: str | Path, names: Sequence[str] | None = None) -> str:
    """A plain-text table of the run time, scale and verdict counts of each experiment in ``out_dir``.

    ``names`` restricts and orders the rows (default: every experiment folder found); the last line is the
    total. Printed at the end of ``layerwise reproduce``.
    """
    found = {r.name: r for r in load_results(out_dir)}
    rows = [found[n] for n in (names if names is not None else sorted(found)) if n in found]
    width = max([len(r.name) for r in rows] + [10])
    lines = [f"{'experiment':<{width}}  {'scale':<6} {'run time':>10}  verdicts"]
    for r in rows:
        counts = {v: sum(c.verdict == v for c in r.claims) for v in VERDICTS}
        text = ", ".join(f"{n} {v}" for v, n in counts.items() if n) or "no claims"
        lines.append(f"{r.name:<{width}}  {r.scale:<6} {_duration(r.runtime_s):>10}  {text}")
    total = sum(r.runtime_s or 0.0 for r in rows)
    lines.append(f"{'total':<{width}}  {'':<6} {_duration(total):>10}")
    return "\n".join(lines)
