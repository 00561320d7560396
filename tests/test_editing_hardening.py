"""Issue 9, part A: ``layerwise merge`` and output folders. Each test starts from a reproduction listed in
the issue (all of them lost data, wrote garbage with exit 0, or gave a traceback before the fix)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from layerwise._io import (
    OUTPUT_MARKER,
    atomic_directory,
    check_output_dir,
    check_output_file,
    is_temporary_name,
)
from layerwise.cli import build_parser, main
from layerwise.editing.checkpoints import load_state_dict, open_checkpoint, save_checkpoint
from layerwise.editing.config import load_merge_config
from layerwise.errors import CheckpointError, ConfigError, OutputPathError, ParameterError


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.w": torch.randn(3, 4, generator=g),
        "blocks.1.w": torch.randn(4, generator=g),
        "head.b": torch.randn(2, generator=g),
    }


@pytest.fixture
def models(tmp_path):
    """A base folder (with a config.json, as Hugging Face writes it) and two fine-tuned folders."""
    base = save_checkpoint(_sd(0), tmp_path / "base")
    (base / "config.json").write_text(
        json.dumps({"model_type": "toy", "torch_dtype": "float32", "text_config": {"torch_dtype": "float32"}})
    )
    fts = [save_checkpoint(_sd(i + 1), tmp_path / f"ft{i}") for i in range(2)]
    return base, fts


def _config(tmp_path, base, fts, name="c.yaml", **extra):
    data = {"method": "task_arithmetic", "base_model": str(base), "models": [str(f) for f in fts], **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _handler(argv):
    """Run a command's handler in-process without the CLI's error mapping (the exception is visible)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def _tree(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# -- 1. --out never destroys what the command did not create -------------------------------------------------
def test_out_with_unrelated_files_is_refused_even_with_overwrite(tmp_path, models, capsys):
    base, fts = models
    cfg = _config(tmp_path, base, fts)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):
        assert main(["merge", str(cfg), "--out", str(out), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and len(err.strip().splitlines()) == 1
    assert _tree(out) == {"notes.txt": b"precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "c.yaml", "ft0", "ft1", "mine"]


@pytest.mark.parametrize("which", ["base", "ft1", "parent", "config_folder"])
def test_out_equal_to_or_containing_an_input_is_always_refused(tmp_path, models, which):
    base, fts = models
    sub = tmp_path / "cfgs"
    sub.mkdir()
    cfg = _config(sub, base, fts)
    out = {"base": base, "ft1": fts[1], "parent": tmp_path, "config_folder": sub}[which]
    before = _tree(tmp_path)
    with pytest.raises(OutputPathError, match="input"):
        _handler(["merge", str(cfg), "--out", str(out), "--overwrite", "--no-progress"])
    assert _tree(tmp_path) == before
    # also for a folder layerwise wrote (the ft folders carry the marker): an input is never replaced
    assert (fts[1] / OUTPUT_MARKER).exists()


def test_out_that_is_a_file_is_refused_and_left_as_is(tmp_path, models):
    base, fts = models
    cfg = _config(tmp_path, base, fts)
    target = tmp_path / "result.bin"
    target.write_bytes(b"data")
    with pytest.raises(OutputPathError, match="existing file"):
        _handler(["merge", str(cfg), "--out", str(target), "--overwrite", "--no-progress"])
    assert target.read_bytes() == b"data"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden .old copy


def test_out_dot_is_refused_before_any_work(tmp_path, models, monkeypatch):
    base, fts = models
    cfg = _config(tmp_path, base, fts)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    opened = []
    monkeypatch.setattr("layerwise.editing.config.plan_merge", lambda *a, **k: opened.append(1))
    for out in (".", str(work), ".."):
        with pytest.raises(OutputPathError, match="current directory"):
            _handler(["merge", str(cfg), "--out", out, "--overwrite", "--no-progress"])
    assert opened == [] and list(work.iterdir()) == []


def test_overwrite_replaces_only_an_unchanged_earlier_output(tmp_path, models):
    base, fts = models
    cfg1 = _config(tmp_path, base, fts, "one.yaml")
    cfg2 = _config(tmp_path, base, fts, "two.yaml", scale=0.5)
    out = tmp_path / "merged"
    assert _handler(["merge", str(cfg1), "--out", str(out), "--no-progress"]) == 0
    first = load_state_dict(out)
    with pytest.raises(OutputPathError, match="--overwrite"):  # non-empty: needs --overwrite
        _handler(["merge", str(cfg2), "--out", str(out), "--no-progress"])
    assert _handler(["merge", str(cfg2), "--out", str(out), "--no-progress", "--overwrite"]) == 0
    second = load_state_dict(out)
    b = _sd(0)
    for k in b:  # scale 0.5 halves the merged task vector: the folder really was replaced
        torch.testing.assert_close(second[k] - b[k], 0.5 * (first[k] - b[k]), atol=1e-6, rtol=0)
    (out / "my_eval.csv").write_text("acc\n0.9\n")  # the user adds a file: never deleted afterwards
    with pytest.raises(OutputPathError, match="my_eval.csv"):
        _handler(["merge", str(cfg1), "--out", str(out), "--no-progress", "--overwrite"])
    assert (out / "my_eval.csv").read_text() == "acc\n0.9\n"
    (out / "my_eval.csv").unlink()
    (out / "layerwise_merge.json").write_text("{}")  # a file layerwise wrote, changed since: refused too
    with pytest.raises(OutputPathError, match="layerwise_merge.json"):
        _handler(["merge", str(cfg1), "--out", str(out), "--no-progress", "--overwrite"])
    assert [p.name for p in tmp_path.iterdir() if is_temporary_name(p.name)] == []


def test_check_output_dir_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_dir("new", overwrite=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_output_dir("empty", overwrite=False) == tmp_path / "empty"
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "report.html").write_text("x")
    # a collection folder (reproduce): existing content is fine, each subfolder is replaced on its own
    assert check_output_dir("results", overwrite=False, collection=True) == tmp_path / "results"
    with pytest.raises(OutputPathError, match="not empty"):
        check_output_dir("results", overwrite=False)
    with pytest.raises(OutputPathError, match="did not create"):
        check_output_dir("results", overwrite=True)
    os.symlink(tmp_path / "empty", tmp_path / "link")
    with pytest.raises(OutputPathError, match="symbolic link"):
        check_output_dir("link", overwrite=True)
    (tmp_path / "data.pt").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="exists"):
        check_output_file("data.pt", overwrite=False)
    assert check_output_file("data.pt", overwrite=True) == tmp_path / "data.pt"
    with pytest.raises(OutputPathError, match="input"):
        check_output_file("data.pt", overwrite=True, inputs=["data.pt"])
    with pytest.raises(OutputPathError, match="folder"):
        check_output_file("results", overwrite=True)
    with pytest.raises(OutputPathError, match="is a file"):
        check_output_dir("data.pt/sub/out", overwrite=True)
    # inputs given as hub ids (no such path here) are skipped
    assert check_output_dir("org", overwrite=False, inputs=["org/model"]) == tmp_path / "org"


# -- leftovers of a killed run ------------------------------------------------------------------------------
def test_leftovers_of_a_killed_run_are_cleaned_by_the_next_run(tmp_path):
    target = tmp_path / "exp"
    with atomic_directory(target) as tmp:
        (tmp / "summary.json").write_text('{"run": 1}')
    script = textwrap.dedent(
        f"""
        import sys, time
        from layerwise._io import atomic_directory
        with atomic_directory({str(target)!r}) as tmp:
            (tmp / "partial.json").write_text("half")
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p.name for p in tmp_path.iterdir() if is_temporary_name(p.name)]
    assert len(left) == 1 and left[0].endswith(".tmp")  # what SIGKILL leaves
    assert json.loads((target / "summary.json").read_text()) == {"run": 1}
    # a run killed between its two renames leaves the previous output set aside as .old and no target
    os.replace(target, tmp_path / ".exp.abcd1234.old")
    foreign = tmp_path / ".exp.zzzz9999.tmp"  # same naming, but not ours (no marker): never touched
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with atomic_directory(target) as tmp:  # the next run (reproduce re-run) replaces its own output
        (tmp / "summary.json").write_text('{"run": 2}')
    assert json.loads((target / "summary.json").read_text()) == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".exp.zzzz9999.tmp", "exp"]
    assert (foreign / "keep.txt").read_text() == "x"


def test_restores_set_aside_output_when_target_is_missing(tmp_path):
    target = tmp_path / "exp"
    with atomic_directory(target) as tmp:
        (tmp / "a.json").write_text("1")
    os.replace(target, tmp_path / ".exp.abcd1234.old")
    with pytest.raises(KeyboardInterrupt):  # the next run is interrupted too: the old output is back
        with atomic_directory(target):
            raise KeyboardInterrupt
    assert (target / "a.json").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_run_experiment_rerun_replaces_its_own_folder(tmp_path):
    from layerwise.experiments import EXPERIMENTS, Experiment, run_experiment

    calls = []

    def run(config, out):
        calls.append(config)
        (out / "numbers.json").write_text(json.dumps(len(calls)))
        return {"n": len(calls)}

    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        x: int = 1

    EXPERIMENTS.register("hardening-probe", Experiment("hardening-probe", run, {"quick": Cfg()}, "probe"))
    try:
        assert run_experiment("hardening-probe", tmp_path)["n"] == 1
        assert run_experiment("hardening-probe", tmp_path)["n"] == 2  # the re-run replaces it
        assert (tmp_path / "hardening-probe" / "numbers.json").read_text() == "2"
        (tmp_path / "hardening-probe" / "mine.txt").write_text("user")
        with pytest.raises(OutputPathError, match="mine.txt"):
            run_experiment("hardening-probe", tmp_path)
        assert len(calls) == 2  # refused before the experiment ran
    finally:
        EXPERIMENTS.unregister("hardening-probe")


# -- 2. exit 0 with garbage ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"models_params": {"weight": float("inf")}}, "weight"),
        ({"models_params": {"weight": 1.0e39}}, "weight"),
        ({"scale": 1.0e308}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"parameters": {"weight": 10**400}}, "weight"),
    ],
)
def test_non_finite_or_overflowing_parameters_are_refused_by_dry_run(tmp_path, models, extra, needle):
    base, fts = models
    extra = dict(extra)
    if "models_params" in extra:
        mp = extra.pop("models_params")
        data = {"method": "task_arithmetic", "base_model": str(base)}
        data["models"] = [{"model": str(fts[0]), "parameters": mp}, str(fts[1])]
        data.update(extra)
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(data))
    else:
        cfg = _config(tmp_path, base, fts, **extra)
    for flags in (["--dry-run"], ["--out", str(tmp_path / "o")]):
        with pytest.raises(ConfigError, match=needle):
            _handler(["merge", str(cfg), "--no-progress", *flags])
    assert not (tmp_path / "o").exists()


def test_list_methods_shows_no_infinite_range(capsys):
    assert main(["merge", "--list-methods"]) == 0
    text = capsys.readouterr().out
    assert "inf" not in text
    assert "weight (per model, a finite number, default 1.0)" in text


def test_non_finite_merged_tensor_is_refused_and_nothing_written(tmp_path, models):
    base, fts = models
    # weight 1e5 is a fine float32, but the merged weights overflow float16 (max 65504)
    data = {
        "method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 1.0e5}} for f in fts],
        "dtype": "float16",
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ParameterError, match="merged tensor 'blocks.0.w'.*inf/NaN.*float16"):
        _handler(["merge", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"])
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if is_temporary_name(p.name)]
    # the same weights in float32 are finite and merge fine
    data["dtype"] = "float32"
    cfg.write_text(yaml.safe_dump(data))
    assert _handler(["merge", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 0


def test_normalize_zero_is_not_a_bool(tmp_path, models):
    base, fts = models
    for bad in (0, 1, 0.0, "false"):
        cfg = _config(tmp_path, base, fts, method="ties", parameters={"normalize": bad})
        with pytest.raises(ConfigError, match=r"normalize must be one of \[True, False\]"):
            load_merge_config(cfg)
    cfg = _config(tmp_path, base, fts, method="ties", parameters={"normalize": False})
    assert load_merge_config(cfg).parameters["normalize"] is False


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_config_json_states_the_written_dtype(tmp_path, models, dtype):
    base, fts = models
    cfg = _config(tmp_path, base, fts, dtype=dtype)
    out = tmp_path / "o"
    assert _handler(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == dtype and written["text_config"]["torch_dtype"] == dtype
    assert written["model_type"] == "toy"
    assert json.loads((base / "config.json").read_text())["torch_dtype"] == "float32"  # input untouched
    with open_checkpoint(out) as ck:
        assert {ck.dtype(k) for k in ck.keys()} == {getattr(torch, dtype)}


def test_bfloat16_merge_loads_as_bfloat16_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=8, n_layer=2, n_head=2, n_positions=8)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "ft")
    conf = _config(tmp_path, tmp_path / "base", [tmp_path / "ft"], dtype="bfloat16")
    assert _handler(["merge", str(conf), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o", torch_dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


# -- 3. safetensors reader -----------------------------------------------------------------------------------
def _rewrite_header(src, dst, edit):
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


@pytest.mark.parametrize(
    "edit,needle",
    [
        (
            lambda h: h["head.b"].update(
                data_offsets=h["blocks.0.w"]["data_offsets"][:1] + [h["blocks.0.w"]["data_offsets"][0] + 8]
            ),
            "overlaps",
        ),
        (lambda h: h["head.b"].pop("dtype"), "exactly dtype, shape and data_offsets"),
        (lambda h: h["head.b"].pop("data_offsets"), "exactly dtype, shape and data_offsets"),
        (lambda h: h["head.b"].update(dtype="F17"), "unsupported dtype 'F17'"),
        (lambda h: h["head.b"].update(shape=[3]), "needs 12 bytes but data_offsets"),
        (lambda h: h["head.b"].update(shape=[-2]), "non-negative"),
        (lambda h: h["head.b"].update(data_offsets=[10**12, 10**12 + 8]), "gap|data section"),
        (lambda h: h.update(__metadata__={"format": 3}), "__metadata__"),
    ],
)
def test_broken_safetensors_headers_are_refused_at_open(tmp_path, models, edit, needle):
    base, fts = models
    bad = tmp_path / "bad.safetensors"
    _rewrite_header(fts[0] / "model.safetensors", bad, edit)
    with pytest.raises(CheckpointError, match=f"bad.safetensors.*({needle})"):
        open_checkpoint(bad)
    cfg = _config(tmp_path, base, [bad, fts[1]])
    with pytest.raises(CheckpointError, match="bad.safetensors"):  # --dry-run catches it
        _handler(["merge", str(cfg), "--dry-run"])


def test_overlapping_offsets_no_longer_read_another_tensors_bytes(tmp_path):
    # before the fix, "b" silently read the first two floats of "a"
    sd = {"a": torch.arange(4.0), "b": torch.tensor([9.0, 9.0])}
    path = save_checkpoint(sd, tmp_path / "m") / "model.safetensors"
    _rewrite_header(path, tmp_path / "evil.safetensors", lambda h: h["b"].update(data_offsets=[0, 8]))
    with pytest.raises(CheckpointError, match="tensor '[ab]'.*overlaps the previous tensor"):
        open_checkpoint(tmp_path / "evil.safetensors")


def test_truncated_data_section_fails_dry_run(tmp_path, models):
    base, fts = models
    data = (fts[0] / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    cfg = _config(tmp_path, base, [tmp_path / "cut.safetensors"])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        _handler(["merge", str(cfg), "--dry-run"])


def test_index_json_without_weight_map(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 8}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        open_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../../etc/passwd"}}')
    with pytest.raises(CheckpointError, match="file name in the index's folder"):
        open_checkpoint(folder)


@pytest.mark.filterwarnings("ignore")
def test_truncated_and_garbage_torch_files_raise_checkpoint_error(tmp_path):
    sd = _sd(3)
    torch.save(sd, tmp_path / "full.pt")
    raw = (tmp_path / "full.pt").read_bytes()
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.bin").read_bytes()
    cases = {
        "half.pt": raw[: len(raw) // 2],
        "header_only.pt": raw[:40],
        "legacy_cut.bin": legacy[: len(legacy) // 2],
        "garbage.bin": bytes(range(256)) * 4,
        "empty.pt": b"",
        "list.pt": None,
    }
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            open_checkpoint(tmp_path / name)
    # a sharded torch index: a truncated shard is found when the checkpoint is opened (--dry-run)
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:2]}, tmp_path / "pytorch_model-1.bin")
    (tmp_path / "pytorch_model-2.bin").write_bytes(raw[:100])
    wm = {k: "pytorch_model-1.bin" if i < 2 else "pytorch_model-2.bin" for i, k in enumerate(keys)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="pytorch_model-2.bin"):
        open_checkpoint(tmp_path / "pytorch_model.bin.index.json")


# -- 4. --dry-run validates what the merge validates; config errors are ConfigError -------------------------
@pytest.mark.parametrize("target", [2, -1, 0.5, 7])
def test_tall_masks_invalid_target_fails_dry_run(tmp_path, models, target):
    base, fts = models
    cfg = _config(tmp_path, base, fts, method="tall_masks", parameters={"target": target})
    with pytest.raises(
        ConfigError, match=r"parameters.target must be (a model index.*\[0, 1\]|a finite number >= 0)"
    ):
        _handler(["merge", str(cfg), "--dry-run"])
    cfg = _config(tmp_path, base, fts, method="tall_masks", parameters={"target": 1})
    assert _handler(["merge", str(cfg), "--dry-run"]) == 0


def test_average_weights_summing_to_zero_fail_dry_run(tmp_path, models):
    base, fts = models
    data = {
        "method": "average",
        "models": [
            {"model": str(fts[0]), "parameters": {"weight": 1.0}},
            {"model": str(fts[1]), "parameters": {"weight": -1.0}},
        ],
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="sum to 0"):
        _handler(["merge", str(cfg), "--dry-run"])


def test_deeply_nested_yaml_is_a_config_error(tmp_path):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text("method: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml"):
        load_merge_config(cfg)
    # values the YAML constructors refuse with ValueError (not YAMLError)
    for text in ("seed: " + "9" * 5000, "seed: 2001-13-45"):
        cfg.write_text(text)
        with pytest.raises(ConfigError, match="deep.yaml: not valid YAML"):
            load_merge_config(cfg)


def test_aliased_yaml_bomb_gives_a_short_error(tmp_path):
    nested = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    nested += [f"&a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    cfg = tmp_path / "bomb.yaml"
    # models[0] holds a11, which stands for 10 * 5**11 ~ 5e8 strings (built as shared references)
    cfg.write_text("method: ties\nbase_model: b\nmodels: [[" + ", ".join(nested) + "]]\n")
    with pytest.raises(ConfigError, match=r"models\[0\] must be a path") as err:
        load_merge_config(cfg, check_files=False)
    assert len(str(err.value)) < 500


@pytest.mark.parametrize(
    "extra,key",
    [
        ({"dtype": ["bfloat16"]}, "dtype"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"shard_size": "1e999GB"}, "shard_size"),
        ({"shard_size": "infGB"}, "shard_size"),
        ({"chunk_elements": 0}, "chunk_elements"),
        ({"parameters": [1, 2]}, "parameters"),
        ({"parameters": {"weight": [1, "2"]}}, r"parameters.weight\[1\]"),  # lists: per-layer gradients
        ({"parameters": {"weight": True}}, "parameters.weight"),
        ({"parameters": {1: 2, "a": 3}}, "unknown parameter"),
        ({"lines": {"alpha": float("inf")}}, "lines.alpha"),
        ({"lines": {"alpha": 0.1, "beta": [0]}}, "lines.beta"),
        ({"lines": {"alpha": 0.1, "pattern": "(x"}}, "pattern"),
        ({"lines": 0}, "lines"),
        ({"check_dtypes": 1}, "check_dtypes"),
        ({"scale": "2"}, "scale"),
        ({"method": ["ties"]}, "method"),
        ({"models": [{"model": "a\0b"}]}, r"models\[0\].model"),
        ({"models": [{"model": "x", "parameters": 0}]}, r"models\[0\].parameters"),
    ],
)
def test_every_config_error_is_a_config_error_naming_the_key(tmp_path, models, extra, key):
    base, fts = models
    cfg = _config(tmp_path, base, fts, **extra)
    with pytest.raises(ConfigError, match=key):
        _handler(["merge", str(cfg), "--dry-run"])
