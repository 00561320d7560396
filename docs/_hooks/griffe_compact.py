"""Griffe extension for the API reference: read layerwise's compact numpy docstrings as intended.

layerwise documents parameters on one line, ``name : what it is, with shapes and units``, where numpy style
reserves the text after the colon for a type. Read literally, every description would land in the "Type"
column. For the rendered reference only (the source is unchanged), this extension moves such a line's text
into the description (the type then comes from the signature's annotation), and keeps the standard
two-line form (``name : type`` followed by an indented description) as it is. It also turns Sphinx roles
(``:class:`~a.B```) into code spans, which Markdown renders.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_SECTIONS = {"parameters", "other parameters", "attributes"}
_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_][\w, *]*?) : (.+)$")
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def rewrite(text: str) -> str:
    """The docstring ``text`` with one-line parameter descriptions moved out of the type slot."""
    lines = _ROLE.sub(_role, text).split("\n")
    out: list[str] = []
    section = None
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if nxt and set(nxt.strip()) == {"-"} and line.strip() and not line.startswith(" "):
            section = line.strip().lower()
        match = _ENTRY.match(line) if section in _SECTIONS else None
        if match and not nxt.startswith(" "):
            out += [match.group(1), "    " + match.group(2)]
        elif match and nxt.startswith(" ") and " " in match.group(2).strip():
            out += [match.group(1), "    " + match.group(2)]  # a description, continued on the next lines
        else:
            out.append(line)
    return "\n".join(out)


class CompactNumpyParams(Extension):
    """Rewrites every docstring with :func:`rewrite` once the object tree is built."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
