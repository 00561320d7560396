"""The long-caption toy world (SceneSpec's min_objects, caption_phrase, shuffle_captions) and m3id-long."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from layerwise.decoding.toy_vlm import Scene, SceneSpec, caption, make_examples, sample_scenes  # noqa: E402

LONG = SceneSpec(
    objects=("cat", "dog", "bus", "car", "tree", "kite", "bird", "fork", "cup", "boat", "knife", "spoon"),
    pairs=(("fork", "cup"), ("bus", "car"), ("kite", "bird"), ("knife", "spoon")),
    min_objects=5,
    max_objects=8,
    caption_phrase="there is a {}",
    shuffle_captions=True,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_long_captions_list_every_object_once_in_varied_orders():
    scenes = sample_scenes(LONG, 300, seed=0)
    examples = make_examples(LONG, scenes, pope_fraction=0.0, seed=1)
    canonical = 0
    for i, prompt, target in examples:
        words = target.split()
        assert prompt == "<image> describe :" and words[-1] == "."
        named = words[3:-1:4]  # "there is a X there is a Y ... ."
        assert words[:-1] == [w for o in named for w in ("there", "is", "a", o)]
        assert sorted(named) == sorted(scenes[i].objects)
        canonical += tuple(named) == scenes[i].objects
    assert canonical < 0.05 * len(examples)  # shuffled: 5+ objects are rarely drawn in canonical order
    lengths = [len(t.split()) for _, _, t in examples]
    assert min(lengths) >= 4 * (LONG.min_objects - len(LONG.pairs)) + 1 and max(lengths) <= 4 * 12 + 1
    assert sum(lengths) / len(lengths) > 25  # long enough for exp(lambda t) - 1 to grow


def test_cooccurrence_rate_as_configured():
    for test, p in ((False, LONG.p_cooccur), (True, LONG.p_cooccur_test)):
        scenes = sample_scenes(LONG, 3000, test=test, seed=2)
        for a, b in LONG.pairs:
            with_a = [s for s in scenes if a in s.objects]
            rate = sum(b in s.objects for s in with_a) / len(with_a)
            assert len(with_a) > 1000 and rate == pytest.approx(p, abs=0.05), (test, a, b)
        sizes = [len(s.objects) for s in scenes]
        assert min(sizes) >= LONG.min_objects - len(LONG.pairs) and max(sizes) <= LONG.max_objects + 4


def test_default_spec_is_unchanged_and_bad_settings_fail():
    spec = SceneSpec()
    scene = Scene(("fork", "cup"), (0, 1))
    assert caption(scene) == caption(scene, spec) == "fork cup ."
    assert caption(scene, LONG, order=[1, 0]) == "there is a cup there is a fork ."
    scenes = sample_scenes(spec, 50, seed=0)
    examples = make_examples(spec, scenes, pope_fraction=0.0, seed=0)
    assert all(t.split()[:-1] == list(scenes[i].objects) for i, _, t in examples)  # canonical order
    with pytest.raises(ValueError, match="permutation"):
        caption(scene, order=[0, 0])
    with pytest.raises(ValueError, match="vocabulary"):
        SceneSpec(caption_phrase="here is a {}")
    with pytest.raises(ValueError, match="once"):
        SceneSpec(caption_phrase="a")
    with pytest.raises(ValueError, match="min_objects"):
        SceneSpec(min_objects=4)
    with pytest.raises(ValueError, match="cells of the grid"):
        SceneSpec(objects=tuple(f"o{i}" for i in range(20)), pairs=(("o0", "o1"),), max_objects=16)
    SceneSpec(objects=tuple(f"o{i}" for i in range(20)), pairs=(("o0", "o1"),), max_objects=15)  # fits


TINY_LONG = dict(
    seeds=(0, 1),
    n_train_scenes=32,
    train_steps=3,
    batch_size=8,
    hidden=32,
    n_test_scenes=6,
    n_reliance=4,
    max_new_tokens=10,
    chosen=(0.5, 1.0),
)


def test_m3id_long_experiment_end_to_end(tmp_path):
    from layerwise.experiments import EXPERIMENTS, run_experiment

    assert "m3id-long" in EXPERIMENTS
    run_experiment("m3id-long", tmp_path, workers=1, **TINY_LONG)
    # the same study with the seeds in two spawned processes gives the same numbers
    run_experiment("m3id-long", tmp_path / "pool", workers=2, **TINY_LONG)
    pooled = json.loads((tmp_path / "pool" / "m3id-long" / "results.json").read_text())
    out = tmp_path / "m3id-long"
    for name in ("config.json", "summary.json", "results.json", "results.csv", "m3id_long.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert pooled["per_seed"] == results["per_seed"]
    assert pooled["reliance_by_object"] == results["reliance_by_object"]
    agg = results["aggregate"]
    assert set(agg) == {"greedy", "m3id_default", "m3id_chosen"}
    assert results["chosen"] == [0.5, 1.0]
    assert agg["greedy"]["changed"]["max"] == 0.0 and "gate" not in agg["m3id_default"]
    for metrics in agg.values():
        for key in ("chair_i", "chair_s", "cover", "partner", "changed", "pope_accuracy"):
            assert 0.0 <= metrics[key]["min"] <= metrics[key]["mean"] <= metrics[key]["max"] <= 1.0
    assert 0.0 <= agg["greedy"]["gate"]["mean"] <= 1.0
    assert 1.0 <= agg["greedy"]["tokens"]["mean"] <= 10.0
    paired = results["paired_vs_greedy"]
    assert set(paired) == set(agg) - {"greedy"}
    for method, metrics in paired.items():
        for key, d in metrics.items():  # the mean paired difference is the difference of the means
            assert d["mean"] == pytest.approx(agg[method][key]["mean"] - agg["greedy"][key]["mean"], abs=1e-9)
            assert 0 <= d["n_lower"] <= 2
    assert len(results["reliance_by_object"]) == 2  # one curve per seed
    for curve in results["reliance_by_object"]:
        assert len(curve["kl"]) == len(curve["attention"]) == len(curve["count"])
        assert all(v >= 0 for v in curve["kl"]) and all(0 <= a <= 1 + 1e-9 for a in curve["attention"])
        assert curve["count"] == sorted(curve["count"], reverse=True)  # fewer captions reach later slots


def test_select_setting_rule():
    from layerwise.experiments.m3id_long import select_setting

    rows = [
        {"method": "greedy", "chair_i": 0.30, "cover": 0.80},
        {"method": "a", "lambda": 0.1, "alpha": 0.6, "chair_i": 0.10, "cover": 0.70},  # Cover drops 0.10
        {"method": "b", "lambda": 0.05, "alpha": 0.9, "chair_i": 0.25, "cover": 0.76},  # allowed, best
        {"method": "c", "lambda": 0.02, "alpha": 0.3, "chair_i": 0.29, "cover": 0.80},
    ]
    assert select_setting(rows, max_cover_drop=0.05) == (0.05, 0.9)
    assert select_setting(rows, max_cover_drop=0.2) == (0.1, 0.6)
    assert select_setting(rows[:2], max_cover_drop=0.05) == (0.02, 0.3)  # none allowed: the paper's defaults


def test_weak_last_lists_faint_partners_after_the_others():
    from layerwise.decoding.toy_vlm import make_examples, sample_scenes

    spec = SceneSpec(
        objects=("cat", "dog", "bus", "car", "fork", "cup"),
        pairs=(("fork", "cup"), ("bus", "car")),
        min_objects=3,
        max_objects=5,
        caption_phrase="{}",
        shuffle_captions=True,
        weak_last=True,
    )
    scenes = sample_scenes(spec, 200, seed=0)
    orders = set()
    for _, _prompt, target in make_examples(spec, scenes, pope_fraction=0.0, seed=1):
        words = target.split()[:-1]
        weak = [w in spec.weak for w in words]
        assert weak == sorted(weak), target  # never a salient object after a faint one
        orders.add(tuple(w for w in words if w not in spec.weak))
    assert len(orders) > 20  # the salient objects are still shuffled


def test_spawned_seed_workers_get_one_thread_pools_and_the_parent_env_returns(monkeypatch, tmp_path):
    """seed_sweep with workers > 1 (no executor chosen): the points run in spawned processes that see
    OMP/MKL/OPENBLAS_NUM_THREADS = torch_threads (no thread pool sized to every core is created before
    torch.set_num_threads), and the parent's environment is restored."""
    import os
    from types import SimpleNamespace

    from layerwise.experiments.m3id import seed_sweep, thread_env_point
    from layerwise.sweep import Point, sweep_options

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    config = SimpleNamespace(workers=2, torch_threads=1)
    points = [Point({"n": n}, 0) for n in range(3)]
    with sweep_options(progress=False):
        seen = seed_sweep("env", thread_env_point, points, config, tmp_path)
    pids = {r["pid"] for r in seen}
    assert [{k: v for k, v in r.items() if k != "pid"} for r in seen] == [
        dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), "1")] * 3
    assert os.getpid() not in pids  # they did run in worker processes
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ


