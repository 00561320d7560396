"""Slices (mergekit's ``slices`` with ``layer_range``): passthrough frankenmerges from several models with
repeated and renumbered layers, per-slice merges with per-slice gradients, and range validation, on tiny
Llama-shaped safetensors checkpoints against references assembled here tensor by tensor."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import yaml

from layerwise.cli import main
from layerwise.editing.checkpoints import load_state_dict
from layerwise.editing.config import load_merge_config
from layerwise.editing.merge import merge_models
from layerwise.editing.merge.gradients import interpolate
from layerwise.errors import ConfigError

transformers = pytest.importorskip("transformers")

N = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=N,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        transformers.LlamaForCausalLM(cfg).save_pretrained(root / name)
    return root


def _layer_keys(sd, i):
    return {k for k in sd if k.startswith(f"model.layers.{i}.")}


def _frankenmerge_reference(sds, plan):
    """The output state dict of a passthrough slices merge: ``plan`` = [(model, start, end), ...]."""
    out = {}
    first, last = sds[plan[0][0]], sds[plan[-1][0]]
    out["model.embed_tokens.weight"] = first["model.embed_tokens.weight"]
    j = 0
    for name, start, end in plan:
        for i in range(start, end):
            for k in _layer_keys(sds[name], i):
                out[k.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1)] = sds[name][k]
            j += 1
    out["model.norm.weight"] = last["model.norm.weight"]
    out["lm_head.weight"] = last["lm_head.weight"]
    return out, j


def test_passthrough_frankenmerge_repeats_and_renumbers_layers(models, tmp_path):
    plan = [("a", 0, 3), ("b", 1, 4), ("a", 2, 3), ("b", 0, 2)]
    cfg = {
        "slices": [{"sources": [{"model": str(models / m), "layer_range": [s, e]}]} for m, s, e in plan],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    (tmp_path / "f.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["merge", str(tmp_path / "f.yml"), "--out", str(out), "--no-progress"]) == 0
    sds = {m: load_state_dict(models / m) for m in ("a", "b")}
    ref, n_layers = _frankenmerge_reference(sds, plan)
    got = load_state_dict(out)
    assert n_layers == 3 + 3 + 1 + 2 and set(got) == set(ref)
    # the folder marker holds the true digest of each file (hashed while the slices were written)
    marker = json.loads((out / ".layerwise-output").read_text())["files"]
    for f in out.glob("*.safetensors"):
        assert marker[f.name]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    # the written config says 9 layers, and transformers loads the model with exactly these weights
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == n_layers
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == n_layers
    sd = model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    # the re-run config written next to the output gives the same model; --dry-run prints the slices
    again = tmp_path / "again"
    assert main(["merge", str(out / "layerwise_merge.yaml"), "--out", str(again), "--no-progress"]) == 0
    twice = load_state_dict(again)
    assert set(twice) == set(got) and all(torch.equal(twice[k], got[k]) for k in got)
    assert main(["merge", str(tmp_path / "f.yml"), "--dry-run"]) == 0


def test_scaled_passthrough_and_per_slice_parameters(models):
    from layerwise.editing.config import parse_merge_config

    cfg = parse_merge_config(
        {
            "method": "passthrough",
            "slices": [
                {"sources": [{"model": str(models / "a"), "layer_range": [0, 2]}]},
                {
                    "sources": [{"model": str(models / "a"), "layer_range": [1, 3]}],
                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                },
            ],
        }
    )
    from layerwise.editing.merge import execute_plan

    got = execute_plan(cfg.plan()).tensors
    a = load_state_dict(models / "a")
    for j, i in [(2, 1), (3, 2)]:
        for k in _layer_keys(a, i):
            factor = 0.5 if "o_proj" in k else 1.0
            out_k = k.replace(f"layers.{i}.", f"layers.{j}.", 1)
            torch.testing.assert_close(got[out_k], factor * a[k], atol=0, rtol=0)
    assert torch.equal(
        got["model.layers.1.self_attn.o_proj.weight"], a["model.layers.1.self_attn.o_proj.weight"]
    )


def _slerp(t, v0, v1):
    a, b = v0.double().ravel(), v1.double().ravel()
    dot = float(a @ b / (a.norm() * b.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    th = math.acos(dot)
    return (math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b).reshape(v0.shape)


def test_slerp_per_slice_with_offset_ranges_and_per_slice_gradients(models, tmp_path):
    """Two slices, each a SLERP of a (the base) and b over different ranges; t follows each slice."""
    cfg = {
        "slices": [
            {
                "sources": [
                    {"model": "a", "layer_range": [0, 3]},
                    {"model": "b", "layer_range": [1, 4]},
                ]
            },
            {
                "sources": [
                    {"model": "a", "layer_range": [2, 4]},
                    {"model": "b", "layer_range": [0, 2]},
                ],
                "parameters": {"t": 0.8},
            },
        ],
        "merge_method": "slerp",
        "base_model": "a",
        "parameters": {"t": [0.0, 1.0]},
        "dtype": "float32",
    }
    (models / "s.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "slerp"
    assert main(["merge", str(models / "s.yml"), "--out", str(out), "--no-progress"]) == 0
    got = load_state_dict(out)
    a, b = load_state_dict(models / "a"), load_state_dict(models / "b")
    # slice 0: output layer j = a's j with b's j + 1, t = j / 2 (gradient over the slice's 3 layers)
    for j in range(3):
        t = interpolate([0.0, 1.0], j, 3)
        for k in _layer_keys(a, j):
            kb = k.replace(f"layers.{j}.", f"layers.{j + 1}.", 1)
            torch.testing.assert_close(got[k].double(), _slerp(t, a[k], b[kb]), atol=3e-6, rtol=0)
    # slice 1: output layers 3, 4 = a's 2, 3 with b's 0, 1 at the slice's own t = 0.8
    for j, ia, ib in [(3, 2, 0), (4, 3, 1)]:
        for k in _layer_keys(a, ia):
            out_k = k.replace(f"layers.{ia}.", f"layers.{j}.", 1)
            kb = k.replace(f"layers.{ia}.", f"layers.{ib}.", 1)
            torch.testing.assert_close(got[out_k].double(), _slerp(0.8, a[k], b[kb]), atol=3e-6, rtol=0)
    # embeddings: the first slice's sources and parameters, the gradient's first value t = 0 (the base);
    # the final norm and head: the last slice's, t = 0.8 (mergekit reads them from the last slice)
    k = "model.embed_tokens.weight"
    torch.testing.assert_close(got[k], a[k], atol=1e-7, rtol=0)
    for k in ("model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(got[k].double(), _slerp(0.8, a[k], b[k]), atol=3e-6, rtol=0)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5


def test_single_full_slice_equals_the_models_form(models):
    """One slice over every layer is the same merge as listing the models."""
    full = {
        "method": "task_arithmetic",
        "base_model": str(models / "a"),
        "slices": [
            {
                "sources": [
                    {"model": str(models / "a"), "layer_range": [0, N]},
                    {"model": str(models / "b"), "layer_range": [0, N], "parameters": {"weight": 0.3}},
                ]
            }
        ],
        "parameters": {"lambda": 0.5},
    }
    from layerwise.editing.config import parse_merge_config
    from layerwise.editing.merge import execute_plan

    got = execute_plan(parse_merge_config(full).plan()).tensors
    ref = merge_models(
        "task_arithmetic",
        [models / "b"],
        models / "a",
        model_params=[{"weight": 0.3}],
        params={"lambda": 0.5},
    ).tensors
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize(
    "slices, match",
    [
        (
            [
                {"sources": [{"model": "a", "layer_range": [0, 2]}]},
                {"sources": [{"model": "b", "layer_range": [2, 5]}]},
            ],
            r"slices\[1\]\.sources\[0\]\.layer_range \[2, 5\]: .* has 4 layers",
        ),
        (
            [{"sources": [{"model": "a", "layer_range": [0, 40]}]}],
            r"slices\[0\]\.sources\[0\]\.layer_range \[0, 40\]",
        ),
        ([{"sources": [{"model": "a", "layer_range": [3, 3]}]}], r"slices\[0\]\.sources\[0\]\.layer_range"),
        (
            [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
            r"slices\[0\]: every source must span the same number of layers",
        ),
    ],
)
def test_layer_ranges_are_validated_with_one_line_errors(models, tmp_path, slices, match):
    method = "passthrough" if len(slices[0]["sources"]) == 1 else "linear"
    cfg = {"slices": slices, "merge_method": method}
    path = models / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=match) as err:
        load_merge_config(path).plan()
    assert "\n" not in str(err.value)
    # and the CLI turns it into one line, exit code 2, nothing written
    assert main(["merge", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert not (tmp_path / "o").exists()


def test_slices_need_the_base_among_the_sources(models):
    cfg = {
        "slices": [{"sources": [{"model": "b", "layer_range": [0, 2]}]}],
        "merge_method": "ties",
        "base_model": "a",
    }
    (models / "nobase.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"slices\[0\].*needs the base model among the slice's sources"):
        load_merge_config(models / "nobase.yml").plan()
