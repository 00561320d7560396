"""The inputs shipped in examples/cli/ (used by the README's command-line taste) are exactly what
``examples/cli/make_inputs.py`` writes, and the README block runs them (tests/doc_blocks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from layerwise.editing import load_state_dict

CLI = Path(__file__).resolve().parents[1] / "examples" / "cli"


def test_shipped_inputs_are_reproduced_by_the_script(tmp_path):
    pytest.importorskip("PIL")
    spec = importlib.util.spec_from_file_location("make_inputs", CLI / "make_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    x = np.load(CLI / "X.npy", allow_pickle=False)
    assert x.shape == (64, 8) and x.dtype == np.float64           # the shape the README states
    assert np.array_equal(np.load(tmp_path / "X.npy", allow_pickle=False), x)
    assert (tmp_path / "photo.png").read_bytes() == (CLI / "photo.png").read_bytes()
    for name in ("base", "ft_a", "ft_b"):
        shipped, fresh = load_state_dict(CLI / name), load_state_dict(tmp_path / name)
        assert shipped.keys() == fresh.keys()
        assert all(shipped[k].equal(fresh[k]) for k in shipped)
