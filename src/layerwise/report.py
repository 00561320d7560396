"""Collect experiment folders into one self-contained HTML report (figures embedded, key numbers tabled)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from ._io import atomic_path

__all__ = ["build_report"]

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
details{margin:.5em 0}pre{background:#f7f7f7;padding:.5em;overflow-x:auto}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def _section(folder: Path) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary.items())
    figures = []
    for png in sorted(folder.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        figures.append(
            f'<figure><img alt="{html.escape(png.name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(png.name)}</figcaption></figure>"
        )
    files = ", ".join(html.escape(p.name) for p in sorted(folder.iterdir()) if p.is_file())
    return (
        f'<h2 id="{html.escape(folder.name)}">{html.escape(folder.name)}</h2>'
        f"<table>{rows}</table>{''.join(figures)}"
        f"<details><summary>config and files</summary><pre>{html.escape(json.dumps(config, indent=2))}"
        f"</pre><p>files: {files}</p></details>"
    )


def build_report(out_dir: str | Path, title: str = "layerwise report") -> Path:
    """Write ``out_dir/report.html`` from every ``out_dir/<name>/summary.json`` found; return its path.

    Each experiment gets a table of its key numbers, its PNG figures (embedded, so the file can be mailed
    on its own), its config and the list of files it wrote.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"out_dir {str(out_dir)!r} is not a folder")
    folders = sorted(p.parent for p in out_dir.glob("*/summary.json"))
    if not folders:
        raise ValueError(f"no experiment results (*/summary.json) found in {str(out_dir)!r}")
    toc = "".join(f'<li><a href="#{html.escape(f.name)}">{html.escape(f.name)}</a></li>' for f in folders)
    body = "".join(_section(f) for f in folders)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><ul>{toc}</ul>{body}</body></html>"
    )
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
