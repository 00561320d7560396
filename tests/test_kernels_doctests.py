"""The runnable examples in the kernels modules' docstrings."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["", ".base", ".local", ".hierarchical", ".regression", ".curves", ".data", ".spec",
           ".spectral_theory"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"layerwise.kernels{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
