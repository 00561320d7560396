"""What the `layerwise` commands guarantee on bad input (issue 9, part B): one-line errors and exit code 2,
bugs keep their traceback, memory checks before allocation, seeds, data files, extras and a fast --help."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from layerwise import _extras, _resources
from layerwise.cli import build_parser, main
from layerwise.cli._app import Parser, run_handler
from layerwise.errors import (
    CheckpointError,
    InputDataError,
    MissingExtraError,
    ParameterError,
    ParameterTypeError,
    ResourceError,
)
from layerwise.hierarchy import RHM, load_dataset, save_dataset
from layerwise.hierarchy.bp import belief_propagation, bp_memory
from layerwise.hierarchy.denoising import denoise_memory


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"layerwise {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------- errors
def _handler(exc: BaseException):
    def func(args):
        raise exc

    return func


@pytest.mark.parametrize(
    ("exc", "needle"),
    [
        (ParameterError("n must be in [0, 5], got 7"), "n must be in [0, 5], got 7"),
        (ResourceError("needs 1 TB"), "needs 1 TB"),
        (MissingExtraError("install layerwise[dpo]"), "layerwise[dpo]"),
        (IsADirectoryError(21, "Is a directory", "/tmp/some/dir"), "Is a directory: '/tmp/some/dir'"),
        (FileExistsError(17, "File exists", "/tmp/x"), "File exists: '/tmp/x'"),
        (PermissionError(13, "Permission denied", "/root/x"), "Permission denied: '/root/x'"),
        (OSError(28, "No space left on device", "/tmp/out"), "No space left on device: '/tmp/out'"),
        (ValueError("legacy\nmessage"), "legacy; message"),  # still one line
        (MemoryError(), "out of memory"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, exc, needle):
    assert run_handler(_handler(exc), argparse.Namespace(), "rhm") == 2
    line = _one_error_line(capsys.readouterr().err, "rhm")
    assert needle in line


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(capsys):
    assert run_handler(_handler(RuntimeError("index out of range in self")), argparse.Namespace(), "rhm") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: index out of range in self" in err
    assert "internal error" in err.splitlines()[-1] and "report" in err.splitlines()[-1]


def test_interrupt_is_one_line_exit_130(capsys):
    assert run_handler(_handler(KeyboardInterrupt()), argparse.Namespace(), "reproduce") == 130
    assert capsys.readouterr().err.strip() == "layerwise reproduce: interrupted"


@pytest.mark.parametrize("value", ["1", "yes"])
def test_layerwise_debug_shows_the_traceback(monkeypatch, value):
    monkeypatch.setenv("LAYERWISE_DEBUG", value)
    with pytest.raises(ParameterError):
        run_handler(_handler(ParameterError("x")), argparse.Namespace(), "rhm")
    with pytest.raises(IsADirectoryError):
        run_handler(_handler(IsADirectoryError(21, "Is a directory", "d")), argparse.Namespace(), "rhm")
    monkeypatch.setenv("LAYERWISE_DEBUG", "0")  # "0" means off
    assert run_handler(_handler(ParameterError("x")), argparse.Namespace(), "rhm") == 2


def test_validation_raises_the_hierarchy():
    from layerwise._validation import check_choice, check_float, check_int

    with pytest.raises(ParameterError, match="n must be in"):
        check_int("n", -1, low=0)
    with pytest.raises(ParameterTypeError, match="n must be an integer"):
        check_int("n", 1.5)
    with pytest.raises(ParameterError, match="level must be a finite number"):
        check_float("level", 10**400)  # beyond the float range: was an OverflowError
    with pytest.raises(ParameterError, match="method must be one of"):
        check_choice("method", {"a": 1}, ["ties"])  # was "unhashable type: 'dict'"


# --------------------------------------------------------------------------------------------- parsers
def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_parser_refuses_prefixes():
    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) >= 8
    assert all(isinstance(p, Parser) and p.allow_abbrev is False for p in parsers)


@pytest.mark.parametrize(
    "argv",
    [
        ["reproduce", "rhm-stats", "--scal", "quick"],
        ["rhm", "sample", "--v", "4", "--m", "2", "--L", "2", "--n", "3", "--ou", "x.pt"],
        ["rhm", "denoise", "d.pt", "--proc", "eps", "--level", "0.1", "--out", "o.pt"],
    ],
)
def test_prefix_options_are_refused_in_one_line(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ": error: " in err
    assert not any(tmp_path.iterdir())


def test_building_the_parser_and_every_help_imports_nothing_heavy():
    code = (
        "import sys, argparse, time\n"
        "t = time.perf_counter()\n"
        "import layerwise.cli as c\n"
        "p = c.build_parser()\n"
        "todo = [p]\n"
        "while todo:\n"
        "    q = todo.pop(); q.format_help()\n"
        "    for a in q._actions:\n"
        "        if isinstance(a, argparse._SubParsersAction): todo.extend(a.choices.values())\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'scipy', 'matplotlib', 'transformers', "
        "'layerwise.experiments', 'layerwise.hierarchy', 'layerwise.editing') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_help_is_fast():
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "layerwise", "reproduce", "--help"], capture_output=True,
                         text=True)
    elapsed = time.perf_counter() - start
    assert res.returncode == 0 and "rhm-stats" in res.stdout
    # Measured 0.1 s; a generous bound for a loaded CI machine (importing torch alone takes ~2 s there).
    assert elapsed < 1.5


def test_static_experiment_list_matches_the_registry():
    from layerwise.cli import reproduce
    from layerwise.experiments import EXPERIMENTS, SCALES

    registry = [(n, EXPERIMENTS.get(n).description) for n in EXPERIMENTS.names()]
    missing = [f'    ("{n}", "{d}"),' for n, d in registry if (n, d) not in reproduce.EXPERIMENT_INDEX]
    assert not missing, "add to EXPERIMENT_INDEX in cli/reproduce.py:\n" + "\n".join(missing)
    assert list(reproduce.EXPERIMENT_INDEX) == registry
    assert tuple(reproduce.SCALES) == tuple(SCALES)


# --------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize(("option", "seed"), [("--seed", 2**63), ("--seed", -1), ("--rules-seed", 2**64)])
def test_seeds_outside_int64_are_refused(tmp_path, capsys, option, seed):
    out = tmp_path / "x.pt"
    code = main(["rhm", "sample", "--v", "4", "--m", "2", "--L", "2", "--n", "3", option, str(seed),
                 "--out", str(out)])
    assert code == 2
    assert "seed must be in [0, 9223372036854775807]" in _one_error_line(capsys.readouterr().err, "rhm")
    assert not out.exists()


def test_largest_seed_is_accepted(tmp_path):
    from layerwise._validation import make_generator

    assert make_generator(2**63 - 1).initial_seed() == 2**63 - 1
    with pytest.raises(ParameterError, match="seed"):
        make_generator(2**63)
    assert main(["rhm", "sample", "--v", "4", "--m", "2", "--L", "2", "--n", "3", "--seed", str(2**63 - 1),
                 "--out", str(tmp_path / "x.pt")]) == 0


# --------------------------------------------------------------------------------------------- resources
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--v", "8", "--m", "2", "--L", "40", "--n", "10"], "would need about 440 TB"),
        (["--v", "100000", "--m", "100000", "--L", "2", "--n", "10"], "the rule tables of RHM(v=100000"),
        (["--v", "8", "--m", "2", "--L", "1000", "--n", "10"], "s**L = 2**1000"),
        (["--v", "3", "--m", "2", "--s", "1000000000", "--L", "2", "--n", "1"], "s**L = 1000000000**2"),
        (["--v", "10000000000", "--m", "2", "--L", "1", "--n", "1"], "v**s must be < 2**63"),
    ],
)
def test_runaway_rhm_requests_are_refused_quickly(tmp_path, capsys, args, needle):
    out = tmp_path / "x.pt"
    start = time.perf_counter()
    assert main(["rhm", "sample", *args, "--out", str(out)]) == 2
    assert time.perf_counter() - start < 5.0  # was: 18 GB and still running after 7 minutes (L=40)
    assert needle in _one_error_line(capsys.readouterr().err, "rhm")
    assert not out.exists()


def test_huge_p_max_is_printed_without_failing(tmp_path, capsys):
    # P_max = 32 * 8**8191 has 7399 digits: str() of it raised "Exceeds the limit (4300 digits)".
    assert main(["rhm", "sample", "--v", "32", "--m", "8", "--L", "13", "--n", "2",
                 "--out", str(tmp_path / "x.pt")]) == 0
    assert "P_max=32*8^8191 (~10^7398.7)" in capsys.readouterr().out


def _tensor_bytes(sample) -> int:
    return sum(t.numel() * t.element_size() for t in (sample.labels, *sample.tree, *sample.choices))


@pytest.mark.parametrize("method", ["sample", "sample_distinct"])
def test_data_memory_estimate_bounds_what_is_allocated(monkeypatch, method):
    rhm = RHM(8, 8, 2, 2, 6, seed=0)
    seen = []
    monkeypatch.setattr("layerwise.hierarchy.rhm.check_memory", lambda n, what: seen.append(n))
    data = getattr(rhm, method)(500, seed=1)
    (estimate,) = seen
    assert _tensor_bytes(data) <= estimate <= 4 * _tensor_bytes(data)


def test_requests_above_available_memory_are_refused(monkeypatch):
    rhm = RHM(8, 8, 2, 2, 6, seed=0)
    need = 8 * 1000 * (2 * rhm.n_internal + rhm.d + 2)  # 1000 i.i.d. data, as estimated
    monkeypatch.setattr(_resources, "_ALWAYS_FITS", 0)
    monkeypatch.setattr(_resources, "available_memory", lambda device=None: need - 1)
    with pytest.raises(ResourceError, match=r"sample\(n=1000\).*would need about.*available"):
        rhm.sample(1000)
    assert len(rhm.sample(999)) == 999  # just below the limit: fine


def test_bp_memory_estimate_bounds_its_outputs():
    rhm = RHM(6, 4, 2, 2, 4, seed=0)
    evidence = torch.rand(50, rhm.d, rhm.v, dtype=torch.float64)
    res = belief_propagation(rhm, evidence)
    outputs = sum(m.numel() * m.element_size() for m in res.marginals)
    estimate = bp_memory(rhm, 50)
    # marginals + upward messages (the same size) + a converted copy of the evidence, plus chunk temporaries
    assert 2 * outputs <= estimate - 8 * 8 * (1 << 18) <= 2 * outputs + evidence.numel() * 8
    assert denoise_memory(rhm, 50) >= outputs + estimate


def test_denoise_refuses_before_writing_when_memory_is_short(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.pt"
    assert main(["rhm", "sample", "--v", "6", "--m", "2", "--L", "3", "--n", "40", "--out", str(data)]) == 0
    monkeypatch.setattr(_resources, "_ALWAYS_FITS", 0)
    # enough to read the 13 kB file, not for belief propagation's chunk buffers
    monkeypatch.setattr(_resources, "available_memory", lambda device=None: 1_000_000)
    out = tmp_path / "o.pt"
    assert main(["rhm", "denoise", str(data), "--process", "eps", "--level", "0.3", "--out", str(out)]) == 2
    assert "denoising 40 data" in _one_error_line(capsys.readouterr().err, "rhm")
    assert not out.exists()


def test_meminfo_is_read_and_has_a_fallback(tmp_path, monkeypatch):
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    512 kB\n")
    assert _resources._meminfo_available(str(fake)) == 512 * 1024
    assert _resources._meminfo_available(str(tmp_path / "missing")) is None
    monkeypatch.setattr(_resources, "_meminfo_available", lambda: None)
    assert _resources.available_memory() > 0


def test_cuda_work_is_checked_against_the_device_memory(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: seen.append(device) or (123, 456))
    assert _resources.available_memory("cuda:0") == 123
    assert _resources.available_memory(torch.device("cuda", 1)) == 123
    assert _resources.available_memory(torch.device("cpu")) != 123 and len(seen) == 2
    monkeypatch.setattr(_resources, "_ALWAYS_FITS", 0)
    with pytest.raises(ResourceError, match="only 123 B is available"):
        _resources.check_memory(124, "x", device="cuda")


def test_format_bytes():
    assert _resources.format_bytes(999) == "999 B"
    assert _resources.format_bytes(160_000_000_000) == "160 GB"
    assert _resources.format_bytes(8 * 10 * 3 * 2**1000).startswith("about 2^10")


# --------------------------------------------------------------------------------------------- data files
@pytest.fixture()
def saved(tmp_path):
    rhm = RHM(6, 4, 2, 2, 3, seed=0)
    path = save_dataset(tmp_path / "d.pt", rhm, rhm.sample(20, seed=1))
    return rhm, path


def _rewrite(path, **changes):
    raw = torch.load(path, weights_only=True)
    raw.update(changes)
    torch.save(raw, path)


def test_truncated_and_garbage_files_are_input_data_errors(saved, tmp_path):
    rhm, path = saved
    npz = save_dataset(tmp_path / "d.npz", rhm, rhm.sample(20, seed=1))
    for src in (path, npz):
        blob = src.read_bytes()
        for cut in (len(blob) // 2, len(blob) - 30, 10):
            bad = tmp_path / f"cut{cut}{src.suffix}"
            bad.write_bytes(blob[:cut])
            with pytest.raises(InputDataError, match=str(bad.name)):
                load_dataset(bad)
        bad = tmp_path / f"garbage{src.suffix}"
        bad.write_bytes(bytes(range(256)) * 4)
        with pytest.raises(InputDataError, match="garbage"):
            load_dataset(bad)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"params": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputDataError, match="evil.pt"):
        load_dataset(tmp_path / "evil.pt")
    np.savez(tmp_path / "evil.npz", params=np.array([Evil()], dtype=object))
    with pytest.raises(InputDataError, match="evil.npz"):
        load_dataset(tmp_path / "evil.npz")


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("params", torch.tensor([6, 4, 2]), "params must have shape (5,)"),  # was: zip() argument 2 ...
        ("labels", torch.full((20,), -1), "labels must hold values in [0, 4)"),
        ("choices_1", torch.full((20, 2), -1), "choices_1 must hold values in [0, 2)"),
        ("choices_0", torch.full((20, 1), 2), "choices_0 must hold values in [0, 2)"),
        ("labels", torch.zeros(20), "labels must hold integers"),
        ("rules_0", torch.full((4, 2, 2), -1), "rules_0 must hold values in [0, 6)"),
    ],
)
def test_out_of_range_content_is_refused(saved, key, value, needle):
    _, path = saved
    _rewrite(path, **{key: value})
    with pytest.raises(InputDataError, match="d.pt") as exc:
        load_dataset(path)
    assert needle in str(exc.value)


def test_missing_key_is_refused(saved):
    _, path = saved
    raw = torch.load(path, weights_only=True)
    del raw["choices_2"]
    torch.save(raw, path)
    with pytest.raises(InputDataError, match="missing 'choices_2'"):
        load_dataset(path)


def test_a_small_file_declaring_a_huge_array_is_refused_before_loading(tmp_path, monkeypatch):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, params=np.zeros(4_000_000, dtype=np.int64))  # 32 MB of zeros, ~30 kB file
    assert path.stat().st_size < 100_000
    monkeypatch.setattr(_resources, "_ALWAYS_FITS", 0)
    monkeypatch.setattr(_resources, "available_memory", lambda device=None: 10_000_000)
    with pytest.raises(ResourceError, match="bomb.npz"):
        load_dataset(path)


@pytest.mark.parametrize("label", [-1, 4])
def test_cli_denoise_refuses_bad_labels_before_writing(saved, tmp_path, capsys, label):
    rhm, path = saved
    raw = torch.load(path, weights_only=True)
    raw["labels"][3] = label
    if label < 0:  # label -1 indexes the last class's rules: tokens recomputed, the file looks consistent
        raw["tokens"] = rhm.from_choices(raw["labels"], [raw[f"choices_{k}"] for k in range(3)]).tokens
    torch.save(raw, path)
    out = tmp_path / "o.pt"
    assert main(["rhm", "denoise", str(path), "--process", "eps", "--level", "0.2", "--out", str(out)]) == 2
    assert "labels must hold values in [0, 4)" in _one_error_line(capsys.readouterr().err, "rhm")
    assert not out.exists()  # was written before the error


def test_cli_denoise_refuses_choice_minus_one(saved, tmp_path, capsys):
    _, path = saved
    raw = torch.load(path, weights_only=True)
    raw["choices_2"][0, 0] = -1  # acted as the last rule; tokens recomputed to stay consistent
    rhm = RHM(6, 4, 2, 2, 3, rules=[raw[f"rules_{k}"] for k in range(3)])
    raw["tokens"] = rhm.from_choices(raw["labels"], [raw[f"choices_{k}"] for k in range(3)]).tokens
    torch.save(raw, path)
    out = tmp_path / "o.pt"
    assert main(["rhm", "denoise", str(path), "--process", "eps", "--level", "0.2", "--out", str(out)]) == 2
    assert "choices_2 must hold values in [0, 2)" in _one_error_line(capsys.readouterr().err, "rhm")
    assert not out.exists()


def test_cli_truncated_data_file_is_one_line(saved, tmp_path, capsys):
    _, path = saved
    path.write_bytes(path.read_bytes()[:200])
    assert main(["rhm", "denoise", str(path), "--process", "eps", "--level", "0.2",
                 "--out", str(tmp_path / "o.pt")]) == 2
    assert "is not a readable .pt" in _one_error_line(capsys.readouterr().err, "rhm")


def test_cli_rhm_outputs_are_not_overwritten_without_the_flag(saved, tmp_path, capsys):
    _, path = saved
    before = path.read_bytes()
    assert main(["rhm", "sample", "--v", "4", "--m", "2", "--L", "2", "--n", "3", "--out", str(path)]) == 2
    assert "exists" in _one_error_line(capsys.readouterr().err, "rhm")
    assert path.read_bytes() == before
    # denoise may never write over its own input, even with --overwrite
    assert main(["rhm", "denoise", str(path), "--process", "eps", "--level", "0.2", "--out", str(path),
                 "--overwrite"]) == 2
    assert "is the input" in _one_error_line(capsys.readouterr().err, "rhm")
    assert path.read_bytes() == before
    assert main(["rhm", "sample", "--v", "4", "--m", "2", "--L", "2", "--n", "3", "--out", str(path),
                 "--overwrite"]) == 0
    assert load_dataset(path)[0].v == 4
    (tmp_path / "folder.pt").mkdir()
    assert main(["rhm", "sample", "--v", "4", "--m", "2", "--L", "2", "--n", "3",
                 "--out", str(tmp_path / "folder.pt"), "--overwrite"]) == 2
    assert "existing folder" in _one_error_line(capsys.readouterr().err, "rhm")


# --------------------------------------------------------------------------------------------- extras
def _without(monkeypatch, *modules):
    real = _extras._importable
    monkeypatch.setattr(_extras, "_importable", lambda m: m not in modules and real(m))


def test_reproduce_m3id_without_dpo_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    _without(monkeypatch, "trl")
    start = time.perf_counter()
    assert main(["reproduce", "rhm-stats", "m3id", "--out", str(tmp_path / "res")]) == 2
    assert time.perf_counter() - start < 5
    line = _one_error_line(capsys.readouterr().err, "reproduce")
    assert "experiment m3id needs the optional extra 'dpo'" in line and "layerwise[dpo]" in line
    assert not (tmp_path / "res").exists()  # rhm-stats, listed first, did not run either


def test_commands_name_their_extra(tmp_path, monkeypatch, capsys):
    _without(monkeypatch, "transformers", "diffusers")
    assert main(["m3id", "generate", "--model", "m", "--prompt", "hi"]) == 2
    assert "'hf'" in _one_error_line(capsys.readouterr().err, "m3id")
    text = tmp_path / "t.txt"
    text.write_text("some words")
    assert main(["diffusion", "text", "--model", "m", "--text", str(text), "--levels", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "layerwise[hf]" in _one_error_line(capsys.readouterr().err, "diffusion")
    assert main(["diffusion", "images", "--pipeline", "p", "--encoder", "e", "--timesteps", "5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "layerwise[diffusion]" in _one_error_line(capsys.readouterr().err, "diffusion")
    assert not (tmp_path / "o").exists()


def test_extras_agree_with_pyproject_and_readme():
    import re
    from pathlib import Path

    import tomllib

    from layerwise.experiments import EXPERIMENTS

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    module_of = {"transformers": "transformers", "pillow": "PIL", "diffusers": "diffusers", "trl": "trl",
                 "timm": "timm", "open_clip_torch": "open_clip", "scikit-learn": "sklearn",
                 "dask": "dask", "submitit": "submitit", "peft": "peft"}
    # dev and docs are tools for working on layerwise, not features a command checks for
    assert set(declared) - {"dev", "all", "docs"} == set(_extras.EXTRAS)
    for extra, modules in _extras.EXTRAS.items():
        for requirement in declared[extra]:
            dist = re.split(r"[<>=\[ ]", requirement)[0]
            assert module_of[dist] in modules, (extra, dist)
    needed = {e for name in EXPERIMENTS.names() for e in EXPERIMENTS.get(name).extras}
    assert {"hf", "dpo"} <= needed
    readme = (root / "README.md").read_text()
    line = re.search(r'pip install -e "\.\[([a-z,]+)\]"', readme)
    assert line, "README has no `pip install -e \".[...]\"` line"
    assert needed <= set(line.group(1).split(",")), "README install line misses extras experiments need"


# --------------------------------------------------------------------------------------------- diffusion
def test_diffusion_text_checks_arguments_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from layerwise.diffusion import text as text_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(text_module.MaskedLMDenoiser, "from_pretrained", no_loading)
    corpus = tmp_path / "t.txt"
    corpus.write_text("the cat sat on the mat " * 20)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    base = ["diffusion", "text", "--model", str(tmp_path / "model")]
    cases = [
        (["--text", str(corpus), "--levels", "1.5"], "levels[0] must be a finite number in [0.0, 1.0]"),
        (["--text", str(corpus), "--levels", "0.2", "nan"], "levels[1] must be a finite number"),
        (["--text", str(tmp_path / "missing.txt"), "--levels", "0.5"], "no such text file"),
        (["--text", str(empty), "--levels", "0.5"], "is empty"),
        (["--text", str(latin), "--levels", "0.5"], "is not UTF-8 text"),
        (["--text", str(corpus), "--levels", "0.5", "--n-trajectories", "1"], "n_trajectories must be"),
        (["--text", str(corpus), "--levels", "0.5", "--seed", str(2**63)], "seed must be in"),
        (["--text", str(corpus), "--levels", "0.5", "--r-max", "0"], "r_max must be"),
    ]
    for extra, needle in cases:
        assert main([*base, *extra, "--out", str(tmp_path / "o")]) == 2, extra
        assert needle in _one_error_line(capsys.readouterr().err, "diffusion"), extra
    # the output folder is checked before loading too
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    assert main([*base, "--text", str(corpus), "--levels", "0.5", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in _one_error_line(capsys.readouterr().err, "diffusion")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"


def test_image_processor_gets_the_trust_flag_and_never_falls_back_silently(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from layerwise.diffusion.runner import _processor_statistics

    calls = []

    class Proc:
        image_mean, image_std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]

    def fake(path, **kwargs):
        calls.append(kwargs)
        if path == "broken":
            raise OSError("no preprocessor_config.json")
        return Proc()

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", fake)
    assert _processor_statistics("ok", trust_remote_code=False) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert _processor_statistics("ok", trust_remote_code=True)[0] == (0.1, 0.2, 0.3)
    assert [c["trust_remote_code"] for c in calls] == [False, True]
    with pytest.raises(CheckpointError, match="normalization='imagenet'"):
        _processor_statistics("broken", trust_remote_code=False)


# --------------------------------------------------------------------------------------------- reproduce
def test_reproduce_refuses_an_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("not a folder")
    assert main(["reproduce", "rhm-stats", "--out", str(target)]) == 2
    assert "is an existing file" in _one_error_line(capsys.readouterr().err, "reproduce")
    assert target.read_text() == "not a folder"


def test_reproduce_refuses_a_foreign_experiment_folder_before_running(tmp_path, capsys):
    (tmp_path / "rhm-stats").mkdir()
    (tmp_path / "rhm-stats" / "notes.txt").write_text("mine")
    assert main(["reproduce", "rhm-stats", "--out", str(tmp_path)]) == 2
    assert "rhm-stats" in _one_error_line(capsys.readouterr().err, "reproduce")
    assert (tmp_path / "rhm-stats" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rhm-stats"]
