"""mergekit's own example configs (its ``examples/`` folder) run unchanged: each YAML below keeps the
example's structure, keys and values, with the hub model names replaced by local tiny Llama / GPT-2
folders and the layer ranges scaled to their 4 layers (40 -> 4). Each merged output is checked against a
reference computed here (per-tensor merges, weighted sums, or the layers each slice names)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from layerwise.cli import main
from layerwise.editing.checkpoints import load_state_dict
from layerwise.editing.merge import merge_models
from layerwise.editing.merge.gradients import interpolate

transformers = pytest.importorskip("transformers")

N = 4
NAMES = ("orca", "platypus", "wizardlm", "wizardmath", "llama2", "mistral", "mistral_instruct", "biomistral")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
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
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    sd = base.state_dict()
    for i, name in enumerate(NAMES):
        m = transformers.LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(i + 1)
        m.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()})
        m.save_pretrained(root / name)
    gcfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=N, n_head=2, n_positions=16)
    transformers.GPT2LMHeadModel(gcfg).save_pretrained(root / "gpt2")
    return root


def _merge(zoo, tmp_path, name, text):
    cfg = zoo / f"{name}.yml"
    cfg.write_text(text)
    out = tmp_path / name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    return load_state_dict(out), out, [str(w.message) for w in caught]


def _layer(key):
    parts = key.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


# examples/linear.yml
LINEAR = """\
models:
  - model: orca
    parameters:
      weight: 1.0
  - model: wizardlm
    parameters:
      weight: 0.3
  - model: platypus
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""


def test_linear_example(zoo, tmp_path):
    got, _, _ = _merge(zoo, tmp_path, "linear", LINEAR)
    sds = [load_state_dict(zoo / n) for n in ("orca", "wizardlm", "platypus")]
    for k in sds[0]:
        ref = sum(w * sd[k].double() for w, sd in zip((1.0, 0.3, 0.5), sds, strict=True)) / 1.8
        assert got[k].dtype == torch.float16
        torch.testing.assert_close(got[k].double(), ref, atol=2e-3, rtol=0)


# examples/ties.yml (the TIES example of mergekit's README)
TIES = """\
models:
  - model: orca
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: platypus
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: wizardmath
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: llama2
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_ties_example(zoo, tmp_path):
    got, _, _ = _merge(zoo, tmp_path, "ties", TIES)
    base = load_state_dict(zoo / "llama2")
    fts = [load_state_dict(zoo / n) for n in ("orca", "platypus", "wizardmath")]
    for k in base:
        i = _layer(k)
        mp = [
            {"density": 1.0 if i is None else interpolate([1, 0.7, 0.1], i, N), "weight": 1.0},
            {"density": 0.5, "weight": 0.0 if i is None else interpolate([0, 0.3, 0.7, 1], i, N)},
            {"density": 0.33, "weight": 0.5 if "mlp" in k else 0.0},
        ]
        ref = merge_models(
            "ties", [{k: ft[k]} for ft in fts], {k: base[k]}, model_params=mp, dtype="float16"
        ).tensors[k]
        torch.testing.assert_close(got[k], ref, atol=0, rtol=0)


# examples/bio-merge.yml
BIO = """\
models:
  - model: mistral_instruct
    parameters:
      density: 0.5
      weight: 0.5
  - model: biomistral
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistral
parameters:
  normalize: false
  int8_mask: true
dtype: float16"""


def test_bio_merge_example(zoo, tmp_path):
    got, _, _ = _merge(zoo, tmp_path, "bio", BIO)
    ref = merge_models(
        "ties",
        [zoo / "mistral_instruct", zoo / "biomistral"],
        zoo / "mistral",
        model_params=[{"density": 0.5, "weight": 0.5}] * 2,
        params={"normalize": False},
        dtype="float16",
    ).tensors
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def _slerp(t, v0, v1):
    a, b = v0.double().ravel(), v1.double().ravel()
    dot = float(a @ b / (a.norm() * b.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    th = math.acos(dot)
    return (math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b).reshape(v0.shape)


# examples/gradient-slerp.yml: its entries say `pattern:`, a key mergekit ignores (so the first entry applies
# to every tensor, which mergekit 0.1.5's own output confirms); layerwise does the same and warns
GRADIENT_SLERP = """\
slices:
  - sources:
      - model: orca
        layer_range: [0, 4]
      - model: platypus
        layer_range: [0, 4]
merge_method: slerp
base_model: orca
parameters:
  t:
    - pattern: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - pattern: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
