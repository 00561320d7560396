"""M3ID's place in the logits-processor chain: both decoding paths apply it first, then generate's own.

Every step of both paths is compared with a reference written out here again, row by row, without padding
or KV cache: the rule on the model's raw log-probabilities (with the clamp, the plausibility cutoff and the
image-free prompt of the chosen mode), then the processors ``generate`` builds from its arguments
(repetition penalty, bad words). A recording processor, appended by ``generate`` after its own, captures
the scores each path finally samples from. Each option is checked to change the scores, so a path that
ignored it could not pass.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LogitsProcessorList  # noqa: E402

from conftest import toy_llava_world  # noqa: E402
from layerwise.decoding import (  # noqa: E402
    M3IDLogitsProcessor,
    m3id_custom_generate,
    unconditional_inputs,
)

PROMPTS = ["<image> describe :", "<image> is there a cup ?", "is there <image> a bus ?"]
STEPS = 6
LAMBDA = 0.5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vlm():
    model, proc, images = toy_llava_world(seed=0)  # fixed length: every step is compared
    inputs = proc(images=images, text=PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    # alpha at the median confidence of plain greedy decoding: the gate opens at some steps, not at others
    plain = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    conf = torch.stack([torch.softmax(s, -1).max(-1).values for s in plain.scores]).flatten().sort().values
    k = conf.numel() // 2  # halfway between two observed confidences: no step sits on the gate's edge
    return model, proc, images, inputs, float(conf[k] + conf[k + 1]) / 2


class Recorder:
    """A logits processor that records the scores it receives (generate appends it after its own)."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.detach().clone())
        return scores


def _run(vlm, path, opts, gen_kw):
    model, _, _, inputs, alpha = vlm
    unc = unconditional_inputs(
        inputs, image_token_id=model.config.image_token_id, mode=opts.get("mode", "drop")
    )
    rec = Recorder()
    m3 = {
        "lambda_": LAMBDA,
        "alpha": alpha,
        "t0": opts.get("t0", 0.0),
        "max_weight": opts.get("max_weight"),
        "plausibility": opts.get("plausibility"),
    }
    common = dict(
        max_new_tokens=STEPS, do_sample=False, logits_processor=LogitsProcessorList([rec]), **gen_kw
    )
    if path == "processor":
        with M3IDLogitsProcessor(model, unc, **m3).attach():
            seq = model.generate(**inputs, **common)
    else:
        seq = model.generate(
            **inputs,
            custom_generate=m3id_custom_generate,
            m3id_unconditional_ids=unc["input_ids"],
            m3id_unconditional_attention_mask=unc["attention_mask"],
            m3id_unconditional_position_ids=unc.get("position_ids"),
            m3id_lambda=m3["lambda_"],
            m3id_alpha=m3["alpha"],
            m3id_t0=m3["t0"],
            m3id_max_weight=m3["max_weight"],
            m3id_plausibility=m3["plausibility"],
            **common,
        )
    return seq, torch.stack(rec.scores, dim=1)  # (batch, length), (batch, steps, vocab)


