"""``layerwise merge``: YAML validation errors, --dry-run, and an end-to-end merge of Hugging Face folders
whose output transformers loads back."""

from __future__ import annotations

import gc

import pytest
import torch
import yaml

from layerwise.cli import main
from layerwise.editing.config import load_merge_config, parse_merge_config
from layerwise.editing.lines import lines_scales

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory):
    """A tiny GPT-2 'pre-trained' folder and two 'fine-tuned' ones (random perturbations)."""
    root = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    base.save_pretrained(root / "base")
    for i in range(2):
        ft = transformers.GPT2LMHeadModel(cfg)
        sd = {k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in base.state_dict().items()}
        ft.load_state_dict(sd)
        ft.save_pretrained(root / f"ft{i}", max_shard_size="40KB")  # sharded, with an index
    return root


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_end_to_end_merge_loads_in_transformers(gpt2_folders, tmp_path, capsys):
    cfg = _write(
        gpt2_folders / "ta.yaml",
        {
            "method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "ft0", "parameters": {"weight": 0.7}}, "ft1"],
            "lines": {"alpha": 0.3, "beta": 0.6},
            "shard_size": "30KB",
        },
    )
    out = tmp_path / "merged"
    assert main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert gc.get_freeze_count() == 0  # the command froze the collector while merging, not the host after
    printed = capsys.readouterr().out
    assert "transformer.h." in printed and "merged model written" in printed
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    merged = transformers.GPT2LMHeadModel.from_pretrained(out).state_dict()
    base = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folders / "base").state_dict()
    fts = [
        transformers.GPT2LMHeadModel.from_pretrained(gpt2_folders / f"ft{i}").state_dict() for i in range(2)
    ]
    scales = lines_scales([k for k in base if base[k].is_floating_point()], 0.3, 0.6)
    assert scales["transformer.h.2.mlp.c_fc.weight"] == pytest.approx(0.9)
    for k in base:
        if not base[k].is_floating_point():
            continue
        expected = base[k] + scales[k] * (0.7 * (fts[0][k] - base[k]) + (fts[1][k] - base[k]))
        torch.testing.assert_close(merged[k], expected, atol=1e-6, rtol=0, msg=k)


def test_dry_run_prints_plan_and_writes_nothing(gpt2_folders, tmp_path, capsys):
    cfg = _write(
        gpt2_folders / "ties.yaml",
        {
            "method": "ties",
            "base_model": "base",
            "models": ["ft0", "ft1"],
            "parameters": {"density": 0.3, "topk": "global"},
            "lines": {"alpha": "auto", "beta": 0.5},
            "dtype": "bfloat16",
        },
    )
    out = tmp_path / "never"
    assert main(["merge", str(cfg), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    # n_layer=3: the table's last row is block 2 of 0..2
    for needle in ("method: ties", "model 1:", "density", "global", "bfloat16", "LiNeS: alpha auto", "2/2"):
        assert needle in text, needle
    assert not out.exists()


def test_list_methods(capsys):
    assert main(["merge", "--list-methods"]) == 0
    text = capsys.readouterr().out
    assert "ties" in text and "density (per model" in text and "arxiv" in text


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"method": "tiez", "base_model": "b", "models": ["a"]},
            "method must be one of .*'task_arithmetic'.*got 'tiez'",
        ),
        ({"base_model": "b", "models": ["a"]}, "'method' is required"),
        ({"method": "ties", "base_model": "b", "models": []}, "models must be a non-empty list"),
        ({"method": "ties", "models": ["a"]}, "base_model is required"),
        (
            {"method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 2}}]},
            r"models\[0\].parameters.density must be in \[0.0, 1.0\], got 2.0",
        ),
        (
            {
                "method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"topk": "global"}}],
            },
            r"not per-model \['topk'\]",
        ),
        ({"method": "ties", "base_model": "b", "models": ["a"], "dtype": "float8"}, "dtype must be one of"),
        ({"method": "ties", "base_model": "b", "models": ["a"], "shard_size": "lots"}, "shard_size"),
        ({"method": "ties", "base_model": "b", "models": ["a"], "lines": {"alpha": "auto"}}, "needs beta"),
        (
            {"method": "ties", "base_model": "b", "models": ["a"], "lines": {"alpha": 0.1, "pattern": "("}},
            "regular expression",
        ),
        (
            {"method": "ties", "base_model": "b", "models": ["a"], "merge_method": "x"},
            r"unknown key\(s\) \['merge_method'\]",
        ),
        (
            {"method": "ties", "base_model": "b", "models": [{"path": "a"}]},
            r"models\[0\] must be a path or a mapping",
        ),
    ],
)
def test_config_errors_are_readable(data, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_merge_config(data, check_files=False)


def test_missing_files_are_named(tmp_path, gpt2_folders, capsys):
    cfg = _write(
        tmp_path / "c.yaml",
        {"method": "ties", "base_model": str(gpt2_folders / "base"), "models": ["missing_ft"]},
    )
    with pytest.raises(FileNotFoundError, match=r"c.yaml: models\[0\].model: not found: .*missing_ft"):
        load_merge_config(cfg)
    assert main(["merge", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("method: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_merge_config(tmp_path / "bad.yaml")
