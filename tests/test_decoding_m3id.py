"""M3ID: the formula, the logits processor and the batched decoding loop, on tiny models built from config.

The central check recomputes every step without any KV cache, row by row without padding, from the
formula written out again here, and compares with the scores ``generate`` saw.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LogitsProcessorList  # noqa: E402

from conftest import toy_llava_world  # noqa: E402
from layerwise.decoding import (  # noqa: E402
    M3IDLogitsProcessor,
    m3id_custom_generate,
    m3id_generate,
    m3id_scores,
    m3id_weight,
    unconditional_inputs,
)
from layerwise.decoding._hf import cache_kwarg  # noqa: E402
from layerwise.decoding.toy_vlm import (  # noqa: E402
    SceneSpec,
    build_processor,
    build_toy_llava,
    render_scene,
    sample_scenes,
)

SPEC = SceneSpec()
PROMPTS = ["<image> describe :", "<image> is there a cup ?", "is there <image> a bus ?"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vlm():
    return toy_llava_world(seed=0)


def _inputs(proc, images, prompts=PROMPTS):
    return proc(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")


# ---------------------------------------------------------------- the formula


def test_weight_closed_form_and_clamp():
    assert m3id_weight(0, 0.02) == 0.0
    assert math.isclose(m3id_weight(200, 0.02), math.exp(4.0) - 1, rel_tol=1e-12)
    assert math.isclose(m3id_weight(3, 0.1, t0=7), math.exp(1.0) - 1, rel_tol=1e-12)
    assert m3id_weight(200, 0.02, max_weight=5.0) == 5.0
    assert m3id_weight(1, 0.02, max_weight=5.0) == pytest.approx(math.expm1(0.02))


def test_scores_match_hand_computation_and_gate():
    lc = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.1, 0.8]]))
    lu = torch.log(torch.tensor([[0.1, 0.4, 0.5], [0.3, 0.3, 0.4]]))
    t, lam = 10, 0.1
    out = m3id_scores(lc, lu, t, lambda_=lam, alpha=0.6)
    w = math.exp(lam * t) - 1
    # row 0 is unsure (max p = 0.5 < 0.6): corrected; row 1 is sure (0.8): unchanged
    torch.testing.assert_close(out[0], lc[0] + w * (lc[0] - lu[0]))
    torch.testing.assert_close(out[1], lc[1])
    assert out[0].argmax() == 0  # the visually supported token wins after the correction
    assert lc[0].argmax() == 2


def test_scores_alpha_zero_lambda_zero_t_zero_identity():
    g = torch.Generator().manual_seed(0)
    lc = torch.log_softmax(torch.randn(4, 50, generator=g), -1)
    lu = torch.log_softmax(torch.randn(4, 50, generator=g), -1)
    assert torch.equal(m3id_scores(lc, lu, 30, alpha=0.0, lambda_=1.0), lc)
    assert torch.equal(m3id_scores(lc, lu, 30, alpha=1.0, lambda_=0.0), lc)
    assert torch.equal(m3id_scores(lc, lu, 0, alpha=1.0, lambda_=1.0), lc)
    assert not torch.equal(m3id_scores(lc, lu, 30, alpha=1.0, lambda_=1.0), lc)


def test_plausibility_cutoff_hand_computed():
    lc = torch.log(torch.tensor([[0.5, 0.3, 0.04, 0.16], [0.9, 0.05, 0.03, 0.02]]))
    lu = torch.log(torch.tensor([[0.6, 0.3, 0.001, 0.099], [0.25, 0.25, 0.25, 0.25]]))
    w = math.expm1(0.5 * 4)
    plain = m3id_scores(lc, lu, 4, lambda_=0.5, alpha=0.6)
    # without the cutoff, token 2 (p_c 0.04 but p_u 0.001) wins: the failure the cutoff prevents
    assert plain[0].argmax() == 2
    out = m3id_scores(lc, lu, 4, lambda_=0.5, alpha=0.6, plausibility=0.1)
    # row 0 corrected; the cutoff 0.1 * 0.5 = 0.05 removes token 2 (0.04); row 1 (0.9 > 0.6) untouched
    want0 = lc[0] + w * (lc[0] - lu[0])
    want0[2] = -math.inf
    torch.testing.assert_close(out[0], want0)
    torch.testing.assert_close(out[1], lc[1])
    with pytest.raises(ValueError, match="plausibility"):
        m3id_generate(None, None, None, ["x"], plausibility=0.0)


def test_masked_tokens_stay_masked():
    lc = torch.log(torch.tensor([[0.2, 0.2, 0.0, 0.6]]))  # token 2 masked (-inf)
    lu = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    out = m3id_scores(lc, lu, 5, lambda_=0.5, alpha=1.0)
    assert out[0, 2] == -math.inf and torch.isfinite(out[0, [0, 1, 3]]).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lambda_": -0.1}, "lambda_"),
        ({"alpha": 1.5}, "alpha"),
        ({"t0": -1}, "t0"),
        ({"max_weight": -2.0}, "max_weight"),
    ],
)
def test_bad_parameters_name_themselves(vlm, kwargs, name):
    model, proc, images = vlm
    unc = {"input_ids": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match=name):
        M3IDLogitsProcessor(model, unc, **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        m3id_scores(torch.zeros(2, 5), torch.zeros(2, 6), 1)


# ---------------------------------------------------------------- image-free prompts


def test_unconditional_inputs_drop_and_mask():
    img, pad = 9, 0
    ids = torch.tensor([[0, 0, 1, 9, 9, 5, 6], [1, 9, 9, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    out = unconditional_inputs(
        {"input_ids": ids, "attention_mask": mask}, image_token_id=img, pad_token_id=pad
    )
    assert out["input_ids"].tolist() == [[0, 0, 1, 5, 6], [1, 5, 6, 7, 8]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    out = unconditional_inputs({"input_ids": ids, "attention_mask": mask}, image_token_id=img, mode="mask")
    assert out["input_ids"].tolist() == [[0, 0, 1, 0, 0, 5, 6], [1, 0, 0, 5, 6, 7, 8]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="mode"):
        unconditional_inputs({"input_ids": ids}, image_token_id=img, mode="blur")


# ---------------------------------------------------------------- the processor against a no-cache reference


def _reference_scores(model, proc, images, prompts, sequences, prompt_len, lam, alpha, t0):
    """Per row, without padding or cache: full forward passes with and without the image, then the rule."""
    image_id = model.config.image_token_id
    steps = sequences.shape[1] - prompt_len
    ref = torch.empty(len(prompts), steps, model.config.text_config.vocab_size)
    for i, (img, prompt) in enumerate(zip(images, prompts, strict=True)):
        single = proc(images=[img], text=[prompt], return_tensors="pt")
        cond_prompt = single["input_ids"][0]
        uncond_prompt = cond_prompt[cond_prompt != image_id]
        generated = sequences[i, prompt_len:]
        for t in range(steps):
            c_ids = torch.cat([cond_prompt, generated[:t]])[None]
            u_ids = torch.cat([uncond_prompt, generated[:t]])[None]
            with torch.no_grad():
                logits = model(input_ids=c_ids, pixel_values=single["pixel_values"]).logits[0, -1]
                lc = torch.log_softmax(
                    logits.index_fill(0, torch.tensor([image_id]), -math.inf), -1
                )  # bad word
                lu = torch.log_softmax(model(input_ids=u_ids).logits[0, -1], -1)
            w = math.exp(lam * (t + t0)) - 1
            unsure = lc.exp().max() < alpha
            # banned tokens stay at -inf (never 0 * -inf = nan)
            ref[i, t] = torch.where(torch.isfinite(lc), lc + w * (lc - lu), lc) if unsure else lc
    return ref


@pytest.mark.parametrize("t0", [0.0, 4.0])
def test_processor_scores_equal_no_cache_recomputation(vlm, t0):
    model, proc, images = vlm
    inputs = _inputs(proc, images)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded for this test"
    # a random model may emit the image token, which a full forward with pixel values cannot take back:
    # ban it (generate masks it before M3ID sees the scores; the reference does the same)
    ban = {"bad_words_ids": [[model.config.image_token_id]]}
    greedy = model.generate(
        **inputs, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, **ban
    )
    # alpha between the smallest and largest confidence seen: the gate is open at some steps, closed at others
    conf = torch.stack([torch.softmax(s, -1).max(-1).values for s in greedy.scores]).flatten()
    assert conf.min() < conf.median() < conf.max()
    alpha = float(conf.median())
    lam = 0.3
    unc = unconditional_inputs(inputs, image_token_id=model.config.image_token_id)
    proc_m3id = M3IDLogitsProcessor(model, unc, lambda_=lam, alpha=alpha, t0=t0)
    out = model.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        logits_processor=LogitsProcessorList([proc_m3id]),
        **ban,
    )
    got = torch.stack(out.scores, dim=1)  # (batch, steps, vocab)
    prompt_len = inputs["input_ids"].shape[1]
    ref = _reference_scores(model, proc, images, PROMPTS, out.sequences, prompt_len, lam, alpha, t0)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    changed = torch.logsumexp(got, -1).abs() > 1e-5  # corrected rows are no longer normalised
    assert changed.any() and not changed.all()
    assert proc_m3id.weights_[0] == pytest.approx(math.expm1(lam * t0))


def test_batched_path_equals_processor_path(vlm):
    model, proc, images = vlm
    kw = {"lambda_": 0.5, "alpha": 1.0, "max_new_tokens": 6, "do_sample": False}
    a = m3id_generate(model, proc, images, PROMPTS, path="processor", **kw)
    b = m3id_generate(model, proc, images, PROMPTS, path="batched", **kw)
    greedy = m3id_generate(model, proc, images, PROMPTS, path="processor", **{**kw, "alpha": 0.0})
    assert a == b
    assert a != greedy  # M3ID does act here, so the agreement above is not trivial


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_alpha_zero_and_lambda_zero_never_change_greedy(vlm, mode):
    model, proc, images = vlm
    inputs = _inputs(proc, images)
    plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    plain_text = proc.tokenizer.batch_decode(
        plain[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    for path in ("processor", "batched"):
        for kw in ({"alpha": 0.0, "lambda_": 1.0}, {"alpha": 1.0, "lambda_": 0.0}):
            got = m3id_generate(
                model, proc, images, PROMPTS, max_new_tokens=8, unconditional=mode, path=path, **kw
            )
            assert got == plain_text, (path, kw)
    active = m3id_generate(
        model, proc, images, PROMPTS, max_new_tokens=8, unconditional=mode, alpha=1.0, lambda_=1.0
    )
    assert active != plain_text


def test_cache_independence(vlm):
    model, proc, images = vlm
    inputs = _inputs(proc, images)
    before = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    unc = unconditional_inputs(inputs, image_token_id=model.config.image_token_id)
    cache = DynamicCache(config=model.config.text_config)
    proc_m3id = M3IDLogitsProcessor(model, unc, lambda_=1.0, alpha=1.0)
    out = model.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        logits_processor=LogitsProcessorList([proc_m3id]),
        **{cache_kwarg(model): cache},  # transformers < 5.24 names it past_key_values
    )
    # generate's cache holds exactly its own tokens (no doubling by the image-free branch) and vice versa
    assert cache.get_seq_length() == out.shape[1] - 1
    assert proc_m3id._cache is not cache
    assert proc_m3id._cache.get_seq_length() == unc["input_ids"].shape[1] + 5
    m3id_generate(model, proc, images, PROMPTS, max_new_tokens=6, path="batched", lambda_=1.0, alpha=1.0)
    after = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(before, after)


def test_beam_search_refused(vlm):
    model, proc, images = vlm
    with pytest.raises(ValueError, match="num_beams"):
        m3id_generate(model, proc, images, PROMPTS, num_beams=2, max_new_tokens=3)
    inputs = _inputs(proc, images)
    unc = unconditional_inputs(inputs, image_token_id=model.config.image_token_id)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(
            **inputs,
            num_beams=3,
            max_new_tokens=4,
            logits_processor=LogitsProcessorList([M3IDLogitsProcessor(model, unc)]),
        )
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(
            **inputs,
            num_beams=2,
            max_new_tokens=3,
            custom_generate=m3id_custom_generate,
            m3id_unconditional_ids=unc["input_ids"],
        )


def test_sampling_is_seeded_and_supports_multiple_returns(vlm):
    model, proc, images = vlm
    state = torch.random.get_rng_state()
    kw = {"do_sample": True, "top_k": 0, "max_new_tokens": 6, "lambda_": 0.5, "alpha": 1.0}
    for path in ("processor", "batched"):
        a = m3id_generate(model, proc, images, PROMPTS, seed=3, path=path, num_return_sequences=2, **kw)
        b = m3id_generate(model, proc, images, PROMPTS, seed=3, path=path, num_return_sequences=2, **kw)
        assert a == b and len(a) == 2 * len(PROMPTS)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    c = m3id_generate(model, proc, images, PROMPTS, seed=4, **kw)
    d = m3id_generate(model, proc, images, PROMPTS, seed=5, **kw)
    assert c != d


def test_text_conditioned_lm_document_grounding():
    from transformers import LlamaConfig, LlamaForCausalLM

    proc = build_processor(SPEC)
    tok = proc.tokenizer
    cfg = LlamaConfig(
        vocab_size=len(SPEC.vocabulary()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    prompts = ["cat dog fork describe :", "bus describe :"]  # the "document" precedes the question
    free = ["describe :", "describe :"]
    kw = {"lambda_": 0.5, "alpha": 1.0, "max_new_tokens": 5}
    a = m3id_generate(model, tok, None, prompts, unconditional_prompts=free, path="processor", **kw)
    b = m3id_generate(model, tok, None, prompts, unconditional_prompts=free, path="batched", **kw)
    plain = m3id_generate(model, tok, None, prompts, unconditional_prompts=free, **{**kw, "alpha": 0.0})
    assert a == b and a != plain and len(a) == 2
    with pytest.raises(ValueError, match="unconditional_prompts"):
        m3id_generate(model, tok, None, prompts)


def test_bad_arguments(vlm):
    model, proc, images = vlm
    with pytest.raises(ValueError, match="path"):
        m3id_generate(model, proc, images, PROMPTS, path="fast")
    with pytest.raises(ValueError, match="images"):
        m3id_generate(model, proc, images[:2], PROMPTS)
    with pytest.raises(TypeError, match="prompts"):
        m3id_generate(model, proc, images[:1], "<image> describe :")
    with pytest.raises(TypeError, match="unconditional_inputs"):
        M3IDLogitsProcessor(model, torch.ones(2, 3))


def test_toy_pixels_match_processor():
    """The toy's training loop feeds processor pixel values; check them against the documented transform."""
    proc = build_processor(SPEC)
    img = render_scene(SPEC, sample_scenes(SPEC, 1, seed=0)[0], seed=0)
    got = proc.image_processor([img], return_tensors="pt")["pixel_values"][0]
    want = torch.from_numpy((img.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_toy_scenes_carry_the_cooccurrence_bias():
    spec = SceneSpec(p_cooccur=0.9, p_cooccur_test=0.5)
    for test, p in ((False, 0.9), (True, 0.5)):
        scenes = sample_scenes(spec, 4000, test=test, seed=11)
        for a, b in spec.pairs:
            with_a = [s for s in scenes if a in s.objects]
            rate = sum(b in s.objects for s in with_a) / len(with_a)
            # about 1000 scenes hold each A: the binomial standard error is <= 0.016
            assert abs(rate - p) < 0.05, (test, a, b, rate)
    scene = sample_scenes(spec, 1, seed=0)[0]
    assert len(set(scene.cells)) == len(scene.cells)  # one object per cell


def test_toy_training_is_seeded_and_learns():
    from layerwise.decoding.toy_vlm import make_examples, train_toy_vlm

    proc = build_processor(SPEC)
    scenes = sample_scenes(SPEC, 64, seed=0)
    images = [render_scene(SPEC, s, seed=i) for i, s in enumerate(scenes)]
    examples = make_examples(SPEC, scenes, seed=0)
    runs = []
    for seed in (0, 0, 1):
        model = build_toy_llava(SPEC, hidden=32, seed=0)
        runs.append(train_toy_vlm(model, proc, images, examples, steps=60, batch_size=16, seed=seed))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    uniform = math.log(len(SPEC.vocabulary()))  # cross-entropy of guessing uniformly
    assert abs(runs[0][0] - uniform) < 0.3  # a random model starts there ...
    assert sum(runs[0][-10:]) / 10 < 0.7 * uniform  # ... and training goes well below it


def test_yes_no_examples_with_several_questions_score_only_the_answers():
    from layerwise.decoding.toy_vlm import make_examples, pope_question

    spec = SceneSpec(question_phrase="is there a {}")
    scenes = sample_scenes(spec, 200, seed=5)
    examples = make_examples(spec, scenes, pope_fraction=0.5, questions=4, seed=2)
    multi = [e for e in examples if not isinstance(e[2], str)]
    assert 70 < len(multi) < 130  # half of 200 yes/no (binomial sd 7)
    n_yes = 0
    for i, prompt, segments in multi:
        assert prompt.startswith("<image> is there a ") and not prompt.endswith("?")
        asked = [prompt.split()[-1]] + [text.split()[-1] for text, scored in segments if not scored]
        answers = [text for text, scored in segments if scored][:-1]
        assert len(asked) == len(answers) == 4 and segments[-1] == (".", True)
        assert [s for _, s in segments[:-1]] == [True, False] * 3 + [True]  # answers scored, questions not
        assert all(text == pope_question(text.split()[-1], with_image=False, spec=spec)
                   for text, scored in segments if not scored)
        assert answers == ["yes" if o in scenes[i].objects else "no" for o in asked]
        n_yes += answers.count("yes")
    assert 0.4 < n_yes / (4 * len(multi)) < 0.6  # present or absent with equal probability
    # one question per example: the plain "yes ." / "no ." strings of before
    single = make_examples(spec, scenes, pope_fraction=0.5, seed=2)
    assert all(isinstance(t, str) for _, _, t in single)
    assert {t for _, p, t in single if p.startswith("<image> is")} == {"yes .", "no ."}


def test_toy_training_loss_leaves_out_the_unscored_question_segments():
    # The first loss train_toy_vlm reports is computed before any update: it must equal the cross-entropy
    # of the untouched model on the scored tokens (answers, full stop, end token) only.
    from layerwise.decoding.toy_vlm import IMAGE_TOKEN, train_toy_vlm

    spec = SceneSpec(question_phrase="is there a {}")
    proc = build_processor(spec)
    scene = sample_scenes(spec, 1, seed=0)[0]
    image = render_scene(spec, scene, seed=0)
    segments = (("yes", True), ("is there a cup", False), ("no", True), (".", True))
    example = (0, f"{IMAGE_TOKEN} is there a {scene.objects[0]}", segments)
    model = build_toy_llava(spec, hidden=32, seed=0)
    reference = build_toy_llava(spec, hidden=32, seed=0)
    first = train_toy_vlm(model, proc, [image], [example], steps=1, batch_size=1, image_dropout=0.0)[0]
    tok = proc.tokenizer
    inputs = proc(images=[image], text=[example[1]], return_tensors="pt")
    target = [tok.convert_tokens_to_ids(w) for w in "yes is there a cup no .".split()] + [tok.eos_token_id]
    ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
    scored = torch.tensor([True, False, False, False, False, True, True, True])
    with torch.no_grad():
        logits = reference(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
    n_prompt = inputs["input_ids"].shape[1]
    logp = torch.log_softmax(logits[n_prompt - 1 : -1].double(), -1)
    nll = -logp[torch.arange(len(target)), torch.tensor(target)]
    assert first == pytest.approx(float(nll[scored].mean()), rel=1e-4)
    assert abs(first - float(nll.mean())) > 1e-3  # scoring every token would give another number


def test_question_phrase_is_checked_like_the_caption_phrase():
    from layerwise.decoding.toy_vlm import pope_question
    from layerwise.errors import ParameterError

    assert pope_question("cup", spec=SceneSpec(question_phrase="is there a {}")) == "<image> is there a cup"
    with pytest.raises(ParameterError, match="question_phrase must contain"):
        SceneSpec(question_phrase="is there a cup")
    with pytest.raises(ParameterError, match=r"question_phrase words \['any'\]"):
        SceneSpec(question_phrase="is there any {}")
