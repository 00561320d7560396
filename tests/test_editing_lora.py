"""LoRA adapters (PEFT folders) as merge inputs: the lazily formed ``scaling * B @ A`` equals peft's own
merge_and_unload, slices of any range, fan_in_fan_out / embedding / rsLoRA adapters, several adapters
merged with LiNeS from a YAML config, mergekit's BASE+ADAPTER syntax, and refusals."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml

from layerwise.cli import main
from layerwise.editing.checkpoints import load_state_dict
from layerwise.editing.lora import LoraCheckpoint, is_lora_adapter
from layerwise.errors import CheckpointError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _adapter(model, path, seed, **kw):
    """Save a LoRA adapter with random (non-zero) factors; return peft's merged state dict."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, **kw)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(path)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    merged = {
        "a": _adapter(model, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": _adapter(
            model,
            root / "b",
            2,
            r=2,
            lora_alpha=3,
            use_rslora=True,
            target_modules=["o_proj", "down_proj", "embed_tokens"],
        ),
    }
    return root, model.state_dict(), merged


def test_lora_checkpoint_equals_peft_merge(llama):
    root, base, merged = llama
    for name in ("a", "b"):
        assert is_lora_adapter(root / name)
        ck = LoraCheckpoint(root / "base", root / name)
        got = ck.to_dict()
        assert set(got) == set(base)
        changed = [k for k in base if not torch.equal(merged[name][k], base[k])]
        assert sorted(changed) == sorted(ck.adapted_keys) and changed
        for k in base:
            torch.testing.assert_close(got[k], merged[name][k], atol=1e-6, rtol=1e-6)
    assert any("embed_tokens" in k for k in LoraCheckpoint(root / "base", root / "b").adapted_keys)


def test_lora_slices_of_any_range(llama):
    root, base, merged = llama
    ck = LoraCheckpoint(root / "base", root / "a")
    k = "model.layers.1.self_attn.q_proj.weight"
    full = merged["a"][k].reshape(-1)
    for start, stop in [(0, 1), (5, 37), (15, 16), (17, 200), (0, full.numel()), (250, 256)]:
        torch.testing.assert_close(ck.read(k, start, stop), full[start:stop], atol=1e-6, rtol=1e-6)
        out = torch.empty(stop - start, dtype=torch.float64)
        ck.read_into(k, out, start)
        torch.testing.assert_close(out, full[start:stop].double(), atol=1e-6, rtol=1e-6)


def test_fan_in_fan_out_gpt2(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "base")
    ref = _adapter(
        model, tmp_path / "ad", 3, r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True
    )
    got = LoraCheckpoint(tmp_path / "base", tmp_path / "ad").to_dict()
    k = "transformer.h.1.attn.c_attn.weight"
    assert not torch.equal(ref[k], model.state_dict()[k])
    for k in ref:
        if k in got:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-6)


def test_merge_two_adapters_with_lines_from_yaml(llama, tmp_path):
    root, base, merged = llama
    cfg = {
        "method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "a"), "parameters": {"weight": 0.5}}, str(root / "b")],
        "lines": {"alpha": 0.4, "beta": 0.6},
    }
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["merge", str(tmp_path / "m.yml"), "--out", str(out), "--no-progress"]) == 0
    got = load_state_dict(out)
    for k in base:
        parts = k.split(".")
        lam = 0.4 + 0.6 * int(parts[2]) / 2 if parts[1] == "layers" else 0.4
        tau = 0.5 * (merged["a"][k] - base[k]) + (merged["b"][k] - base[k])
        torch.testing.assert_close(got[k].double(), (base[k] + lam * tau).double(), atol=2e-6, rtol=0)
    card = (out / "README.md").read_text()
    assert "LoRA adapter 0" in card and "https://arxiv.org/abs/2106.09685" in card
    info = json.loads((out / "layerwise_merge.json").read_text())
    assert info["lora_models"] == [str(root / "a"), str(root / "b")]


def test_mergekit_base_plus_adapter_syntax(llama, tmp_path):
    root, base, merged = llama
    mk = {
        "models": [{"model": f"{root / 'base'}+{root / 'a'}", "parameters": {"weight": 1.0}}],
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "dtype": "float32",
    }
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(mk))
    out = tmp_path / "mk"
    assert main(["merge", str(tmp_path / "mk.yml"), "--out", str(out), "--no-progress"]) == 0
    got = load_state_dict(out)
    for k in base:
        torch.testing.assert_close(got[k], merged["a"][k], atol=1e-6, rtol=1e-6)


