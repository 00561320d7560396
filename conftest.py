"""Running the code blocks of README.md and docs/**/*.md (``make test-docs``; see docs/development.md).

Python blocks are collected by pytest-markdown-docs (``pytest --markdown-docs README.md docs``); shell
blocks by ``tests/doc_blocks/test_shell_blocks.py``. Every block runs as a newcomer would run it from a
checkout, but in a scratch folder: ``doc_sandbox`` is a temporary folder holding links to the repository's
top-level entries (``examples/``, ``docs/``, ``src/``…), so relative paths resolve while everything a
block writes stays out of the working tree. Hub downloads are switched off and torch uses one thread.

Fence info strings (the words after the language):

- ``notest``: not run (a hub model, a GPU, or a long run; the block says why in a comment);
- ``runner:script``: run as a separate ``python block.py`` process (blocks with an
  ``if __name__ == "__main__":`` guard, e.g. process pools);
- ``continuation``: run after the previous Python block of the same page, in the same namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
DOC_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "PYTHONHASHSEED": "0",
}
BLOCK_TIMEOUT_S = 180


def pytest_configure(config):
    """With ``--markdown-docs``: progress bars off for the whole run (tqdm reads it at import time)."""
    if getattr(config.option, "markdowndocs", False):
        os.environ.setdefault("TQDM_DISABLE", "1")


def make_sandbox(folder: Path) -> Path:
    """Fill ``folder`` with links to the repository's top-level entries (not .git, not virtual envs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name in {".git", "site", "results"} or entry.name.startswith(".venv"):
            continue
        (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return folder


def block_env() -> dict[str, str]:
    """The environment of a block run as a separate process: the virtual environment's ``bin`` first."""
    env = {**os.environ, **DOC_ENV}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture
def doc_block_env() -> dict[str, str]:
    """:func:`block_env` as a fixture (for tests/doc_blocks)."""
    return block_env()


@pytest.fixture
def doc_block_timeout() -> int:
    """Seconds one block may run."""
    return BLOCK_TIMEOUT_S


@pytest.fixture
def doc_sandbox(tmp_path, monkeypatch):
    """A scratch copy-by-links of the repository as the working directory, with the doc environment."""
    box = make_sandbox(tmp_path / "repo")
    monkeypatch.chdir(box)
    for key, value in DOC_ENV.items():
        monkeypatch.setenv(key, value)
    yield box


@pytest.fixture(autouse=True)
def _doc_block_isolation(request):
    """For pytest-markdown-docs items only: run in ``doc_sandbox``, one torch thread, figures closed."""
    if request.node.get_closest_marker("markdown-docs") is None:
        yield
        return
    request.getfixturevalue("doc_sandbox")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


try:
    from pytest_markdown_docs._runners import DefaultRunner, register_runner
except ImportError:  # the `dev` extra is not installed: no markdown tests to run
    pass
else:

    @register_runner()
    class script(DefaultRunner):  # noqa: N801  (the name is the fence option: runner:script)
        """Run the block as ``python block.py`` in the working directory (a real ``__main__``)."""

        def runtest(self, test, args, **kwargs):
            path = Path("doc_block.py")
            path.write_text(test.source, encoding="utf-8")
            proc = subprocess.run(
                [sys.executable, str(path)],
                env=block_env(),
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
            if proc.returncode != 0:
                raise AssertionError(
                    f"{test.source_path}:{test.start_line}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
                )
