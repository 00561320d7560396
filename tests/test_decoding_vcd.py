"""VCD (visual contrastive decoding) on the batched loop, against a padding-free, cache-free recomputation
written out here: per row, full forward passes with the clean and with the noised image, then the rule."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
from conftest import toy_llava_world  # noqa: E402
from layerwise.decoding.vcd import NOISE_STEPS, diffusion_noise, vcd_generate, vcd_scores  # noqa: E402

PROMPTS = ["<image> describe :", "<image> is there a cup ?", "is there <image> a bus ?"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vlm():
    model, proc, images = toy_llava_world(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper distributions: the cutoff and the contrast both matter
    return model, proc, images


def _alpha_bar_reference(step):
    """abar_T written out as a loop over the sigmoid schedule (betas from 1e-5 to 5e-3 over 1000 steps)."""
    prod = 1.0
    for s in range(step + 1):
        x = -6 + 12 * s / (NOISE_STEPS - 1)
        prod *= 1 - (1e-5 + (5e-3 - 1e-5) / (1 + math.exp(-x)))
    return prod


def test_diffusion_noise_closed_form_and_seed():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    for step in (0, 500, 999):
        abar = _alpha_bar_reference(step)
        want = math.sqrt(abar) * x + math.sqrt(1 - abar) * eps
        torch.testing.assert_close(diffusion_noise(x, step, seed=7), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(diffusion_noise(x, 500, seed=3), diffusion_noise(x, 500, seed=3))
    assert not torch.equal(diffusion_noise(x, 500, seed=3), diffusion_noise(x, 500, seed=4))
    for bad in (-1, NOISE_STEPS, 2.5):
        with pytest.raises((ValueError, TypeError), match="noise_step"):
            diffusion_noise(x, bad)


def test_vcd_scores_rule():
    lc = torch.log_softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(0)) * 3, -1)
    ln = torch.log_softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(1)) * 3, -1)
    out = vcd_scores(lc, ln, alpha=0.7, beta=0.2)
    pc = lc.exp()
    for i in range(4):
        for k in range(9):
            if pc[i, k] >= 0.2 * pc[i].max():
                want = 1.7 * lc[i, k].item() - 0.7 * ln[i, k].item()
                assert out[i, k].item() == pytest.approx(want, abs=1e-5)
            else:
                assert out[i, k].item() == -math.inf
    torch.testing.assert_close(vcd_scores(lc, ln, alpha=0.0, beta=None), lc)
    with pytest.raises(ValueError, match="beta"):
        vcd_scores(lc, ln, beta=0.0)
    with pytest.raises(ValueError, match="alpha"):
        vcd_scores(lc, ln, alpha=-1.0)


def _reference_tokens(model, proc, images, n, alpha, beta, noise_step, noise_seed):
    """Greedy VCD row by row: the batch's noised pixels (noise is drawn for the whole batch at once)."""
    batch = proc(images=list(images), text=list(PROMPTS), padding=True, padding_side="left",
                 return_tensors="pt")
    noised = diffusion_noise(batch["pixel_values"], noise_step, seed=noise_seed)
    out = []
    for i, (img, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        single = proc(images=[img], text=[prompt], return_tensors="pt")
        ids = single["input_ids"][0]
        row = []
        for _ in range(n):
            seq = torch.cat([ids, torch.tensor(row, dtype=torch.long)])[None]
            with torch.no_grad():
                clean = model(input_ids=seq, pixel_values=single["pixel_values"]).logits[0, -1]
                noisy = model(input_ids=seq, pixel_values=noised[i : i + 1]).logits[0, -1]
            lc, ln = torch.log_softmax(clean, -1), torch.log_softmax(noisy, -1)
            scores = (1 + alpha) * lc - alpha * ln
            scores = scores.masked_fill(lc < lc.max() + math.log(beta), -math.inf)
            scores[model.config.image_token_id] = -math.inf  # generate's bad-words processor, after the rule
            row.append(int(scores.argmax()))
        out.append(proc.tokenizer.decode(row, skip_special_tokens=True))
    return out


@pytest.mark.parametrize("alpha, beta, step", [(1.0, 0.1, 500), (2.0, 0.01, 900)])
def test_batched_vcd_equals_cache_free_reference(vlm, alpha, beta, step):
    model, proc, images = vlm
    got = vcd_generate(model, proc, images, PROMPTS, alpha=alpha, beta=beta, noise_step=step, noise_seed=5,
                       max_new_tokens=6, do_sample=False, bad_words_ids=[[model.config.image_token_id]])
    assert got == _reference_tokens(model, proc, images, 6, alpha, beta, step, 5)
    inputs = proc(images=images, text=PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    greedy = proc.tokenizer.batch_decode(plain[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert got != greedy  # VCD acts here, so the agreement above is not trivial
    # alpha = 0 with no cutoff is plain greedy decoding
    assert vcd_generate(model, proc, images, PROMPTS, alpha=0.0, beta=None, max_new_tokens=6) == greedy


def test_vcd_options_are_used_and_bad_input(vlm):
    model, proc, images = vlm
    kw = {"max_new_tokens": 6, "do_sample": False}
    base = vcd_generate(model, proc, images, PROMPTS, **kw)
    assert vcd_generate(model, proc, images, PROMPTS, noise_seed=0, **kw) == base  # same seed, same text
    outs = {
        "alpha": vcd_generate(model, proc, images, PROMPTS, alpha=3.0, beta=None, **kw),
        "step": vcd_generate(model, proc, images, PROMPTS, noise_step=10, beta=None, **kw),
    }
    assert outs["alpha"] != vcd_generate(model, proc, images, PROMPTS, alpha=0.1, beta=None, **kw)
    assert outs["step"] != vcd_generate(model, proc, images, PROMPTS, noise_step=999, beta=None, **kw)
    kw_s = {"do_sample": True, "seed": 1, "max_new_tokens": 6}
    sampled = [vcd_generate(model, proc, images, PROMPTS, **kw_s) for _ in "ab"]
    assert sampled[0] == sampled[1]
    with pytest.raises(ValueError, match="num_beams"):
        vcd_generate(model, proc, images, PROMPTS, num_beams=2)
    with pytest.raises(ValueError, match="images"):
        vcd_generate(model, proc, images[:2], PROMPTS)
    with pytest.raises(ValueError, match="noise_step"):
        vcd_generate(model, proc, images, PROMPTS, noise_step=1000)