"""


def test_gradient_slerp_example(zoo, tmp_path):
    got, _, caught = _merge(zoo, tmp_path, "gslerp", GRADIENT_SLERP)
    assert any("'pattern: self_attn' is not a mergekit key" in w for w in caught)
    a, b = load_state_dict(zoo / "orca"), load_state_dict(zoo / "platypus")
    for k in a:
        i = _layer(k)
        t = 0.0 if i is None else interpolate([0, 0.5, 0.3, 0.7, 1], i, N)
        torch.testing.assert_close(got[k].double(), _slerp(t, a[k], b[k]), atol=2e-3, rtol=0)


# examples/orcamini-platy-44layer.yml (ranges 0-24 and 20-40 of 40 layers -> 0-3 and 1-4 of 4)
FRANKEN = """\
slices:
  - sources:
    - model: orca
      layer_range: [0, 3]
  - sources:
    - model: platypus
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
"""


def test_orcamini_platy_layer_stacking_example(zoo, tmp_path):
    got, out, _ = _merge(zoo, tmp_path, "franken", FRANKEN)
    a, b = load_state_dict(zoo / "orca"), load_state_dict(zoo / "platypus")
    plan = [(a, i) for i in range(0, 3)] + [(b, i) for i in range(1, 4)]
    for j, (sd, i) in enumerate(plan):
        for k in [k for k in sd if _layer(k) == i]:
            assert torch.equal(got[k.replace(f"layers.{i}.", f"layers.{j}.", 1)], sd[k].half())
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"].half())
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"].half())
    assert len([k for k in got if k.endswith("input_layernorm.weight")]) == 6
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6


# examples/gpt2-small.yml (the first 8 of GPT-2's 12 layers -> 3 of 4)
GPT2 = """\
slices:
  - sources:
    - model: gpt2
      layer_range: [0, 3]
merge_method: passthrough
dtype: float16
"""


def test_gpt2_small_example(zoo, tmp_path):
    got, out, _ = _merge(zoo, tmp_path, "gpt2small", GPT2)
    sd = load_state_dict(zoo / "gpt2")
    kept = {k for k in sd if not k.startswith("transformer.h.3.")}
    assert set(got) == kept and all(torch.equal(got[k], sd[k].half()) for k in kept)
    assert json.loads((out / "config.json").read_text())["n_layer"] == 3
    assert len(transformers.GPT2LMHeadModel.from_pretrained(out).transformer.h) == 3


# examples/vlm-ties.yml and vlm-linear.yml: the base listed among the models, with parameters
VLM_TIES = """\
models:
  # - model: impactframes/Qwen2-VL-7B-Captioner
  - model: wizardlm
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  # - model: Qwen/Qwen2-VL-7B-Instruct
  - model: llama2
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
merge_method: ties
# base_model: Qwen/Qwen2-VL-7B-Instruct
base_model: llama2
parameters:
  normalize: true
  int8_mask: true
dtype: float16"""

VLM_LINEAR = """\
models:
  - model: wizardlm
  # - model: microsoft/Florence-2-base
    parameters:
      weight: 1.0
  - model: wizardmath
  # - model: maxiw/Florence-2-ScreenQA-base
    parameters:
      weight: 1.0
merge_method: linear
dtype: float32"""


def test_vlm_examples(zoo, tmp_path):
    got, _, _ = _merge(zoo, tmp_path, "vlm_ties", VLM_TIES)
    base, ft = load_state_dict(zoo / "llama2"), load_state_dict(zoo / "wizardlm")
    for k in base:  # the base's own entry is the base (mergekit ignores its parameters)
        i = _layer(k)
        d = 1.0 if i is None else interpolate([1, 0.7, 0.1], i, N)
        ref = merge_models(
            "ties", [{k: ft[k]}], {k: base[k]}, model_params=[{"density": d}], dtype="float16"
        ).tensors[k]
        torch.testing.assert_close(got[k], ref, atol=0, rtol=0)
    got, _, _ = _merge(zoo, tmp_path, "vlm_linear", VLM_LINEAR)
    a, b = load_state_dict(zoo / "wizardlm"), load_state_dict(zoo / "wizardmath")
    for k in a:
        torch.testing.assert_close(got[k], (a[k] + b[k]) / 2, atol=1e-6, rtol=0)


def test_multi_document_files_are_refused_in_one_line(zoo, tmp_path, capsys):
    """mergekit's mega.yml / mergekit-multimerge files hold several merges: refused with the reason."""
    path = zoo / "mega.yml"
    path.write_text(LINEAR + "out_path: ./models/first\n---\n" + BIO)
    assert main(["merge", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "several YAML documents" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
