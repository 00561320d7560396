"""Fuzz the `layerwise` command in-process (issue 9): generated argument vectors for `rhm sample`,
`rhm denoise` and `reproduce` either succeed (with a readable, finite output) or fail with a
LayerwiseError (one line, exit 2 without LAYERWISE_DEBUG), an OSError on one of the paths given, or an
argparse usage error (exit 2, one line). Never another exception: that would be a bug.

Sizes are tiny; `reproduce` runs a registry holding only a toy experiment (no real experiment runs).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from layerwise import _extras  # noqa: E402
from layerwise.cli import main  # noqa: E402
from layerwise.errors import LayerwiseError  # noqa: E402
from layerwise.experiments import EXPERIMENTS, Experiment  # noqa: E402
from layerwise.hierarchy import RHM, load_dataset, save_dataset  # noqa: E402
from layerwise.hierarchy.denoising import load_denoised  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _mostly(common: st.SearchStrategy, rare: st.SearchStrategy, garbage: st.SearchStrategy | None = None,
            ) -> st.SearchStrategy:
    """``common`` 16 times in 20, ``rare`` 3 in 20 and ``garbage`` (or ``rare``) 1 in 20, so that a vector of
    several options still succeeds often."""
    garbage = rare if garbage is None else garbage
    return st.integers(0, 19).flatmap(lambda k: common if k < 16 else rare if k < 19 else garbage)


def _ints(small: tuple[int, int], odd: tuple[int, ...]) -> st.SearchStrategy[str]:
    """Mostly small valid values, sometimes boundary or absurd ones, sometimes not a number."""
    return _mostly(st.integers(*small).map(str), st.sampled_from(odd).map(str),
                   st.sampled_from(["abc", "1.5", "", "1e3", "0x10", "-"]))


SEEDS = _ints((0, 5), (-1, 2**63 - 1, 2**63, 2**64, -(2**63)))


def _run(argv: list[str], paths: list[Path]) -> tuple[str, int | None, str, BaseException | None]:
    """Run ``main(argv)`` with LAYERWISE_DEBUG=1 (errors propagate); classify the outcome."""
    out, err = io.StringIO(), io.StringIO()
    os.environ["LAYERWISE_DEBUG"] = "1"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        return "returned", code, err.getvalue(), None
    except SystemExit as exc:
        return "usage", exc.code, err.getvalue(), exc
    except LayerwiseError as exc:
        return "layerwise", 2, str(exc), exc
    except OSError as exc:
        given = {os.path.abspath(p) for p in paths}
        assert exc.filename is not None and os.path.abspath(exc.filename) in given, (argv, repr(exc))
        return "oserror", 2, str(exc), exc
    except BaseException as exc:  # a bug
        raise AssertionError(f"layerwise {' '.join(argv)} raised {type(exc).__name__}: {exc}") from exc
    finally:
        del os.environ["LAYERWISE_DEBUG"]


def _check_failure(kind: str, code: int | None, text: str) -> None:
    assert code == 2, (kind, code, text)
    assert text.strip() and "Traceback" not in text
    if kind == "usage":
        assert len(text.strip().splitlines()) == 1, text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rhm = RHM(5, 3, 2, 2, 3, seed=0)
    files = {"good.pt": None, "good.npz": None}
    for name in files:
        files[name] = save_dataset(root / name, rhm, rhm.sample(6, seed=1))
    blob = files["good.pt"].read_bytes()
    (root / "cut.pt").write_bytes(blob[: len(blob) // 2])
    (root / "garbage.npz").write_bytes(os.urandom(300))
    raw = torch.load(files["good.pt"], weights_only=True)
    raw["labels"][0] = -1  # consistent tokens: label -1 indexes the last class's rules
    raw["tokens"] = rhm.from_choices(raw["labels"], [raw[f"choices_{k}"] for k in range(3)]).tokens
    torch.save(raw, root / "label.pt")
    raw = torch.load(files["good.pt"], weights_only=True)
    raw["choices_1"][0, 0] = -1
    raw["tokens"] = rhm.from_choices(raw["labels"], [raw[f"choices_{k}"] for k in range(3)]).tokens
    torch.save(raw, root / "choice.pt")
    np.savez(root / "object.npz", params=np.array([object()], dtype=object))
    (root / "folder.pt").mkdir()
    (root / "existing.pt").write_bytes(blob)
    (root / "notes.txt").write_text("not data")
    return root


_counter = itertools.count()


def _out_path(root: Path, choice: str, src: Path | None = None) -> Path:
    if choice == "SAME":
        return src if src is not None else root / "existing.pt"
    if choice in ("folder.pt", "existing.pt", "notes.txt"):
        return root / choice
    return root / "outs" / f"o{next(_counter)}{choice}"


OUTS = _mostly(st.sampled_from([".pt", ".npz"]), st.sampled_from(["folder.pt", "existing.pt", "SAME"]),
               st.sampled_from([".txt", ""]))


# --------------------------------------------------------------------------------------------- rhm sample
def test_fuzz_rhm_sample(workdir):
    sizes = _mostly(
        st.fixed_dictionaries({"--v": _ints((3, 8), (-1, 0, 1, 2**70)), "--m": _ints((1, 3), (0, -3, 40)),
                               "--s": _ints((2, 3), (0, 1, -2)), "--L": _ints((1, 4), (0, -1, 40, 1000)),
                               "--n": _ints((0, 20), (-1, 10**30))}),
        st.sampled_from([  # the runaway requests of the issue
            {"--v": "8", "--m": "2", "--L": "40", "--n": "10"},
            {"--v": "100000", "--m": "100000", "--L": "2", "--n": "10"},
            {"--v": "8", "--m": "2", "--L": "1000", "--n": "10"},
            {"--v": "8", "--m": "2", "--L": "1000000", "--n": "10"},
        ]),
    )

    @FUZZ
    @given(sizes=sizes, n_c=st.one_of(st.none(), _ints((1, 8), (0, -1))),
           mode=_mostly(st.sampled_from([None, "iid", "distinct"]), st.just("random")),
           seed=st.one_of(st.none(), SEEDS),
           rules_seed=st.one_of(st.none(), SEEDS), out=OUTS, overwrite=st.booleans())
    def run(sizes, n_c, mode, seed, rules_seed, out, overwrite):
        path = _out_path(workdir, out)
        before = path.read_bytes() if path.is_file() else None
        argv = ["rhm", "sample"]
        for key, value in sizes.items():
            argv += [key, value]
        for key, value in (("--n-c", n_c), ("--mode", mode), ("--seed", seed), ("--rules-seed", rules_seed)):
            if value is not None:
                argv += [key, value]
        argv += ["--out", str(path)] + (["--overwrite"] if overwrite else [])
        kind, code, text, _ = _run(argv, [path])
        if kind == "returned" and code == 0:
            rhm, data = load_dataset(path)
            assert rhm.v == int(sizes["--v"]) and len(data) == int(sizes["--n"])
        else:
            _check_failure(kind, code, text)
            if before is not None and not overwrite:
                assert path.read_bytes() == before  # a refused run never touches an existing file

    run()


# --------------------------------------------------------------------------------------------- rhm denoise
def test_fuzz_rhm_denoise(workdir):
    data_files = _mostly(st.sampled_from(["good.pt", "good.npz"]),
                         st.sampled_from(["cut.pt", "garbage.npz", "label.pt", "choice.pt", "object.npz"]),
                         st.sampled_from(["missing.pt", "folder.pt", "notes.txt"]))
    odd_levels = st.sampled_from(["0", "1", "1.5", "-0.1", "nan", "inf", "-inf", "1e-300"])
    levels = _mostly(st.floats(0, 1).map(repr), odd_levels, st.just("abc"))

    @FUZZ
    @given(data=data_files, process=_mostly(st.sampled_from(["eps", "uniform", "mask"]),
                                            st.sampled_from(["gauss", "EPS", ""])),
           level=levels, seed=st.one_of(st.none(), SEEDS),
           dtype=_mostly(st.sampled_from([None, "float64", "float32"]), st.just("float16")),
           batch=st.one_of(st.none(), _ints((1, 8), (0, -2, 4096))), out=OUTS, overwrite=st.booleans())
    def run(data, process, level, seed, dtype, batch, out, overwrite):
        src = workdir / data
        path = _out_path(workdir, out, src)
        existed = path.exists()
        before = src.read_bytes() if src.is_file() else None
        argv = ["rhm", "denoise", str(src), "--process", process, "--level", level]
        for key, value in (("--seed", seed), ("--dtype", dtype), ("--batch-size", batch)):
            if value is not None:
                argv += [key, value]
        argv += ["--out", str(path)] + (["--overwrite"] if overwrite else [])
        kind, code, text, _ = _run(argv, [src, path])
        if kind == "returned" and code == 0:
            assert data in ("good.pt", "good.npz")
            got = load_denoised(path)
            for key, value in got.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert torch.isfinite(value).all(), key  # never exit 0 with a non-finite output
        else:
            _check_failure(kind, code, text)
            if data in ("label.pt", "choice.pt") and not existed:
                assert not path.exists()  # refused before any output was written
        if before is not None:
            assert src.read_bytes() == before  # the input is never written over

    run()


# --------------------------------------------------------------------------------------------- reproduce
def _tiny_run(config, out):
    (Path(out) / "tiny.json").write_text('{"x": 1}')
    return {"x": 1, "claims": [], "tables": []}


def test_fuzz_reproduce(workdir, monkeypatch):
    from dataclasses import dataclass

    import layerwise.report

    @dataclass(frozen=True)
    class Config:
        k: int = 1

    tiny = Experiment(name="tiny", run=_tiny_run, scales={"quick": Config(), "full": Config(2)},
                      description="toy")
    needy = Experiment(name="needy", run=_tiny_run, scales={"quick": Config(), "full": Config(2)},
                       description="needs the vision extra", extras=("vision",))
    monkeypatch.setattr(EXPERIMENTS, "_items", {"tiny": tiny, "needy": needy})
    monkeypatch.setattr(layerwise.report, "build_report", lambda out, *a, **k: Path(out) / "report.html")
    real = _extras._importable
    monkeypatch.setattr(_extras, "_importable", lambda m: m not in ("timm", "open_clip") and real(m))
    foreign = workdir / "foreign"
    (foreign / "tiny").mkdir(parents=True, exist_ok=True)
    (foreign / "tiny" / "mine.txt").write_text("keep")
    monkeypatch.chdir(workdir)

    names = st.lists(_mostly(st.just("tiny"), st.sampled_from(["needy", "no-such", "all"]),
                             st.sampled_from(["TINY", "rhm-stats"])), max_size=3)
    outs = _mostly(st.just("new"), st.sampled_from(["notes.txt", "foreign", "folder.pt"]),
                   st.sampled_from([".", ".."]))

    scales = _mostly(st.sampled_from([None, "quick", "full"]), st.sampled_from(["huge", "qu", ""]))

    @FUZZ
    @given(names=names, scale=scales, out=outs, listing=_mostly(st.just(False), st.just(True)),
           abbreviated=_mostly(st.just(False), st.just(True)))
    def run(names, scale, out, listing, abbreviated):
        target = workdir / "runs" / f"r{next(_counter)}" if out == "new" else Path(out)
        argv = ["reproduce", *names]
        if scale is not None:
            argv += ["--scal" if abbreviated else "--scale", scale]
        argv += ["--out", str(target)] + (["--list"] if listing else [])
        kind, code, text, _ = _run(argv, [target])
        if kind == "returned" and code == 0:
            if not listing:
                chosen = ["tiny", "needy"] if names in ([], ["all"]) else names
                assert "needy" not in chosen and not abbreviated
                assert (target / "tiny" / "tiny.json").is_file()
        else:
            _check_failure(kind, code, text)
        assert (foreign / "tiny" / "mine.txt").read_text() == "keep"
        assert (workdir / "notes.txt").read_text() == "not data"

    run()
