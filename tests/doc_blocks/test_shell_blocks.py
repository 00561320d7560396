"""Every ```bash / ```sh / ```shell / ```console block of README.md and docs/**/*.md, run as written.

Each block runs with ``bash -e -o pipefail`` in ``doc_sandbox`` (a scratch folder linking the repository's
top-level entries, see the root ``conftest.py``), with the virtual environment's ``bin`` first on ``PATH``
(so ``layerwise`` and ``python`` are this checkout's), hub downloads off and one torch thread. A
``console`` block runs its ``$ `` lines (the rest is output). A fence whose info string has ``notest`` is
skipped; it says why in a comment. Python blocks are run by pytest-markdown-docs (``make test-docs``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[2]
SHELLS = {"bash", "sh", "shell", "console"}


def doc_files() -> list[Path]:
    """README.md and every page under docs/ (not the build hooks)."""
    return [REPO / "README.md", *sorted(p for p in (REPO / "docs").rglob("*.md") if "_hooks" not in p.parts)]


def shell_blocks(path: Path) -> list[tuple[int, str, set[str], str]]:
    """``(line, language, options, script)`` of each shell fence of ``path`` (line of the opening fence)."""
    out = []
    for token in MarkdownIt("commonmark").parse(path.read_text(encoding="utf-8")):
        words = token.info.split() if token.type == "fence" else []
        if words and words[0] in SHELLS:
            script = token.content
            if words[0] == "console":
                script = console_commands(script)
            out.append((token.map[0] + 1, words[0], set(words[1:]), script))
    return out


def console_commands(text: str) -> str:
    """The commands of a console transcript: ``$ `` lines and their backslash continuations."""
    commands, going_on = [], False
    for line in text.splitlines():
        if line.startswith("$ ") or going_on:
            commands.append(line[2:] if line.startswith("$ ") and not going_on else line)
            going_on = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


BLOCKS = [
    pytest.param(
        script,
        id=f"{path.relative_to(REPO)}:{line}",
        marks=[pytest.mark.skip(reason="notest")] if "notest" in options else [],
    )
    for path in doc_files()
    for line, _, options, script in shell_blocks(path)
]


def test_blocks_are_found():
    assert any("layerwise" in p.values[0] for p in BLOCKS)


def test_console_commands():
    text = "$ layerwise a \\\n    --b 1\noutput line\n$ ls\n"
    assert console_commands(text) == "layerwise a \\\n    --b 1\nls\n"


@pytest.mark.parametrize("script", BLOCKS)
def test_shell_block(script, doc_sandbox, doc_block_env, doc_block_timeout):
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=doc_sandbox,
        env=doc_block_env,
        capture_output=True,
        text=True,
        timeout=doc_block_timeout,
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )


def test_notest_blocks_say_why():
    """A block kept out of the doc tests (``notest``) starts with a comment giving the reason."""
    silent = []
    for path in doc_files():
        for token in MarkdownIt("commonmark").parse(path.read_text(encoding="utf-8")):
            if token.type == "fence" and "notest" in token.info.split()[1:]:
                if not token.content.lstrip().startswith("#"):
                    silent.append(f"{path.relative_to(REPO)}:{token.map[0] + 1}")
    assert not silent, f"notest blocks without a '# reason' first line: {silent}"