def test_unsupported_adapters_are_refused(llama, tmp_path):
    root, base, merged = llama

    shutil.copytree(root / "a", tmp_path / "dora")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        LoraCheckpoint(root / "base", tmp_path / "dora")
    # an adapter for another model: its modules are not in the base
    other = {k.replace("model.layers", "model.blocks"): v for k, v in base.items()}
    with pytest.raises(CheckpointError, match="is the adapter for this base"):
        LoraCheckpoint(other, root / "a")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    with pytest.raises(CheckpointError, match="r must be a positive number"):
        LoraCheckpoint(root / "base", tmp_path / "cfg")


def test_rank_and_alpha_patterns_match_peft(llama, tmp_path):
    """Per-module rank_pattern / alpha_pattern override r / lora_alpha (scaling alpha / r per module)."""
    root, base, _ = llama
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    ref = _adapter(
        model,
        tmp_path / "pat",
        5,
        r=4,
        lora_alpha=8,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 32},
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    cfg = json.loads((tmp_path / "pat" / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] == {"v_proj": 32} and cfg["rank_pattern"] == {"q_proj": 2}
    got = LoraCheckpoint(root / "base", tmp_path / "pat").to_dict()
    for k in base:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-6, msg=k)
    # v_proj's delta is scaled by 32 / 4 = 8, not lora_alpha / r = 2: the pattern changes the weights
    k = "model.layers.0.self_attn.v_proj.weight"
    assert float((ref[k] - base[k]).abs().max()) > 1e-3


def test_saved_embedding_base_layer_replaces_the_base_embedding(llama, tmp_path):
    """An adapter on embeddings saves its (trained, possibly changed) base layer: it replaces the base's."""
    root, base, _ = llama
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    with torch.no_grad():  # the fine-tune changed the embedding itself (e.g. trained new token rows)
        model.model.embed_tokens.weight[:4] += 0.5
    ref = _adapter(model, tmp_path / "emb", 6, r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    from safetensors import safe_open

    with safe_open(tmp_path / "emb" / "adapter_model.safetensors", "pt") as f:
        assert any(k.endswith("embed_tokens.base_layer.weight") for k in f.keys())
    ck = LoraCheckpoint(root / "base", tmp_path / "emb")
    got = ck.to_dict()
    k = "model.embed_tokens.weight"
    for key in base:
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-6, msg=key)
        out = torch.empty(base[key].numel(), dtype=torch.float32)
        ck.read_into(key, out)
        torch.testing.assert_close(out, ref[key].reshape(-1), atol=1e-6, rtol=1e-6, msg=key)
    assert k in ck.adapted_keys


def test_base_plus_adapter_merge_reads_the_base_once(llama, monkeypatch, tmp_path):
    """The stream reads the base once for itself and for every adapter on it (``read_into_over``), with the
    same bits as reading it again inside each adapter; a base layer the adapter saved still replaces it."""
    import collections
    import math

    from layerwise.editing import merge_models, open_checkpoint

    root, base, merged = llama
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    with torch.no_grad():  # a changed embedding: the adapter saves its own base layer, which must be used
        model.model.embed_tokens.weight[:4] += 0.5
    emb = _adapter(model, tmp_path / "emb", 6, r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])

    def run(fast: bool):
        ck = open_checkpoint(root / "base")
        reads: collections.Counter = collections.Counter()
        plain = ck.read_into

        def counting(key, out, start=0):
            reads[key] += 1
            plain(key, out, start)

        ck.read_into = counting
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(LoraCheckpoint, "read_into_over", lambda self, k, o, s, *_: self.read_into(k, o, s))
            res = merge_models("task_arithmetic", [root / "a", tmp_path / "emb"], ck, chunk_elements=50)
        return res.tensors, reads

    fast, fast_reads = run(True)
    slow, slow_reads = run(False)
    for k in base:
        assert torch.equal(fast[k], slow[k]), k
        expected = base[k] + (merged["a"][k] - base[k]) + (emb[k] - base[k])
        torch.testing.assert_close(fast[k], expected, atol=1e-5, rtol=1e-5, msg=k)
        assert fast_reads[k] == math.ceil(base[k].numel() / 50), k  # one read per chunk: the stream's own
    assert sum(slow_reads.values()) > 1.9 * sum(fast_reads.values())
    assert not torch.equal(emb["model.embed_tokens.weight"][:4], base["model.embed_tokens.weight"][:4])
