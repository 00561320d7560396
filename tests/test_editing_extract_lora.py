"""LoRA extraction (``layerwise extract-lora``): truncated SVD per layer, checked against an SVD written in
the test and against peft loading the adapter (extra ``lora``)."""

from __future__ import annotations

import json

import pytest
import torch

from layerwise.cli import main
from layerwise.editing import open_checkpoint
from layerwise.editing.extract_lora import extract_lora, lora_targets
from layerwise.errors import LayerwiseError, ParameterError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny_config():
    return transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # k/v projections (8, 16): rank 8 at most
        vocab_size=40,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny Llama base and a fine-tune of it that changed every tensor (norms included)."""
    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_tiny_config())
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    base.save_pretrained(root / "ft")
    return root


def _weights(folder):
    with open_checkpoint(folder) as ck:
        return ck.to_dict()


def _merged(base_folder, adapter):
    model = transformers.LlamaForCausalLM.from_pretrained(base_folder)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _truncated(delta: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation (Eckart-Young), in float64."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_rank_r_adapter_loads_in_peft_and_equals_the_truncated_svd(pair, tmp_path):
    base, ft = _weights(pair / "base"), _weights(pair / "ft")
    res = extract_lora(pair / "base", pair / "ft", rank=3, out=tmp_path / "lora")
    merged = _merged(pair / "base", tmp_path / "lora")
    targets = [k for k in base if ".layers." in k and base[k].ndim == 2]
    assert sorted(r["key"] for r in res.layers) == sorted(targets)
    for k in targets:
        delta = ft[k] - base[k]
        ref = base[k].double() + _truncated(delta, 3)
        torch.testing.assert_close(merged[k].double(), ref, atol=2e-6, rtol=0)
        rec = next(r for r in res.layers if r["key"] == k)
        direct = float((delta.double() - _truncated(delta, 3)).norm() / delta.double().norm())
        assert rec["rel_error"] == pytest.approx(direct, rel=1e-5)
        assert rec["rank"] == 3
    # everything outside the adapter is the base's; the changed norms and embeddings are reported
    for k in base:
        if k not in targets:
            torch.testing.assert_close(merged[k], base[k], atol=0, rtol=0)
    missed = {r["key"] for r in res.not_captured}
    assert "model.embed_tokens.weight" in missed and "model.norm.weight" in missed
    assert not missed & set(targets)
    report = json.loads((tmp_path / "lora" / "extraction.json").read_text())
    assert [r["rel_error"] for r in report["layers"]] == [r["rel_error"] for r in res.layers]
    rows = (tmp_path / "lora" / "extraction.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(targets)


def test_full_rank_with_embeddings_reproduces_the_finetune(pair, tmp_path):
    base, ft = _weights(pair / "base"), _weights(pair / "ft")
    res = extract_lora(pair / "base", pair / "ft", rank=64, out=tmp_path / "full", embeddings=True)
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 8
    with open_checkpoint(tmp_path / "full" / "adapter_model.safetensors") as ad:
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in ad.keys()
        assert ad.shape("base_model.model.model.embed_tokens.lora_embedding_A") == (16, 40)
    merged = _merged(pair / "base", tmp_path / "full")
    for k in base:
        if base[k].ndim == 2:
            torch.testing.assert_close(merged[k], ft[k], atol=2e-6, rtol=0)
    assert all(r["rel_error"] < 1e-6 for r in res.layers)
    # layerwise reads the adapter back as a merge input (base + adapter) with the same result
    from layerwise.editing import merge_models

    ours = merge_models("task_arithmetic", [tmp_path / "full"], pair / "base").tensors
    for k in base:
        if base[k].ndim == 2:
            torch.testing.assert_close(ours[k], ft[k], atol=2e-6, rtol=0)
    assert {r["key"] for r in res.not_captured} == {k for k in base if base[k].ndim == 1}


def test_exact_low_rank_update_is_recovered_and_dtype_option(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.w.weight": torch.randn(12, 10, generator=g) for i in range(2)}
    ft = {k: v + torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g) for k, v in base.items()}
    res = extract_lora(base, ft, rank=2)
    for k in base:
        a = res.tensors[f"base_model.model.{k[:-7]}.lora_A.weight"]
        b = res.tensors[f"base_model.model.{k[:-7]}.lora_B.weight"]
        torch.testing.assert_close(b @ a, ft[k] - base[k], atol=1e-5, rtol=0)
    assert all(r["rel_error"] < 1e-5 for r in res.layers)
    half = extract_lora(base, ft, rank=1, dtype="bfloat16")
    assert {t.dtype for t in half.tensors.values()} == {torch.bfloat16}
    assert all(r["rel_error"] > 0.1 for r in half.layers)  # rank 1 of a rank-2 update


def test_pattern_option_and_embedding_selection():
    shapes = {"features.0.fc.weight": (4, 4), "features.1.fc.weight": (4, 4), "head.weight": (3, 4)}
    with pytest.raises(ParameterError, match="residual blocks"):
        lora_targets(shapes)
    assert sorted(lora_targets(shapes, pattern=r"^features\.(\d+)\.")) == [
        "features.0.fc.weight",
        "features.1.fc.weight",
    ]
    llama = {
        "model.embed_tokens.weight": (40, 8),
        "model.layers.0.q.weight": (8, 8),
        "lm_head.weight": (40, 8),
    }
    assert lora_targets(llama) == {"model.layers.0.q.weight": "linear"}
    assert lora_targets(llama, embeddings=True) == {
        "model.embed_tokens.weight": "embedding",
        "model.layers.0.q.weight": "linear",
        "lm_head.weight": "linear",
    }


def test_bad_inputs_raise_layerwise_errors(tmp_path):
    base = {"layers.0.w.weight": torch.zeros(3, 3)}
    for kwargs in ({"rank": 0}, {"rank": 1.5}, {"rank": 2, "dtype": "int8"}, {"rank": 2, "device": "nope"}):
        with pytest.raises(LayerwiseError):
            extract_lora(base, base, **kwargs)
    with pytest.raises(LayerwiseError, match="inf/NaN"):
        extract_lora(
            base, {"layers.0.w.weight": torch.full((3, 3), float("nan"))}, rank=1, out=tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(LayerwiseError):
        extract_lora(base, {"layers.0.w.weight": torch.zeros(3, 4)}, rank=1)


def test_cli_writes_the_adapter_and_refuses_to_overwrite(pair, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["extract-lora", str(pair / "base"), str(pair / "ft"), "--rank", "2", "--out", str(out)]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    assert "relative Frobenius error" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert main([*argv, "--no-progress"]) == 2  # exists, no --overwrite
    assert main([*argv, "--no-progress", "--overwrite", "--embeddings"]) == 0
    with open_checkpoint(out / "adapter_model.safetensors") as ad:
        assert any("lora_embedding_A" in k for k in ad.keys())
    bad = ["extract-lora", str(pair / "base"), str(pair / "ft"), "--rank", "0", "--out", str(tmp_path / "b")]
    assert main(bad) == 2
    assert "rank" in capsys.readouterr().err
    assert main([*bad[:4], "2", "--out", str(tmp_path / "c"), "--device", "nonsense"]) == 2
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
