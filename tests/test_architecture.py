"""The import direction of the package is downward only (ARCHITECTURE.md, "Rules").

Every module under ``src/layerwise`` is parsed (``ast``, so imports inside functions count too) and each
import of a ``layerwise`` module is resolved to its absolute name. Layers, from the top:

- ``cli`` (and ``__main__``): may import anything;
- ``report``: may import ``experiments`` and the library, never ``cli``;
- ``experiments``: may import the library, never ``cli`` or ``report``;
- the library (every other subpackage and module): never ``experiments``, ``report`` or ``cli``;
  and inside it, ``editing`` (weight-space editing) never imports ``tangent`` (tangent-space fine-tuning,
  which builds on ``editing``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "layerwise"
TOP = ("cli", "__main__")
FORBIDDEN = {
    "report": {"cli", "__main__"},
    "experiments": {"cli", "__main__", "report"},
    "editing": {"cli", "__main__", "report", "experiments", "tangent"},
}
LIBRARY_FORBIDDEN = {"cli", "__main__", "report", "experiments"}
T = "layerwise.tangent"


def module_name(path: Path) -> str:
    """``src/layerwise/a/b.py`` -> ``layerwise.a.b``; a package's ``__init__.py`` -> the package."""
    parts = ["layerwise", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool) -> set[str]:
    """Absolute names of every ``layerwise`` module that ``source`` (module ``name``) imports, at any depth.

    ``from X import y`` counts both ``X`` and ``X.y`` (``y`` may be a submodule), relative imports are
    resolved against ``name``.
    """
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m == "layerwise" or m.startswith("layerwise.")}


def layer(name: str) -> str:
    """The top-level part of ``layerwise.<part>...`` (``""`` for the root package)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(name: str, imports: set[str]) -> list[str]:
    """The imports of module ``name`` that go upward."""
    own = layer(name)
    if own in TOP or own == "":
        return []
    forbidden = FORBIDDEN.get(own, LIBRARY_FORBIDDEN)
    return sorted(m for m in imports if layer(m) in forbidden and layer(m) != own)


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_module_is_seen():
    names = {module_name(p) for p in _modules()}
    assert {"layerwise.editing.merge.plan", "layerwise.tangent.linearize", "layerwise.cli"} <= names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_downward(path):
    name = module_name(path)
    imports = imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
    bad = violations(name, imports)
    assert not bad, f"{name} imports a higher layer: {bad}"


@pytest.mark.parametrize(
    ("name", "is_package", "source", "expected"),
    [
        # relative, module level and inside a function
        ("layerwise.editing.config", False, "from ..tangent import finetune", [T, f"{T}.finetune"]),
        ("layerwise.editing.merge.write", False, "def f():\n    from ...tangent.linearize import X",
         [f"{T}.linearize", f"{T}.linearize.X"]),
        ("layerwise.editing", True, "from .. import tangent", [T]),
        ("layerwise.kernels.curves", False, "import layerwise.experiments.locality",
         ["layerwise.experiments.locality"]),
        ("layerwise.diffeo.io", False, "from ..report import build",
         ["layerwise.report", "layerwise.report.build"]),
        ("layerwise.experiments.lines", False, "from ..cli import main",
         ["layerwise.cli", "layerwise.cli.main"]),
        ("layerwise.report", False, "from .cli import main", ["layerwise.cli", "layerwise.cli.main"]),
        # allowed: downward or sideways
        ("layerwise.tangent.finetune", False, "from ..editing.task_vector import TaskVector", []),
        ("layerwise.experiments.lines", False, "from ..tangent.evaluation import search_addition", []),
        ("layerwise.report", False, "from .experiments.claims import Claim", []),
        ("layerwise.cli.merge", False, "from ..experiments import EXPERIMENTS", []),
        ("layerwise.editing.merge.plan", False, "from ..lines import discover_blocks\nimport torch", []),
    ],
)
def test_checker_on_known_cases(name, is_package, source, expected):
    """The checker itself: each planted upward import is reported, each allowed one is not."""
    assert violations(name, imported_modules(source, name, is_package)) == sorted(expected)
