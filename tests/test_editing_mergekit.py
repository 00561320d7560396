"""mergekit configs used unchanged (written as mergekit's documentation shows them), per-layer gradients
and filters end to end, vocabulary alignment (tokenizer_source: base), and the model card / re-run config
written into the output folder."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import yaml

from layerwise.cli import main
from layerwise.editing.checkpoints import load_state_dict
from layerwise.editing.config import load_merge_config
from layerwise.editing.merge import merge_models
from layerwise.editing.merge.gradients import interpolate
from layerwise.editing.mergekit_config import translate_mergekit
from layerwise.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

N_LAYERS = 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama 'base' folder (with tokenizer files) and three 'fine-tuned' folders."""
    root = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    (root / "base" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    (root / "base" / "README.md").write_text("the base model's own card")
    sd = base.state_dict()
    for i in range(3):
        ft = transformers.LlamaForCausalLM(cfg)
        ft.load_state_dict({k: v + 0.02 * (i + 1) * torch.randn_like(v) for k, v in sd.items()})
        ft.save_pretrained(root / f"ft{i}")
    return root


def _sd(path):
    return load_state_dict(path)


def _layer(key):
    parts = key.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


TIES_DOC = """\
models:
  - model: base
    # no parameters necessary for base model
  - model: ft0
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: ft1
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: ft2
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


def test_ties_doc_config_runs_unchanged_and_matches_per_tensor_merges(llama, tmp_path):
    cfg = llama / "ties.yml"
    cfg.write_text(TIES_DOC)
    out = tmp_path / "ties"
    assert main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    merged = _sd(out)
    base, fts = _sd(llama / "base"), [_sd(llama / f"ft{i}") for i in range(3)]
    for k in base:
        i = _layer(k)
        d0 = 1.0 if i is None else interpolate([1, 0.7, 0.1], i, N_LAYERS)
        w1 = 0.0 if i is None else interpolate([0, 0.3, 0.7, 1], i, N_LAYERS)
        w2 = 0.5 if "mlp" in k else 0.0
        ref = merge_models(
            "ties",
            [{k: ft[k]} for ft in fts],
            {k: base[k]},
            model_params=[
                {"density": d0, "weight": 1.0},
                {"density": 0.5, "weight": w1},
                {"density": 0.33, "weight": w2},
            ],
            params={"normalize": True},
            dtype="bfloat16",
        ).tensors[k]
        assert merged[k].dtype == torch.bfloat16
        torch.testing.assert_close(merged[k], ref, atol=0, rtol=0)
    assert (
        json.loads((out / "config.json").read_text())[
            "dtype" if "dtype" in json.loads((out / "config.json").read_text()) else "torch_dtype"
        ]
        == "bfloat16"
    )


def test_model_card_rerun_config_and_tokenizer(llama, tmp_path):
    cfg = llama / "ta_lines.yml"
    cfg.write_text(
        "models:\n  - model: ft0\n    parameters:\n      weight: 0.7\n  - model: ft1\n"
        "merge_method: task_arithmetic\nbase_model: base\ndtype: float32\n"
        "lines:\n  alpha: 0.2\n  beta: 0.6\n"
    )
    out = tmp_path / "card"
    assert main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "base_model:" in card
    assert "task_arithmetic" in card and "https://arxiv.org/abs/2212.04089" in card
    assert "weight=0.7" in card and str(llama / "ft1") in card
    assert "## LiNeS" in card and "alpha = 0.2" in card and "model.layers." in card
    assert "merge_method: task_arithmetic" in card  # the config as given
    assert "layerwise 0.1.0" in card and "https://arxiv.org/abs/2410.17146" in card
    assert "the base model's own card" not in card
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_text() == (llama / "base" / f).read_text()
    # the LiNeS table rows: the first block gets alpha, the last alpha + beta
    assert "| 0/3 | 0.2000 |" in card and "| 3/3 | 0.8000 |" in card
    # layerwise_merge.yaml re-runs the same merge from anywhere
    rerun = yaml.safe_load((out / "layerwise_merge.yaml").read_text())
    assert rerun["method"] == "task_arithmetic" and rerun["lines"]["alpha"] == 0.2
    out2 = tmp_path / "again"
    assert main(["merge", str(out / "layerwise_merge.yaml"), "--out", str(out2), "--no-progress"]) == 0
    a, b = _sd(out), _sd(out2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the merge is what the config says: base + lambda(key) (0.7 tau_0 + tau_1)
    base, f0, f1 = _sd(llama / "base"), _sd(llama / "ft0"), _sd(llama / "ft1")
    for k in base:
        i = _layer(k)
        lam = 0.2 if i is None else 0.2 + 0.6 * i / (N_LAYERS - 1)
        ref = base[k].double() + lam * (0.7 * (f0[k] - base[k]) + (f1[k] - base[k])).double()
        torch.testing.assert_close(a[k].double(), ref, atol=2e-6, rtol=0)


SLERP_DOC = """\
slices:
  - sources:
      - model: base
        layer_range: [0, 4]
      - model: ft0
        layer_range: [0, 4]
merge_method: slerp
base_model: base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float32
"""


def test_slerp_doc_config_with_slices_and_filtered_gradients(llama, tmp_path):
    cfg = llama / "slerp.yml"
    cfg.write_text(SLERP_DOC)
    out = tmp_path / "slerp"
    assert main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    merged, base, ft = _sd(out), _sd(llama / "base"), _sd(llama / "ft0")
    for k in base:
        i = _layer(k)
        if "self_attn" in k:
            t = interpolate([0, 0.5, 0.3, 0.7, 1], i, N_LAYERS)
        elif "mlp" in k:
            t = interpolate([1, 0.5, 0.7, 0.3, 0], i, N_LAYERS)
        else:
            t = 0.5
        v0, v1 = base[k].double().ravel(), ft[k].double().ravel()
        dot = float(v0 @ v1 / (v0.norm() * v1.norm()))
        if abs(dot) > 0.9995:
            ref = (1 - t) * v0 + t * v1
        else:
            th = math.acos(dot)
            ref = math.sin((1 - t) * th) / math.sin(th) * v0 + math.sin(t * th) / math.sin(th) * v1
        torch.testing.assert_close(merged[k].double().ravel(), ref, atol=3e-6, rtol=0)
    # t = 0 at the first attention block gives the base exactly; t = 1 at the last the other model
    k0 = "model.layers.0.self_attn.q_proj.weight"
    k3 = "model.layers.3.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[k0], base[k0], atol=1e-7, rtol=0)
    torch.testing.assert_close(merged[k3], ft[k3], atol=1e-6, rtol=0)


def test_model_stock_and_della_configs(llama, tmp_path):
    (llama / "ms.yml").write_text(
        "models:\n  - model: ft0\n  - model: ft1\n  - model: ft2\nmerge_method: model_stock\n"
        "base_model: base\ndtype: float32\n"
    )
    out = tmp_path / "ms"
    assert main(["merge", str(llama / "ms.yml"), "--out", str(out), "--no-progress"]) == 0
    ref = merge_models("model_stock", [llama / f"ft{i}" for i in range(3)], llama / "base").tensors
    merged = _sd(out)
    assert all(torch.equal(merged[k], ref[k]) for k in ref)
    # della as model cards on the Hub write it: gradients of density/epsilon/weight, lambda per model
    della = {
        "base_model": "base",
        "parameters": {"int8_mask": True, "rescale": True, "normalize": False},
        "merge_method": "della",
        "dtype": "bfloat16",
        "models": [
            {
                "model": f"ft{i}",
                "parameters": {
                    "density": [0.45, 0.55],
                    "epsilon": [0.1, 0.25],
                    "lambda": 0.85,
                    "weight": [0.55, 0.45],
                },
            }
            for i in range(2)
        ],
    }
    ours = translate_mergekit(della)
    assert ours["method"] == "della" and ours["parameters"]["lambda"] == 0.85
    assert ours["parameters"]["combine"] == "ties" and ours["parameters"]["normalize"] is False
    assert "lambda" not in ours["models"][0]["parameters"]
    (llama / "della.yml").write_text(yaml.safe_dump(della))
    out = tmp_path / "della"
    assert main(["merge", str(llama / "della.yml"), "--out", str(out), "--no-progress"]) == 0
    assert _sd(out)["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    della["models"][1]["parameters"]["lambda"] = 0.5
    with pytest.raises(ConfigError, match="lambda"):
        translate_mergekit(della)


def test_dare_and_breadcrumbs_translation():
    cfg = translate_mergekit(
        {
            "models": [{"model": "b"}, {"model": "x", "parameters": {"weight": 0.53, "density": [0.7, 0.9]}}],
            "merge_method": "dare_ties",
            "base_model": "b",
            "parameters": {"int8_mask": True},
            "dtype": "bf16",
        }
    )
    assert cfg["method"] == "dare" and cfg["dtype"] == "bfloat16"
    assert cfg["parameters"] == {"drop_rate": 0.0, "normalize": False, "combine": "ties"}
    assert cfg["models"] == [
        {"model": "x", "parameters": {"weight": 0.53, "drop_rate": pytest.approx([0.3, 0.1])}}
    ]
    cfg = translate_mergekit(
        {
            "models": ["a", "c"],
            "merge_method": "breadcrumbs_ties",
            "base_model": "b",
            "parameters": {"density": 0.9, "gamma": 0.01},
        }
    )
    assert cfg["method"] == "breadcrumbs" and cfg["parameters"]["combine"] == "ties"
    assert cfg["parameters"]["density"] == 0.9 and cfg["parameters"]["gamma"] == 0.01
    cfg = translate_mergekit({"models": ["a", "b"], "merge_method": "linear", "base_model": "b"})
    assert cfg["method"] == "average" and [m["model"] for m in cfg["models"]] == ["a", "b"]


@pytest.mark.parametrize(
    "change, key",
    [
        ({"chat_template": "chatml"}, "chat_template"),
        ({"merge_method": "passthrough"}, "passthrough"),
        ({"tokenizer_source": "some/other-model"}, "tokenizer_source"),
        ({"tokenizer": {"source": "base"}}, "tokenizer"),
        ({"parameters": {"normalize": True, "rescale": True}}, "rescale"),
        ({"slices": [{"sources": []}, {"sources": []}], "models": None}, "slices"),
        ({"models": [{"model": "ft0", "layer_range": [0, 2]}]}, "layer_range"),
    ],
)
def test_unsupported_keys_raise_one_line_naming_the_key(llama, change, key):
    data = yaml.safe_load(TIES_DOC)
    data.update(change)
    if data.get("models") is None:
        data.pop("models")
    path = llama / "bad.yml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=key) as err:
        load_merge_config(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_vocabulary_mismatch_with_tokenizer_source_base(llama, tmp_path):
    """A fine-tune that added a pad token (33 rows) merges into the base's 32-row vocabulary."""
    ft = transformers.LlamaForCausalLM.from_pretrained(llama / "ft0")
    ft.resize_token_embeddings(33)
    ft.save_pretrained(tmp_path / "ft_pad")
    cfg = {
        "models": [{"model": str(tmp_path / "ft_pad"), "parameters": {"weight": 1.0}}],
        "merge_method": "task_arithmetic",
        "base_model": str(llama / "base"),
        "dtype": "float32",
    }
    (tmp_path / "no.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="embed_tokens"):
        load_merge_config(tmp_path / "no.yml").plan()
    cfg["tokenizer_source"] = "base"
    (tmp_path / "yes.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "vocab"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["merge", str(tmp_path / "yes.yml"), "--out", str(out), "--no-progress"]) == 0
    text = " ".join(str(w.message) for w in caught)
    assert "model.embed_tokens.weight" in text and "lm_head.weight" in text and "33 rows vs 32" in text
    merged, base, padded = _sd(out), _sd(llama / "base"), _sd(tmp_path / "ft_pad")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[k].shape == base[k].shape
        torch.testing.assert_close(merged[k], padded[k][:32], atol=1e-6, rtol=0)  # weight 1: the model
    # fewer rows than the base: the missing rows keep the base's values (task vector 0)
    small = {k: (v[:30] if v.shape[0] == 33 else v) for k, v in padded.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = merge_models("task_arithmetic", [small], base, tokenizer_source="base").tensors
    k = "model.embed_tokens.weight"
    torch.testing.assert_close(res[k][:30], padded[k][:30], atol=1e-6, rtol=0)
    torch.testing.assert_close(res[k][30:], base[k][30:], atol=0, rtol=0)


def test_della_defaults_follow_mergekit(llama, tmp_path):
    """mergekit's della defaults to normalize: true (della_linear: false), rescale: true, lambda 1."""
    cfg = {
        "models": [
            {"model": "ft0", "parameters": {"weight": 0.6, "density": 1.0, "epsilon": 0.0}},
            {"model": "ft1", "parameters": {"weight": 0.9, "density": 1.0, "epsilon": 0.0}},
        ],
        "merge_method": "della",
        "base_model": "base",
        "dtype": "float32",
    }
    ours = translate_mergekit(cfg)
    assert ours["parameters"]["normalize"] is True and ours["parameters"]["combine"] == "ties"
    assert translate_mergekit({**cfg, "merge_method": "della_linear"})["parameters"]["normalize"] is False
    (llama / "della_default.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "della_default"
    assert main(["merge", str(llama / "della_default.yml"), "--out", str(out), "--no-progress"]) == 0
    merged, base = _sd(out), _sd(llama / "base")
    f0, f1 = _sd(llama / "ft0"), _sd(llama / "ft1")
    for k in base:  # density 1 keeps every entry: TIES sign election, mean weighted by the agreeing weights
        w = torch.tensor([0.6, 0.9], dtype=torch.float64).reshape(-1, *[1] * base[k].dim())
        tau = torch.stack([f0[k].double() - base[k].double(), f1[k].double() - base[k].double()])
        sign = torch.where((w * tau).sum(0) >= 0, 1.0, -1.0)
        agree = (w * tau * sign) > 0
        num, den = (w * tau * agree).sum(0), (w * agree).sum(0)
        ref = base[k].double() + num / torch.where(den == 0, 1.0, den)
        torch.testing.assert_close(merged[k].double(), ref, atol=2e-6, rtol=0, msg=k)


def test_lambda_for_the_task_arithmetic_family_in_mergekit_configs(llama, tmp_path):
    """mergekit 0.1.5 takes lambda (global) for task_arithmetic, ties, dare_*, breadcrumbs*, della*."""
    for mk in (
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ):
        cfg = {
            "models": [{"model": "ft0", "parameters": {"weight": 1.0}}],
            "merge_method": mk,
            "base_model": "base",
            "parameters": {"lambda": 0.25},
        }
        assert translate_mergekit(cfg)["parameters"]["lambda"] == 0.25, mk
    with pytest.raises(ConfigError, match="lambda"):
        translate_mergekit(
            {
                "models": ["a"],
                "merge_method": "slerp",
                "base_model": "b",
                "parameters": {"t": 0.5, "lambda": 0.5},
            }
        )
    cfg = {
        "models": [{"model": "ft0", "parameters": {"weight": 0.7}}, {"model": "ft1"}],
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "parameters": {"lambda": 0.25, "weight": 1.0},
        "dtype": "float32",
    }
    (llama / "ta_lambda.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "ta_lambda"
    assert main(["merge", str(llama / "ta_lambda.yml"), "--out", str(out), "--no-progress"]) == 0
    merged, base, f0, f1 = _sd(out), _sd(llama / "base"), _sd(llama / "ft0"), _sd(llama / "ft1")
    for k in base:
        ref = base[k].double() + 0.25 * (0.7 * (f0[k] - base[k]) + (f1[k] - base[k])).double()
        torch.testing.assert_close(merged[k].double(), ref, atol=2e-6, rtol=0)
    # a per-model lambda, equal for every model, becomes the global one (with a warning)
    per_model = {**cfg, "parameters": {"weight": 1.0}}
    per_model["models"] = [{"model": m, "parameters": {"lambda": 0.25}} for m in ("ft0", "ft1")]
    with pytest.warns(UserWarning, match="mergekit 0.1.5 reads lambda only"):
        assert translate_mergekit(per_model)["parameters"]["lambda"] == 0.25


def test_yaml_scientific_notation_strings_are_numbers():
    """PyYAML reads ``1e-5`` (no dot) as a string; mergekit converts numeric strings, so does layerwise."""
    cfg = yaml.safe_load(
        "models:\n  - model: a\n  - model: b\nmerge_method: karcher\n"
        "parameters:\n  max_iter: 10\n  tol: 1e-5\n"
    )
    assert cfg["parameters"]["tol"] == "1e-5"
    assert translate_mergekit(cfg)["parameters"] == {"max_iter": 10, "tol": 1e-5}
    cfg = yaml.safe_load(
        "models:\n  - model: a\n    parameters:\n      density: [1e-1, 5e-1]\n      weight: 1\n"
        "merge_method: dare_linear\nbase_model: b\n"
    )
    out = translate_mergekit(cfg)["models"][0]["parameters"]
    assert out["drop_rate"] == pytest.approx([0.9, 0.5])
    with pytest.raises(ConfigError):  # a non-numeric string stays a string and is refused by the method
        from layerwise.editing.config import parse_merge_config

        parse_merge_config({**cfg, "parameters": {"lambda": "big"}}, check_files=False)
