"""The runnable examples in the editing modules' docstrings."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "checkpoints",
    "task_vector",
    "lines",
    "config",
    "merge",
    "merge.registry",
    "merge.topk",
    "merge.plan",
    "merge.stream",
    "merge.write",
    "merge.gradients",
    "mergekit_config",
    "vocab",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"layerwise.editing.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
