"""``tokenizer_source: union``: the output vocabulary is the union of the models' tokenizers and every model's
embedding / output rows are looked up by token string, missing rows filled by mergekit's rules. Checked
against a reference written here with plain dictionaries (tiny word-level tokenizers built by the test)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from layerwise.cli import main
from layerwise.editing import load_state_dict, merge_models
from layerwise.errors import LayerwiseError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# token lists by id; added (special) tokens last
VOCABS = {
    "base": (["<unk>", "a", "b", "c", "d"], []),
    "ft0": (["<unk>", "a", "b", "c", "d", "e"], ["<pad>"]),  # a new word and a pad token
    "ft1": (["<unk>", "a", "c", "b", "f", "e"], []),  # b/c swapped, no "d", new "f", "e" too
}
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def _tokenizer(words, added):
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    if added:
        fast.add_special_tokens({"pad_token": added[0]})
    return fast


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("union")
    torch.manual_seed(0)
    for i, (name, (words, added)) in enumerate(VOCABS.items()):
        cfg = transformers.LlamaConfig(
            vocab_size=len(words) + len(added),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        torch.manual_seed(100 + i)
        transformers.LlamaForCausalLM(cfg).save_pretrained(root / name)
        _tokenizer(words, added).save_pretrained(root / name)
    return root


def _reference(root, weights):
    """Union vocabulary and task-arithmetic merge of the vocabulary tensors, by mergekit's rules."""
    names = list(VOCABS)  # base first
    union = list(VOCABS["base"][0])
    for name in names:  # ordinary tokens, model by model, by id
        union += [w for w in VOCABS[name][0] if w not in union]
    for name in names:  # then the added tokens
        union += [w for w in VOCABS[name][1] if w not in union]
    ids = {name: {w: i for i, w in enumerate(VOCABS[name][0] + VOCABS[name][1])} for name in names}
    sds = {name: load_state_dict(root / name) for name in names}
    merged = {}
    for key in VOCAB_KEYS:
        rows = {}
        for name in names:
            out = []
            for w in union:
                have = [m for m in names if w in ids[m]]
                if w in ids[name]:
                    out.append(sds[name][key][ids[name][w]])
                elif len(have) == 1:
                    out.append(sds[have[0]][key][ids[have[0]][w]])
                elif "base" in have:
                    out.append(sds["base"][key][ids["base"][w]])
                else:
                    acc = torch.zeros(sds[name][key].shape[1])
                    for m in have:
                        acc = acc + sds[m][key][ids[m][w]]
                    out.append(acc / len(have))
            rows[name] = torch.stack(out)
        merged[key] = rows["base"] + sum(
            w * (rows[n] - rows["base"]) for n, w in zip(names[1:], weights, strict=True)
        )
    return union, merged, sds


def test_union_merge_matches_the_reference_and_writes_the_union_tokenizer(models, tmp_path):
    weights = [1.0, 0.5]
    union, ref, sds = _reference(models, weights)
    assert union == ["<unk>", "a", "b", "c", "d", "e", "f", "<pad>"]  # the rule above, spelled out
    out = tmp_path / "merged"
    merge_models(
        "task_arithmetic",
        [models / "ft0", models / "ft1"],
        models / "base",
        model_params=[{"weight": w} for w in weights],
        tokenizer_source="union",
        out=out,
    )
    got = load_state_dict(out)
    for key in VOCAB_KEYS:
        assert got[key].shape == (8, 8)
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=0)
    key = "model.layers.1.mlp.up_proj.weight"  # other tensors: plain task arithmetic
    expected = sds["base"][key] + sum(
        w * (sds[n][key] - sds["base"][key]) for n, w in zip(["ft0", "ft1"], weights, strict=True)
    )
    torch.testing.assert_close(got[key], expected, atol=1e-6, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == {w: i for i, w in enumerate(union)}
    assert tok("a f e d <pad>")["input_ids"] == [1, 6, 5, 4, 7]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 8
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (8, 8)


def test_union_from_a_mergekit_config_on_the_command_line(models, tmp_path, capsys):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(models / "base"),
        "models": [{"model": str(models / n), "parameters": {"weight": 1.0}} for n in ("ft0", "ft1")],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    path = tmp_path / "union.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path), "--dry-run"]) == 0
    assert "union vocabulary: 8 tokens (base 5, models [7, 6])" in capsys.readouterr().out
    assert main(["merge", str(path), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    _, ref, _ = _reference(models, [1.0, 1.0])
    got = load_state_dict(tmp_path / "cli")
    for key in VOCAB_KEYS:
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=0)
    # the same config with tokenizer_source: base keeps the base's 5 rows
    cfg["tokenizer_source"] = "base"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.warns(UserWarning):
        assert main(["merge", str(path), "--out", str(tmp_path / "base"), "--no-progress"]) == 0
    assert load_state_dict(tmp_path / "base")["lm_head.weight"].shape == (5, 8)


def test_union_needs_folders_with_tokenizers(models):
    sd = load_state_dict(models / "base")
    with pytest.raises(LayerwiseError, match="union"):
        merge_models("task_arithmetic", [sd], sd, tokenizer_source="union")
    with pytest.raises(LayerwiseError, match="tokenizer_source"):
        merge_models("task_arithmetic", [models / "ft0"], models / "base", tokenizer_source="both")
