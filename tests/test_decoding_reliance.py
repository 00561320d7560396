"""visual_reliance: per-position KL(p_c || p_u) and attention mass on image tokens, against a row-by-row,
padding-free, cache-free recomputation written out here."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from conftest import toy_llava_world  # noqa: E402
from layerwise.decoding.reliance import plot_reliance, visual_reliance  # noqa: E402

PROMPTS = ["<image> describe :", "<image> is there a cup ?", "is there <image> a bus ?"]
STEPS = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vlm():
    return toy_llava_world(seed=1)  # sdpa attention: visual_reliance switches to eager itself


def _reference(model, proc, images, tokens, mode):
    model.set_attn_implementation("eager")  # the reference reads attention weights
    try:
        return _reference_eager(model, proc, images, tokens, mode)
    finally:
        model.set_attn_implementation("sdpa")


def _reference_eager(model, proc, images, tokens, mode):
    image_id = model.config.image_token_id
    kl = torch.empty(tokens.shape, dtype=torch.float64)
    att = torch.empty(tokens.shape, dtype=torch.float64)
    for i, (img, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        single = proc(images=[img], text=[prompt], return_tensors="pt")
        c_prompt = single["input_ids"][0]
        is_img = c_prompt == image_id
        for t in range(tokens.shape[1]):
            c_ids = torch.cat([c_prompt, tokens[i, :t]])
            with torch.no_grad():
                out = model(
                    input_ids=c_ids[None], pixel_values=single["pixel_values"], output_attentions=True
                )
                lc = torch.log_softmax(out.logits[0, -1].double(), -1)
                if mode == "drop":
                    u_ids = torch.cat([c_prompt[~is_img], tokens[i, :t]])
                    lu_logits = model(input_ids=u_ids[None]).logits[0, -1]
                else:
                    u_ids = torch.cat([c_prompt.masked_fill(is_img, 0), tokens[i, :t]])
                    mask = torch.cat([(~is_img).long(), torch.ones(t, dtype=torch.long)])
                    lu_logits = model(
                        input_ids=u_ids[None],
                        attention_mask=mask[None],
                        position_ids=torch.arange(len(u_ids))[None],
                    ).logits[0, -1]
            lu = torch.log_softmax(lu_logits.double(), -1)
            kl[i, t] = (lc.exp() * (lc - lu)).sum()
            keys = torch.cat([is_img, torch.zeros(t, dtype=torch.bool)])
            # last query, image keys, summed; mean over heads and layers
            att[i, t] = torch.stack([a[0, :, -1, keys].sum(-1).double() for a in out.attentions]).mean()
    return kl, att


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_reliance_matches_row_by_row_recomputation(vlm, mode):
    model, proc, images = vlm
    assert model.config._attn_implementation == "sdpa"
    res = visual_reliance(model, proc, images, PROMPTS, max_new_tokens=STEPS, unconditional=mode)
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the pass, then back
    assert res.kl.shape == (3, STEPS) and res.valid.all()
    kl, att = _reference(model, proc, images, res.tokens, mode)
    torch.testing.assert_close(res.kl, kl, atol=1e-5, rtol=1e-4)
    assert res.image_attention is not None
    torch.testing.assert_close(res.image_attention, att, atol=1e-5, rtol=1e-4)
    assert (res.kl >= 0).all() and res.kl.max() > 1e-3  # the image matters to this random model
    assert ((res.image_attention >= 0) & (res.image_attention <= 1 + 1e-9)).all()


def test_modes_differ_and_plot(vlm, tmp_path):
    model, proc, images = vlm
    drop = visual_reliance(model, proc, images, PROMPTS, max_new_tokens=STEPS, attentions=False)
    mask = visual_reliance(model, proc, images, PROMPTS, max_new_tokens=STEPS, unconditional="mask")
    assert drop.image_attention is None
    assert torch.equal(drop.tokens, mask.tokens)  # same greedy captions ...
    assert not torch.allclose(drop.kl, mask.kl)  # ... scored against different image-free prompts
    fig = plot_reliance({"drop": [drop, mask], "mask": mask})
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_eos_marks_rows_invalid_after_the_end(vlm):
    model, proc, images = vlm
    res = visual_reliance(model, proc, images, PROMPTS, max_new_tokens=STEPS, attentions=False)
    eos = int(res.tokens[0, 1])  # pretend the second token of row 0 ends the caption
    model.generation_config.eos_token_id = eos
    try:
        ended = visual_reliance(model, proc, images, PROMPTS, max_new_tokens=STEPS, attentions=False)
    finally:
        model.generation_config.eos_token_id = None
    first = (ended.tokens[0] == eos).nonzero()[0, 0]
    assert ended.valid[0, : first + 1].all() and not ended.valid[0, first + 1 :].any()
    kl_mean, _ = ended.mean_over_batch()
    assert kl_mean.shape == (STEPS,)


def test_bad_arguments(vlm):
    model, proc, images = vlm
    with pytest.raises(ValueError, match="max_new_tokens"):
        visual_reliance(model, proc, images, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="unconditional"):
        visual_reliance(model, proc, images, PROMPTS, unconditional="blur")
    with pytest.raises(ValueError, match="images"):
        visual_reliance(model, proc, images[:2], PROMPTS)


def test_kl_direction_on_a_model_where_the_image_matters(vlm):
    """KL is symmetric to second order, so on the random model (p_c close to p_u) KL(p_c || p_u) and
    KL(p_u || p_c) agree within the tolerance. Sharpened logits (lm_head x 40) make the two distributions far
    apart: there the direction is checked against the reference, and the reference itself must tell the two
    directions apart by far more than the tolerance."""
    import copy

    model, proc, images = vlm
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(40.0)
    res = visual_reliance(sharp, proc, images, PROMPTS, max_new_tokens=STEPS, attentions=False)
    kl, _ = _reference(sharp, proc, images, res.tokens, "drop")
    torch.testing.assert_close(res.kl, kl, atol=1e-5, rtol=1e-4)
    # the reversed direction, recomputed from the same reference forward passes, differs clearly
    reversed_kl = _reference_reversed(sharp, proc, images, res.tokens)
    assert (reversed_kl - kl).abs().max() > 0.1 and kl.max() > 0.5


def _reference_reversed(model, proc, images, tokens):
    """KL(p_u || p_c) row by row (drop mode), the direction visual_reliance must not compute."""
    image_id = model.config.image_token_id
    out = torch.empty(tokens.shape, dtype=torch.float64)
    for i, (img, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        single = proc(images=[img], text=[prompt], return_tensors="pt")
        c_prompt = single["input_ids"][0]
        for t in range(tokens.shape[1]):
            with torch.no_grad():
                c = model(input_ids=torch.cat([c_prompt, tokens[i, :t]])[None],
                          pixel_values=single["pixel_values"]).logits[0, -1]
                u_ids = torch.cat([c_prompt[c_prompt != image_id], tokens[i, :t]])
                u = model(input_ids=u_ids[None]).logits[0, -1]
            lc, lu = torch.log_softmax(c.double(), -1), torch.log_softmax(u.double(), -1)
            out[i, t] = (lu.exp() * (lu - lc)).sum()
    return out