def test_yes_no_questions_on_a_scene_with_every_object_ask_about_a_present_one():
    # m3id-long's full scale (pope_fraction 0.2) crashed at seed 7 on a training scene that held all 12
    # objects: an "absent object" question had an empty pool. Such a scene now gets a present-object
    # question, and every other scene's example is the one the same draws gave before.
    from layerwise.decoding.toy_vlm import pope_question

    full = Scene(objects=LONG.objects, cells=tuple(range(len(LONG.objects))))
    one_missing = Scene(objects=LONG.objects[1:], cells=tuple(range(1, len(LONG.objects))))
    empty = Scene(objects=(), cells=())
    others = sample_scenes(LONG, 40, seed=3)
    for seed in range(20):
        with_full = make_examples(LONG, [full, *others, empty], pope_fraction=1.0, seed=seed)
        i, prompt, target = with_full[0]
        assert i == 0 and target == "yes ."
        assert prompt in {pope_question(o) for o in LONG.objects}
        assert with_full[-1][2] == "no ."  # nothing present: only an absent object can be asked about
        # The full scene takes the same number of draws as a scene with an absent object, so the
        # questions of the scenes after it do not move.
        with_missing = make_examples(LONG, [one_missing, *others, empty], pope_fraction=1.0, seed=seed)
        assert with_full[1:] == with_missing[1:]
