"""LiNeS block discovery on timm, open_clip and torchvision models built from configs (no weights), checked
against the models' own block lists, and an open_clip merge whose two towers get their own depth scaling."""

from __future__ import annotations

import pytest
import torch

from layerwise.editing import LinesSpec, discover_blocks, lines_scales, merge_models

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")


def _expected_depth(block_lists):
    """{key: (tower, depth)} from module traversal; ``block_lists``: {tower: [(key prefix, module), ...]}."""
    out = {}
    for tower, blocks in block_lists.items():
        for depth, (prefix, module) in enumerate(blocks):
            for name in module.state_dict():
                out[f"{prefix}{name}"] = (tower, depth)
    return out


def _check(model, block_lists, pattern=None):
    layout = discover_blocks(model.state_dict().keys(), pattern)
    expected = _expected_depth(block_lists)
    assert dict(layout.depth) == expected
    assert dict(layout.towers) == {t: len(b) for t, b in block_lists.items()}
    return layout


def _small_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=3, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=2),
    )


def test_timm_vit_and_convnext_stages():
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=3,
        embed_dim=32,
        num_heads=2,
        num_classes=5,
    )
    _check(vit, {"blocks.": [(f"blocks.{i}.", b) for i, b in enumerate(vit.blocks)]})
    cnx = timm.create_model(
        "convnext_atto", pretrained=False, depths=(1, 2, 1, 3), dims=(8, 16, 24, 32), num_classes=3
    )
    blocks = [
        (f"stages.{s}.blocks.{i}.", b)
        for s, stage in enumerate(cnx.stages)
        for i, b in enumerate(stage.blocks)
    ]
    _check(cnx, {"stages.*.blocks.": blocks})  # depth runs across the stages: 7 blocks in all


def test_open_clip_two_towers():
    clip = _small_clip()
    layout = _check(
        clip,
        {
            "visual.transformer.resblocks.": [
                (f"visual.transformer.resblocks.{i}.", b)
                for i, b in enumerate(clip.visual.transformer.resblocks)
            ],
            "transformer.resblocks.": [
                (f"transformer.resblocks.{i}.", b) for i, b in enumerate(clip.transformer.resblocks)
            ],
        },
    )
    s = lines_scales(layout, 0.1, 0.9)
    assert s["visual.transformer.resblocks.2.attn.in_proj_weight"] == pytest.approx(1.0)
    assert s["visual.transformer.resblocks.1.attn.in_proj_weight"] == pytest.approx(0.55)
    assert s["transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(1.0)
    assert s["visual.proj"] == s["token_embedding.weight"] == pytest.approx(0.1)


def test_torchvision_vit_needs_a_user_pattern():
    from torchvision.models import VisionTransformer

    v = VisionTransformer(image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32)
    with pytest.raises(ValueError, match="no residual blocks"):
        discover_blocks(v.state_dict().keys())  # its blocks are named encoder_layer_{i}
    prefix = "encoder.layers.encoder_layer_"
    _check(
        v,
        {prefix: [(f"{prefix}{i}.", b) for i, b in enumerate(v.encoder.layers)]},
        pattern=r"encoder\.layers\.encoder_layer_(\d+)\.",
    )


def test_open_clip_merge_with_lines_end_to_end(tmp_path):
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in _small_clip().state_dict().items()}
    fts = [
        {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
        for _ in range(2)
    ]
    res = merge_models("task_arithmetic", fts, base, lines=LinesSpec(alpha=0.2, beta=0.6), out=tmp_path / "m")
    from layerwise.editing import load_state_dict

    merged = load_state_dict(res.out)
    model = _small_clip()
    model.load_state_dict(merged)  # loads back into open_clip
    depth = _expected_depth(
        {
            "v": [
                (f"visual.transformer.resblocks.{i}.", b)
                for i, b in enumerate(model.visual.transformer.resblocks)
            ],
            "t": [(f"transformer.resblocks.{i}.", b) for i, b in enumerate(model.transformer.resblocks)],
        }
    )
    num = {"v": 3, "t": 2}
    for k, v in base.items():
        if not v.is_floating_point():
            continue
        lam = 0.2 + 0.6 * depth[k][1] / (num[depth[k][0]] - 1) if k in depth else 0.2
        expected = v + lam * ((fts[0][k] - v) + (fts[1][k] - v))
        torch.testing.assert_close(merged[k], expected, atol=1e-6, rtol=0, msg=k)
