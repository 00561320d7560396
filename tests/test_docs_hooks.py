"""The documentation build hooks: fence options stripped for the site, doctests fenced on API pages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HOOKS = Path(__file__).resolve().parents[1] / "docs" / "_hooks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_hook_{name}", HOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fence_test_options_are_dropped_and_others_kept():
    strip = _load("fences").strip_test_options
    text = (
        "```python notest\na\n```\n"
        "  ```bash runner:script continuation\nb\n```\n"
        '```python title="x.py" notest\nc\n```\n'
        "```yaml\nd\n```\n"
        "text ```python notest in a sentence\n"
    )
    assert strip(text) == (
        "```python\na\n```\n"
        "  ```bash\nb\n```\n"
        '```python title="x.py"\nc\n```\n'
        "```yaml\nd\n```\n"
        "text ```python notest in a sentence\n"
    )


def test_doctests_are_fenced_as_pycon_without_flags():
    pytest.importorskip("griffe")
    fence = _load("griffe_compact").fence_doctests
    lines = [
        "Text.",
        ">>> f(1)  # doctest: +SKIP",
        "2",
        ">>> g()",
        "",
        "    >>> indented()",
        "    3",
        "less indented: not output",
        "",
        "```python",
        ">>> inside_a_fence()",
        "```",
    ]
    assert fence(lines) == [
        "Text.",
        "",
        "```pycon",
        ">>> f(1)",
        "2",
        ">>> g()",
        "```",
        "",
        "    ```pycon",
        "    >>> indented()",
        "    3",
        "    ```",
        "less indented: not output",
        "",
        "```python",
        ">>> inside_a_fence()",
        "```",
    ]
