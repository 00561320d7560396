"""M3ID + DPO pairs, the TRL wrapper (before/after check of the preference margin), the m3id experiment."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")
from PIL import Image  # noqa: E402

from layerwise.decoding import build_preference_pairs, first_sentence, first_words, m3id_generate, train_dpo  # noqa: E402
from layerwise.decoding.toy_vlm import (  # noqa: E402
    SceneSpec,
    build_processor,
    build_toy_llava,
    caption_prompt,
    render_scene,
    sample_scenes,
)

SPEC = SceneSpec()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prefix_functions():
    assert first_sentence("A dog sits. A cat runs.") == "A dog sits."
    assert first_sentence("Is it 3.5 m tall? Yes.") == "Is it 3.5 m tall?"
    assert first_sentence("no full stop") == "no full stop"
    assert first_words(2)("fork cup tree .") == "fork cup"
    with pytest.raises(ValueError, match="n"):
        first_words(-1)


@pytest.fixture(scope="module")
def setup():
    proc = build_processor(SPEC)
    model = build_toy_llava(SPEC, hidden=32, seed=1)
    scenes = sample_scenes(SPEC, 8, seed=3)
    images = [Image.fromarray(render_scene(SPEC, s, seed=i)) for i, s in enumerate(scenes)]
    return model, proc, images


def test_pairs_are_built_as_specified(setup):
    model, proc, images = setup
    prompts = [caption_prompt()] * len(images)
    kw = {"lambda_": 1.0, "alpha": 1.0}
    rows = build_preference_pairs(
        model, proc, images, prompts, prefix=first_words(1), max_new_tokens=5, drop_ties=False, **kw
    )
    assert len(rows) == len(images)
    chosen = m3id_generate(model, proc, images, prompts, max_new_tokens=5, path="batched", **kw)
    greedy = m3id_generate(model, proc, images, prompts, max_new_tokens=5, alpha=0.0)
    tok = proc.tokenizer
    for row, c, g, img in zip(rows, chosen, greedy, images, strict=True):
        assert row["images"] == [img]
        assert row["prompt"] == tok.bos_token + caption_prompt()
        assert row["chosen"] == " " + " ".join(c.split()) + tok.eos_token
        assert row["rejected"].split()[0] == g.split()[0]  # on-topic prefix from the image-conditioned answer
    # the rejected tail is the image-free model's greedy continuation of prompt-without-image + prefix
    for row, g in zip(rows, greedy, strict=True):
        free = tok(["describe : " + g.split()[0]], return_tensors="pt")
        out = model.generate(**free, max_new_tokens=5, do_sample=False)
        tail = tok.decode(out[0, free["input_ids"].shape[1] :], skip_special_tokens=True)
        assert row["rejected"] == " " + " ".join((g.split()[0] + " " + tail).split()) + tok.eos_token
    with pytest.raises(ValueError, match="images"):
        build_preference_pairs(model, proc, images[:2], prompts)


def _margin(model, proc, rows):
    """Sum over rows of log p(chosen) - log p(rejected) under ``model`` (image and prompt given)."""
    tok = proc.tokenizer
    total = 0.0
    for row in rows:
        for sign, key in ((1, "chosen"), (-1, "rejected")):
            p = proc(
                images=row["images"], text=[row["prompt"]], add_special_tokens=False, return_tensors="pt"
            )
            comp = tok([row[key]], add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = torch.cat([p["input_ids"], comp], dim=1)
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=p["pixel_values"]).logits[0, :-1]
            lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
            total += sign * float(lp[-comp.shape[1] :].sum())
    return total


def test_train_dpo_raises_preference_margin(setup):
    model, proc, images = setup
    model = build_toy_llava(SPEC, hidden=32, seed=2)
    rows = build_preference_pairs(
        model,
        proc,
        images,
        [caption_prompt()] * len(images),
        prefix=first_words(1),
        lambda_=1.0,
        alpha=1.0,
        max_new_tokens=5,
    )
    assert len(rows) >= 4
    before = _margin(model, proc, rows)
    weights = [p.detach().clone() for p in model.parameters()]
    reference = copy.deepcopy(model)
    history = train_dpo(
        model, proc, rows, learning_rate=1e-3, epochs=3, batch_size=4, seed=0, ref_model=reference
    )
    after = _margin(model, proc, rows)
    assert after > before + 1.0  # DPO moves probability from rejected to chosen
    assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
    # The reference stays frozen, and at the first step policy = reference, so the DPO loss is
    # -log sigmoid(0) = log 2 whatever the data (plain fine-tuning on the chosen answers would not be).
    assert all(torch.equal(w, p) for w, p in zip(weights, reference.parameters(), strict=True))
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses and losses[0] == pytest.approx(math.log(2), abs=1e-3)
    with pytest.raises(ValueError, match="rows"):
        train_dpo(model, proc, [])


def test_m3id_experiment_end_to_end(tmp_path):
    from layerwise.experiments import EXPERIMENTS, run_experiment

    assert "m3id" in EXPERIMENTS
    summary = run_experiment(
        "m3id",
        tmp_path,
        scale="quick",
        seeds=(0, 1),
        n_train_scenes=64,
        train_steps=4,
        batch_size=16,
        hidden=32,
        n_test_scenes=6,
        n_dpo_images=8,
        lambdas=(0.3, 1.0),
        dpo_epochs=1.0,
        workers=1,
    )
    out = tmp_path / "m3id"
    files = ("config.json", "summary.json", "results.json", "results.csv", "m3id.png", "m3id_reliance.png")
    for name in files:
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in results["per_seed"]}
    assert methods == {
        "greedy",
        "m3id_default",
        "m3id_lambda=0.3",
        "m3id_lambda=1",
        "m3id_lambda=1_cutoff=0.1",
        "vcd",
        "m3id+dpo_greedy",
    }
    assert {r["seed"] for r in results["per_seed"]} == {0, 1}
    for row in results["per_seed"]:  # the reliance diagnostic, on the greedy rows only
        has = [f"kl_t{t}" in row for t in range(2)]
        assert all(has) if row["method"] == "greedy" else not any(has)
        if row["method"] == "greedy":
            assert row["kl_t0"] >= 0 and 0 <= row["att_t0"] <= 1 + 1e-9
    for method, metrics in results["aggregate"].items():
        keys = ("chair_i", "chair_s", "cover", "pope_accuracy", "pope_yes_ratio", "pope_random_accuracy")
        for key in keys:
            assert 0.0 <= metrics[key]["min"] <= metrics[key]["mean"] <= metrics[key]["max"] <= 1.0, (
                method,
                key,
            )
    assert summary["greedy:chair_s"] == pytest.approx(
        results["aggregate"]["greedy"]["chair_s"]["mean"], abs=1e-4
    )
    assert "m3id_lambda=1_cutoff=0.1:chair_i_std" in summary


def test_m3id_seeds_are_sweep_points_same_numbers_on_every_executor_and_resume(tmp_path, monkeypatch):
    """Each seed of m3id is one point of layerwise.sweep: a process pool gives the rows of the in-process run
    bit for bit, and --resume reads the finished seeds back instead of training again."""
    from layerwise.experiments import m3id, run_experiment
    from layerwise.sweep import sweep_options

    tiny = dict(scale="quick", seeds=(0, 1), n_train_scenes=48, train_steps=3, batch_size=8, hidden=32,
                n_test_scenes=4, n_dpo_images=4, lambdas=(1.0,), dpo_epochs=1.0, n_reliance=2)
    store = tmp_path / "store"
    with sweep_options(store=str(store), progress=False):
        run_experiment("m3id", tmp_path / "a", workers=1, **tiny)  # no executor chosen, 1 worker: in process
    with sweep_options(executor="process", max_workers=2, progress=False):
        run_experiment("m3id", tmp_path / "b", **tiny)
    first = json.loads((tmp_path / "a" / "m3id" / "results.json").read_text())
    pooled = json.loads((tmp_path / "b" / "m3id" / "results.json").read_text())
    assert first["per_seed"] == pooled["per_seed"] and {r["seed"] for r in first["per_seed"]} == {0, 1}
    assert len(list((store / "m3id").glob("*.json"))) == 2  # one file per seed

    def no_training(*args, **kwargs):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr(m3id, "_one_seed", no_training)
    with sweep_options(store=str(store), resume=True, progress=False):
        run_experiment("m3id", tmp_path / "c", workers=1, **tiny)
    resumed = json.loads((tmp_path / "c" / "m3id" / "results.json").read_text())
    assert resumed["per_seed"] == first["per_seed"] and resumed["aggregate"] == first["aggregate"]


def test_m3id_config_sets_the_yes_no_training_mix_and_the_judged_split(tmp_path, monkeypatch):
    """pope_fraction, pope_questions, question_phrase reach the training examples; pope_split is checked."""
    import layerwise.decoding.toy_vlm as toy
    from layerwise.errors import ParameterError
    from layerwise.experiments import m3id, run_experiment

    seen = {}

    class Stop(Exception):
        pass

    def capture(spec, scenes, **kwargs):
        seen.update(kwargs, phrase=spec.question_phrase)
        raise Stop

    monkeypatch.setattr(toy, "make_examples", capture)
    config = m3id.Config(n_train_scenes=4, hidden=16, pope_fraction=0.7, pope_questions=3,
                         question_phrase="is there a {} ?")
    with pytest.raises(Stop):
        m3id._one_seed(config, 0)
    assert (seen["pope_fraction"], seen["questions"], seen["phrase"]) == (0.7, 3, "is there a {} ?")
    with pytest.raises(ParameterError, match="pope_split must be one of"):
        run_experiment("m3id", tmp_path, scale="quick", pope_split="popular")
