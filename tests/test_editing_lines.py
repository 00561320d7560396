"""LiNeS: block discovery (synthetic names and real transformers architectures built from configs, checked
against the models' own module lists), the scaling formula, single/multi-task modes."""

from __future__ import annotations

import pytest
import torch

from layerwise.editing import TaskVector, apply_lines, discover_blocks, lines_scales, multitask_alpha
from layerwise.editing.lines import format_lines_table, lines_table

transformers = pytest.importorskip("transformers")


def test_mlp_index_is_not_a_block_and_formula_holds():
    keys = [
        "embed.weight",
        "blocks.0.attn.w",
        "blocks.0.mlp.0.weight",
        "blocks.1.mlp.2.bias",
        "blocks.2.norm.w",
        "blocks.3.w",
        "head.mlp.0.weight",
        "head.mlp.1.weight",
        "final_norm.w",
    ]
    layout = discover_blocks(keys)
    assert layout.towers == {"blocks.": 4}
    assert layout.depth["blocks.0.mlp.0.weight"] == ("blocks.", 0)
    assert layout.depth["blocks.1.mlp.2.bias"] == ("blocks.", 1)
    assert "head.mlp.0.weight" not in layout.depth and "head.mlp.1.weight" not in layout.depth
    alpha, beta = 0.3, 0.6
    s = lines_scales(keys, alpha, beta)
    expected = {
        "blocks.0.attn.w": alpha,
        "blocks.1.mlp.2.bias": alpha + beta / 3,
        "blocks.2.norm.w": alpha + 2 * beta / 3,
        "blocks.3.w": alpha + beta,
        "embed.weight": alpha,
        "head.mlp.0.weight": alpha,
        "final_norm.w": alpha,
    }
    for k, v in expected.items():
        assert s[k] == pytest.approx(v), k


def test_towers_stages_and_user_pattern():
    keys = (
        [f"visual.transformer.resblocks.{i}.w" for i in range(4)]
        + [f"transformer.resblocks.{i}.w" for i in range(2)]
        + ["visual.proj", "token_embedding.weight"]
    )
    layout = discover_blocks(keys)
    assert layout.towers == {"visual.transformer.resblocks.": 4, "transformer.resblocks.": 2}
    s = lines_scales(layout, 0.0, 1.0)
    assert s["visual.transformer.resblocks.3.w"] == 1.0 and s["transformer.resblocks.1.w"] == 1.0
    assert s["visual.transformer.resblocks.1.w"] == pytest.approx(1 / 3) and s["visual.proj"] == 0.0
    # ConvNeXt-like stages: depth runs across stages, in numeric (not string) order
    stage_keys = [f"stages.{s}.blocks.{b}.conv.weight" for s in (0, 1, 10) for b in (0, 1)]
    st = discover_blocks(stage_keys)
    assert st.towers == {"stages.*.blocks.": 6}
    assert [st.depth[k][1] for k in stage_keys] == [0, 1, 2, 3, 4, 5]
    # plain nn.Sequential: only a user pattern finds blocks
    seq = ["0.weight", "2.weight", "4.weight", "4.bias"]
    with pytest.raises(ValueError, match="no residual blocks"):
        discover_blocks(seq)
    lay = discover_blocks(seq, pattern=r"^(\d+)\.")
    assert [lay.depth[k][1] for k in seq] == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="pattern"):
        discover_blocks(seq, pattern=r"^\d+\.")
    with pytest.raises(ValueError, match="regular expression"):
        discover_blocks(seq, pattern=r"(")


def _check_against_modules(model, prefix_to_blocks, expected_towers):
    """Every parameter of the i-th module of each block list must be at depth i; nothing else in a block."""
    keys = list(model.state_dict().keys())
    layout = discover_blocks(keys)
    assert dict(layout.towers) == expected_towers
    in_blocks = set()
    for prefix, blocks in prefix_to_blocks.items():
        for i, block in enumerate(blocks):
            for name in block.state_dict():
                key = f"{prefix}{i}.{name}"
                assert layout.depth[key] == (prefix, i), key
                in_blocks.add(key)
    assert set(layout.depth) == in_blocks


def test_bert_gpt2_vit_llama_from_config():
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=40,
            hidden_size=8,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=8,
        )
    )
    _check_against_modules(bert, {"bert.encoder.layer.": bert.bert.encoder.layer}, {"bert.encoder.layer.": 3})
    gpt = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=40, n_embd=8, n_layer=5, n_head=2, n_positions=8)
    )
    _check_against_modules(gpt, {"transformer.h.": gpt.transformer.h}, {"transformer.h.": 5})
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
            num_labels=3,
        )
    )
    # transformers 5 names them vit.layers.{i} (4.x: vit.encoder.layer.{i}); both are found
    _check_against_modules(vit, {"vit.layers.": vit.vit.layers}, {"vit.layers.": 2})
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=40,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    _check_against_modules(llama, {"model.layers.": llama.model.layers}, {"model.layers.": 4})


