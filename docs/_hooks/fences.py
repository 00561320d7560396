"""MkDocs hook: drop the doc-test options from code fences before the page is rendered.

The blocks of README.md and docs/ are run by ``make test-docs`` (root ``conftest.py``); options after the
language (```` ```python notest ````, ``continuation``, ``runner:script``, ``fixture:NAME``, ``retry:N``)
steer that runner. pymdownx.superfences does not read a bare word after the language and would show the
fence as text, so the site gets ```` ```python ```` instead. The Markdown files are unchanged.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^(?P<head>[ \t]*(?:`{3,}|~{3,})[ \t]*[\w+-]+)(?P<opts>(?:[ \t]+\S+)+)[ \t]*$", re.M)
_TEST_OPTION = re.compile(r"^(?:notest|continuation|(?:runner|fixture|retry):\S+)$")


def strip_test_options(markdown: str) -> str:
    """``markdown`` with the doc-test options removed from every fence's info string."""

    def fix(match: re.Match) -> str:
        kept = [w for w in match.group("opts").split() if not _TEST_OPTION.match(w)]
        return " ".join([match.group("head"), *kept])

    return _FENCE.sub(fix, markdown)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return strip_test_options(markdown)
