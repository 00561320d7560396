"""The README is the front door: short, every relative link resolves, each system links to its guide."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _links(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|#|mailto:", t)]


def test_every_relative_link_of_the_readme_resolves():
    links = _links(README)
    assert links
    for target in links:
        path = ROOT / target.split("#")[0]
        assert path.exists(), target
        anchor = target.partition("#")[2]
        if anchor and path.suffix == ".md":
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)}
            assert anchor in slugs, target


def test_each_of_the_nine_systems_links_to_a_guide():
    from layerwise.experiments.claims import SYSTEMS

    rows: dict[str, str] = {}
    for line in README.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)  # the first table: systems and guides
    for system in SYSTEMS:
        assert system in rows, system
        guides = [t for t in _links(rows[system]) if t.startswith("docs/guides/")]
        assert guides, system


def test_readme_is_short_and_keeps_the_test_command():
    assert len(README.splitlines()) <= 150
    assert "make test" in README and "make demo" in README