def test_hf_clip_two_towers_have_their_own_depth():
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=40,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=8,
        ),
        vision_config=dict(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
        projection_dim=8,
    )
    clip = transformers.CLIPModel(cfg)
    _check_against_modules(
        clip,
        {
            "text_model.encoder.layers.": clip.text_model.encoder.layers,
            "vision_model.encoder.layers.": clip.vision_model.encoder.layers,
        },
        {"text_model.encoder.layers.": 2, "vision_model.encoder.layers.": 4},
    )
    s = lines_scales(clip.state_dict().keys(), 0.2, 0.8)
    assert s["vision_model.encoder.layers.3.mlp.fc1.weight"] == pytest.approx(1.0)
    assert s["text_model.encoder.layers.1.mlp.fc1.weight"] == pytest.approx(1.0)
    assert s["vision_model.encoder.layers.0.mlp.fc1.weight"] == pytest.approx(0.2)
    assert s["visual_projection.weight"] == pytest.approx(0.2)


def test_apply_lines_single_task_and_table():
    pre = {"emb": torch.zeros(3), **{f"layers.{i}.w": torch.zeros(2) for i in range(5)}}
    ft = {k: torch.ones_like(v) for k, v in pre.items()}
    tau = TaskVector(pre, ft)
    alpha = 0.2
    scaled = apply_lines(tau, alpha)  # beta = 1 - alpha: last block keeps its full update
    assert torch.allclose(scaled["layers.4.w"], torch.ones(2))
    assert torch.allclose(scaled["layers.0.w"], torch.full((2,), alpha))
    assert torch.allclose(scaled["layers.2.w"], torch.full((2,), alpha + (1 - alpha) * 0.5))
    assert torch.allclose(scaled["emb"], torch.full((3,), alpha))
    table = lines_table(discover_blocks(pre), alpha, 1 - alpha)
    assert [r["scale"] for r in table[1:]] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert "layers." in format_lines_table(table)


def test_multitask_alpha_is_one_over_T_for_task_arithmetic_and_norm_ratio_otherwise():
    g = torch.Generator().manual_seed(0)
    pre = {"layers.0.w": torch.randn(50, generator=g), "layers.1.w": torch.randn(50, generator=g)}
    tvs = [TaskVector(pre, {k: v + torch.randn(50, generator=g) for k, v in pre.items()}) for _ in range(4)]
    assert multitask_alpha(tvs, sum(tvs)) == pytest.approx(0.25)
    merged = 0.5 * tvs[0]
    expected = sum(tvs).norm(1) / (0.5 * tvs[0].norm(1)) / 4
    assert multitask_alpha(tvs, merged) == pytest.approx(expected)


def test_single_block_tower_gets_alpha_plus_beta():
    # With one block, i / (num_blocks - 1) is 0/0: the only block is also the last, which keeps the full
    # update alpha + beta (in single-task mode, 1); parameters outside the blocks keep alpha.
    from layerwise.editing.lines import lines_scales

    scales = lines_scales(["a.blocks.0.w", "a.emb"], 0.2, 0.8)
    assert scales["a.blocks.0.w"] == pytest.approx(1.0) and scales["a.emb"] == pytest.approx(0.2)


def test_apply_lines_explicit_beta_is_used():
    # lambda(i) = alpha + beta * i / (L - 1) with the beta given, not the single-task 1 - alpha
    pre = {"emb": torch.zeros(3), **{f"layers.{i}.w": torch.zeros(2) for i in range(5)}}
    tau = TaskVector(pre, {k: torch.full_like(v, 2.0) for k, v in pre.items()})
    alpha, beta = 0.2, 0.5
    scaled = apply_lines(tau, alpha, beta)
    for i in range(5):
        assert torch.allclose(scaled[f"layers.{i}.w"], torch.full((2,), 2.0 * (alpha + beta * i / 4)))
    assert torch.allclose(scaled["emb"], torch.full((3,), 2.0 * alpha))
    scaled_zero = apply_lines(tau, alpha, 0.0)  # beta = 0: a uniform scaling by alpha
    assert all(torch.allclose(scaled_zero[k], 2.0 * alpha * torch.ones_like(v)) for k, v in pre.items())
