"""Griffe extension for the API reference: read layerwise's compact numpy docstrings as intended.

layerwise documents parameters on one line, ``name : what it is, with shapes and units``, where numpy style
reserves the text after the colon for a type. Read literally, every description would land in the "Type"
column. For the rendered reference only (the source is unchanged), this extension moves such a line's text
into the description (the type then comes from the signature's annotation), and keeps the standard
two-line form (``name : type`` followed by an indented description) as it is. It also turns Sphinx roles
(``:class:`~a.B```) into code spans, which Markdown renders, and fences every doctest (a ``>>>`` line up
to the next blank line) as a ``pycon`` code block with its ``# doctest:`` flags removed: Markdown would
otherwise read ``>>>`` as three nested block quotes (griffe recognises doctests only under a plural
``Examples`` heading; layerwise's docstrings also use ``Example`` and bare module-level examples).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_SECTIONS = {"parameters", "other parameters", "attributes"}
_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_][\w, *]*?) : (.+)$")
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
_DOCTEST_FLAGS = re.compile(r"\s*#\s*doctest:\s*[+-]\w+(?:\s*,\s*[+-]\w+)*\s*$")


def _role(match: re.Match) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def fence_doctests(lines: list[str]) -> list[str]:
    """``lines`` with each doctest (from a ``>>>`` line to the next blank line) inside a ``pycon`` fence."""
    out: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
        if in_fence or not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(indent + _DOCTEST_FLAGS.sub("", lines[i][len(indent):]))
            i += 1
        if out and out[-1].strip():
            out.append("")
        out += [indent + "```pycon", *block, indent + "```"]
    return out


def rewrite(text: str) -> str:
    """The docstring ``text`` with one-line parameter descriptions moved out of the type slot and every
    doctest fenced as code."""
    lines = fence_doctests(_ROLE.sub(_role, text).split("\n"))
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