def _reference(vlm, sequences, opts, gen_kw):
    """Per row, full forward passes without padding or cache; the rule first, then generate's processors."""
    model, proc, images, inputs, alpha = vlm
    image_id, pad_id = model.config.image_token_id, 0
    prompt_len = inputs["input_ids"].shape[1]
    mode, t0 = opts.get("mode", "drop"), opts.get("t0", 0.0)
    max_weight, plaus = opts.get("max_weight"), opts.get("plausibility")
    rep = gen_kw.get("repetition_penalty")
    ref = torch.empty(len(PROMPTS), STEPS, model.config.text_config.vocab_size)
    for i, (img, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        single = proc(images=[img], text=[prompt], return_tensors="pt")
        c_prompt = single["input_ids"][0]
        is_img = c_prompt == image_id
        generated = sequences[i, prompt_len:]
        for t in range(STEPS):
            c_ids = torch.cat([c_prompt, generated[:t]])
            with torch.no_grad():
                lc = torch.log_softmax(
                    model(input_ids=c_ids[None], pixel_values=single["pixel_values"]).logits[0, -1], -1
                )
                if mode == "drop":
                    u_ids = torch.cat([c_prompt[~is_img], generated[:t]])
                    lu_logits = model(input_ids=u_ids[None]).logits[0, -1]
                else:  # keep the positions, hide the image tokens from attention
                    u_ids = torch.cat([c_prompt.masked_fill(is_img, pad_id), generated[:t]])
                    mask = torch.cat([(~is_img).long(), torch.ones(t, dtype=torch.long)])
                    pos = torch.arange(u_ids.numel())
                    lu_logits = model(
                        input_ids=u_ids[None], attention_mask=mask[None], position_ids=pos[None]
                    ).logits[0, -1]
                lu = torch.log_softmax(lu_logits, -1)
            w = math.expm1(LAMBDA * (t + t0))
            if max_weight is not None:
                w = min(w, max_weight)
            unsure = bool(lc.exp().max() < alpha)
            s = lc + w * (lc - lu) if unsure else lc.clone()
            if plaus is not None and unsure:
                s = s.masked_fill(lc < lc.max() + math.log(plaus), -math.inf)
            if rep is not None:  # HF: every token seen so far, left padding excluded, is penalised
                n_pad = int((inputs["attention_mask"][i] == 0).sum())
                seen = sequences[i, n_pad : prompt_len + t]
                g = s[seen]
                s[seen] = torch.where(g < 0, g * rep, g / rep)
            s[image_id] = -math.inf  # bad_words_ids
            ref[i, t] = s
    return ref


BAN = "ban"  # a random model may emit the image token, which a full forward with pixels cannot take back
OPTION_SETS = {
    "defaults": {},
    "max_weight": {"max_weight": 0.4},
    "plausibility": {"plausibility": 0.97},  # the random toy is near-uniform
    "mask": {"mode": "mask"},
    "t0": {"t0": 3.0},
    "all": {"max_weight": 2.0, "plausibility": 0.95, "mode": "mask", "t0": 1.0},
}
PROCESSOR_SETS = {"bad_words": {}, "bad_words+repetition": {"repetition_penalty": 1.7}}


def _gen_kw(vlm, extra):
    return {"bad_words_ids": [[vlm[0].config.image_token_id]], **extra}


@pytest.mark.parametrize("procs", sorted(PROCESSOR_SETS))
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_both_paths_apply_m3id_first_and_agree(vlm, name, procs):
    opts, gen_kw = OPTION_SETS[name], _gen_kw(vlm, PROCESSOR_SETS[procs])
    seq_p, got_p = _run(vlm, "processor", opts, gen_kw)
    seq_b, got_b = _run(vlm, "batched", opts, gen_kw)
    assert torch.equal(seq_p, seq_b), "greedy tokens differ between the two paths"
    ref = _reference(vlm, seq_p, opts, gen_kw)
    torch.testing.assert_close(got_p, ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_b, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["max_weight", "plausibility", "mask", "t0"])
def test_each_option_changes_the_scores(vlm, name):
    """Non-triviality of the comparison above: the option moves the reference scores ten times beyond the
    tolerance of that comparison (or masks tokens), so a path that ignored it would fail there."""
    gen_kw = _gen_kw(vlm, {})
    seq, _ = _run(vlm, "processor", OPTION_SETS[name], gen_kw)
    with_opt = _reference(vlm, seq, OPTION_SETS[name], gen_kw)
    without = _reference(vlm, seq, {}, gen_kw)
    finite = torch.isfinite(with_opt) & torch.isfinite(without)
    moved = (with_opt[finite] - without[finite]).abs().max() > 10 * 2e-4 or not torch.equal(
        torch.isfinite(with_opt), torch.isfinite(without)
    )
    assert moved


def test_repetition_penalty_acts_after_m3id_not_before(vlm):
    """With the processor appended to generate's chain (the old processor path), the gate sees penalised
    scores and the result differs from the paper's order; attach() gives the paper's order."""
    model, _, _, inputs, alpha = vlm
    gen_kw = _gen_kw(vlm, {"repetition_penalty": 1.7})
    unc = unconditional_inputs(inputs, image_token_id=model.config.image_token_id)
    rec = Recorder()
    proc = M3IDLogitsProcessor(model, unc, lambda_=LAMBDA, alpha=alpha)
    seq = model.generate(
        **inputs,
        max_new_tokens=STEPS,
        do_sample=False,
        logits_processor=LogitsProcessorList([proc, rec]),
        **gen_kw,
    )
    appended = torch.stack(rec.scores, dim=1)
    ref = _reference(vlm, seq, {}, gen_kw)
    assert not torch.allclose(appended, ref, atol=2e-4, rtol=1e-4)


def test_attach_twice_is_refused_and_detach_restores_the_model(vlm):
    model, _, _, inputs, alpha = vlm
    unc = unconditional_inputs(inputs, image_token_id=model.config.image_token_id)
    proc = M3IDLogitsProcessor(model, unc, lambda_=LAMBDA, alpha=1.0)
    plain = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    with proc.attach():
        with pytest.raises(RuntimeError, match="already attached"):
            with proc.attach():
                pass
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), plain)
