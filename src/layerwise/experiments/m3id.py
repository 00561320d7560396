"""m3id: does M3ID (and M3ID + DPO) reduce object hallucination of a VLM? A CPU-scale honest benchmark.

Command::

    layerwise reproduce m3id --scale quick --out results    # ~110 s on 2 cores (4 seeds, 2 processes)
    layerwise reproduce m3id --scale full --out results --executor process   # 5 x 6000 steps: 15 min

Each seed is one point of the sweep runner (:mod:`layerwise.sweep`): ``--executor process|dask|slurm`` and
``--resume`` work, and without an executor the seeds run in ``Config.workers`` spawned processes.

For each seed, a tiny Llava (:mod:`layerwise.decoding.toy_vlm`) is trained from scratch on synthetic scenes
whose captions carry a co-occurrence bias (``fork -> cup``, ``bus -> car``, ``kite -> bird``; the second
object of each pair is drawn at low contrast), with 20% image dropout so that the image-free branch is a
real language prior. On test scenes where the bias is broken we measure

* captioning: CHAIR_i, CHAIR_s, Cover and length (``layerwise.decoding.chair``);
* POPE-style yes/no questions, one present object and one absent object per scene, in POPE's random split
  (any absent object) and its adversarial split (the absent co-occurring partner when there is one):
  accuracy, F1, yes-ratio. The POPE claims are judged on ``Config.pope_split`` (random), and only when
  greedy decoding answers it with accuracy >= 0.8 (the yes/no task is learned).

for greedy decoding, M3ID with the paper's defaults (lambda 0.02, alpha 0.3), a lambda sweep at ``alpha =
sweep_alpha`` (the gate of the paper rarely opens on a toy model whose distributions are confident), and
M3ID + DPO: preference pairs built without labels on fresh training-distribution images (chosen: M3ID with
``dpo_lambda``/``dpo_alpha``; rejected: first word of the greedy caption continued by the image-free model),
trained with TRL's DPOTrainer, then decoded greedily; and, for comparison on the same batched loop, VCD
(Leng et al. 2024: contrast with a diffusion-noised image, alpha 1, beta 0.1, noise step 500). Every
number is a mean and a standard deviation over
seeds, whatever it shows.

Paper (Favero et al., CVPR 2024): on LLaVA 13B, M3ID cuts hallucinated objects by 25% and M3ID + DPO by 28%
in captioning; POPE accuracy +21% / +24%. A third-party LLaVA-1.5 run: CHAIR_s/CHAIR_i 26.2/9.4 -> 21.4/6.3.

The training mix: 70% captions, 30% yes/no examples ("<image> is there a X", the object last), each
asking ten questions about its image with only the answers scored; with one question per example the
answer loss sat at ln 2 for thousands of steps (POPE at chance), see docs/guides/m3id.md.

What we measured (quick scale, 4 seeds of 1000 steps, 2026-12-05, mean ± std): greedy CHAIR_s 0.35 ± 0.05,
CHAIR_i 0.17 ± 0.02, Cover 0.88 ± 0.01; POPE accuracy 0.89 ± 0.02 on the random split (0.79 ± 0.03
adversarial); the paper's defaults change nothing (captions are <= 6 tokens, so the weight exp(0.02 t) - 1
stays below 0.13 and the gate max p < 0.3 rarely opens), neither in captions nor in POPE answers; larger
lambda trades Cover and, with t0 = 4 on yes/no questions, the answer format (weights up to exp(4 lambda) -
1) for little or no CHAIR gain; M3ID + DPO does not move greedy decoding. docs/guides/m3id.md has the
tables and the full scale. The ``m3id-long`` experiment (:mod:`layerwise.experiments.m3id_long`)
repeats the captioning study with 20-50-token captions, where the paper's weight has room to grow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import save_figure, write_csv, write_json
from ..sweep import Point, current_options, run_sweep
from ._base import EXPERIMENTS, Experiment

__all__ = ["Config", "run", "seed_point"]


@dataclass(frozen=True)
class Config:
    """Sizes of the m3id study (see the module docstring)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3)  # 2 workers: 4 seeds take the wall time of 3
    n_train_scenes: int = 3000  # labelled captioning / yes-no training scenes
    train_steps: int = 1000  # AdamW steps of batch_size examples
    # The yes/no task (docs/guides/m3id.md, "POPE is learned at quick scale"): with one "is there a X ?"
    # per example the answer loss sits at ln 2 for thousands of steps; with the object last and ten
    # questions per example (only the answers scored) it is learned: greedy accuracy on the random split
    # 0.88-0.91 on every seed at 1000 steps (0.69-0.86 at 600).
    pope_fraction: float = 0.3  # share of training examples that are yes/no questions (the rest captions)
    pope_questions: int = 10  # questions per yes/no example
    question_phrase: str = "is there a {}"  # SceneSpec.question_phrase: the answer comes right after X
    pope_split: str = "random"  # the POPE split the claims judge ("random" or "adversarial"); both reported
    batch_size: int = 32
    image_dropout: float = 0.2  # fraction of training examples seen without the image
    hidden: int = 64  # text width of the toy Llava
    n_test_scenes: int = 200  # bias-broken test scenes (captioning and POPE)
    max_new_tokens: int = 6
    default_lambda: float = 0.02  # the paper's settings
    default_alpha: float = 0.3
    pope_t0: float = 4.0  # question length in tokens ("is there a X"): t0 for VQA, as the paper does
    lambdas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)  # the sweep, at alpha = sweep_alpha
    sweep_alpha: float = 1.0
    cutoff: tuple[float, float] | None = (1.0, 0.1)  # (lambda, beta): M3ID + VCD plausibility cutoff beta
    n_dpo_images: int = 256  # unlabelled images for M3ID + DPO
    # DPO settings picked on a validation seed (100), not on the reported seeds
    dpo_lambda: float = 1.0
    dpo_alpha: float = 1.0
    dpo_epochs: float = 2.0
    dpo_lr: float = 5e-5
    dpo_beta: float = 0.1
    torch_threads: int = 1  # tiny models: one thread is fastest, and far faster on a shared machine
    # seeds run in parallel processes (1: in this process) when no --executor is chosen; the rows do not
    # depend on it. Each seed is one point of the sweep runner (layerwise.sweep): --executor, --resume
    workers: int = 2
    n_reliance: int = 64  # test images whose greedy captions visual_reliance scores
    device: str = "cpu"  # where the toy Llava trains and decodes (reproduce --device); data drawn on CPU
    vcd: tuple[float, float, int] | None = (1.0, 0.1, 500)  # (alpha, beta, noise step): VCD's defaults


POPE_SPLITS = ("random", "adversarial")


def _pope_items(
    spec: Any, scenes: list[Any], seed: int, split: str = "adversarial"
) -> tuple[list[int], list[str], list[bool]]:
    """Per scene one question about a present object and one about an absent object: for ``split``
    "adversarial" the absent co-occurrence partner of a present object when there is one, for "random" any
    absent object (POPE's two settings; the popular one needs a corpus)."""
    from ..decoding.toy_vlm import pope_question

    rng = random.Random(seed)
    idx, questions, labels = [], [], []
    for i, scene in enumerate(scenes):
        idx.append(i)
        questions.append(pope_question(rng.choice(scene.objects), spec=spec))
        labels.append(True)
        absent = [o for o in spec.objects if o not in scene.objects]
        if split == "adversarial":
            absent = [b for a, b in spec.pairs if a in scene.objects and b not in scene.objects] or absent
        idx.append(i)
        questions.append(pope_question(rng.choice(absent), spec=spec))
        labels.append(False)
    return idx, questions, labels


def _evaluate(
    model: Any,
    proc: Any,
    spec: Any,
    images: list[Any],
    scenes: list[Any],
    pope: tuple,
    *,
    pope_random: tuple | None = None,
    lambda_: float | None,
    alpha: float,
    t0_pope: float,
    max_new_tokens: int,
    plausibility: float | None = None,
    vcd: tuple[float, float, int] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Captioning CHAIR metrics and POPE metrics for one decoding method (lambda_=None: greedy; ``vcd =
    (alpha, beta, noise_step)``: VCD with its noise drawn from ``seed``). ``pope`` holds the adversarial
    items (``pope_*`` keys), ``pope_random`` the random split's (``pope_random_*`` keys)."""
    from ..decoding import chair, m3id_generate, pope_metrics
    from ..decoding.toy_vlm import caption_prompt

    synonyms = {o: [o + "s"] for o in spec.objects}

    def decode(imgs: list[Any], prompts: list[str], t0: float, n_tokens: int) -> list[str]:
        if vcd is not None:
            from ..decoding import vcd_generate

            return vcd_generate(model, proc, imgs, prompts, alpha=vcd[0], beta=vcd[1], noise_step=vcd[2],
                                noise_seed=seed, max_new_tokens=n_tokens, do_sample=False)
        if lambda_ is None:
            inputs = proc(images=imgs, text=prompts, padding=True, padding_side="left", return_tensors="pt")
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            out = model.generate(**inputs, do_sample=False, max_new_tokens=n_tokens)
            return proc.tokenizer.batch_decode(
                out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
        return m3id_generate(
            model,
            proc,
            imgs,
            prompts,
            lambda_=lambda_,
            alpha=alpha,
            t0=t0,
            plausibility=plausibility,
            max_new_tokens=n_tokens,
            do_sample=False,
            path="batched",
        )

    captions = decode(images, [caption_prompt()] * len(images), 0.0, max_new_tokens)
    metrics = chair(captions, [s.objects for s in scenes], synonyms)
    out = {
        "chair_i": metrics["chair_i"],
        "chair_s": metrics["chair_s"],
        "cover": metrics["cover"],
        "length": metrics["length"],
    }
    for prefix, items in (("pope", pope), ("pope_random", pope_random)):
        if items is None:
            continue
        idx, questions, labels = items
        pm = pope_metrics(decode([images[i] for i in idx], questions, t0_pope, 2), labels)
        out.update({f"{prefix}_accuracy": pm["accuracy"], f"{prefix}_f1": pm["f1"],
                    f"{prefix}_yes_ratio": pm["yes_ratio"], f"{prefix}_unparsed": pm["n_unparsed"] / pm["n"]})
    return out


def _trained_toy_world(
    config: Any, spec: Any, seed: int, pope_fraction: float = 0.5, questions: int = 1
) -> tuple[Any, Any, list[Any], list[Any]]:
    """Train a toy Llava of ``config`` (hidden, n_train_scenes, train_steps, batch_size, image_dropout) on
    the scenes of ``spec`` on ``config.device`` (a ``pope_fraction`` of the examples yes/no, each asking
    ``questions`` questions); return ``(processor, model, test scenes, test PIL images)``.

    Every role (model init, scenes, images, examples, training, test set) draws from its own stream derived
    from ``seed``, so studies that share this setup see the same worlds for the same seed.
    """
    from PIL import Image

    from .._device import resolve_device
    from ..decoding.toy_vlm import (
        build_processor,
        build_toy_llava,
        make_examples,
        render_scene,
        sample_scenes,
        train_toy_vlm,
    )

    proc = build_processor(spec)
    model = build_toy_llava(spec, hidden=config.hidden, seed=seed).to(resolve_device(config.device))
    base = 1000 * seed  # distinct, reproducible streams for each seed and role
    train = sample_scenes(spec, config.n_train_scenes, seed=base + 1)
    train_imgs = [render_scene(spec, s, seed=base * 100_000 + i) for i, s in enumerate(train)]
    train_toy_vlm(
        model,
        proc,
        train_imgs,
        make_examples(spec, train, pope_fraction=pope_fraction, questions=questions, seed=base + 2),
        steps=config.train_steps,
        batch_size=config.batch_size,
        image_dropout=config.image_dropout,
        seed=base + 3,
    )
    test = sample_scenes(spec, config.n_test_scenes, test=True, seed=base + 4)
    test_imgs = [
        Image.fromarray(render_scene(spec, s, seed=base * 100_000 + 50_000 + i)) for i, s in enumerate(test)
    ]
    return proc, model, test, test_imgs


def _reliance_by_position(model: Any, proc: Any, images: list[Any], n_tokens: int) -> dict[str, float]:
    """``kl_t<t>`` and ``att_t<t>``: mean KL(p_c || p_u) and attention mass on image tokens at generated
    position t of greedy captions (see :func:`layerwise.decoding.visual_reliance`)."""
    from ..decoding import visual_reliance
    from ..decoding.toy_vlm import caption_prompt

    res = visual_reliance(model, proc, images, [caption_prompt()] * len(images), max_new_tokens=n_tokens)
    kl, att = res.mean_over_batch()
    out = {f"kl_t{t}": float(v) for t, v in enumerate(kl)}
    out.update({f"att_t{t}": float(v) for t, v in enumerate(att)})
    return out


def _reliance_figure(rows: list[dict[str, Any]], n_tokens: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    greedy = [r for r in rows if r["method"] == "greedy"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, prefix, label in (
        (axes[0], "kl_t", "KL(p_c || p_u) [nats]"),
        (axes[1], "att_t", "attention on image"),
    ):
        ts = [t for t in range(n_tokens) if all(f"{prefix}{t}" in r for r in greedy)]
        vals = np.array([[r[f"{prefix}{t}"] for t in ts] for r in greedy])
        if vals.size:
            ax.errorbar(ts, vals.mean(0), yerr=vals.std(0), marker="o", capsize=2)
        ax.set_xlabel("generated position t")
        ax.set_ylabel(label)
    axes[0].set_title(f"reliance on the image (greedy, {len(greedy)} seeds)")
    axes[1].set_title("attention mass on image tokens")
    fig.tight_layout()
    save_figure(fig, path)


def _one_seed(config: Config, seed: int) -> list[dict[str, Any]]:
    import torch
    from PIL import Image

    from ..decoding.dpo import build_preference_pairs, first_words, train_dpo
    from ..decoding.toy_vlm import SceneSpec, caption_prompt, render_scene, sample_scenes

    spec = SceneSpec(question_phrase=config.question_phrase)
    proc, model, test, test_imgs = _trained_toy_world(
        config, spec, seed, pope_fraction=config.pope_fraction, questions=config.pope_questions
    )
    base = 1000 * seed
    pope = _pope_items(spec, test, seed=base + 5)
    kw = {"t0_pope": config.pope_t0, "max_new_tokens": config.max_new_tokens,
          "pope_random": _pope_items(spec, test, seed=base + 8, split="random")}
    methods: list[tuple[str, float | None, float, float | None]] = [
        ("greedy", None, 0.0, None),
        ("m3id_default", config.default_lambda, config.default_alpha, None),
    ] + [(f"m3id_lambda={lam:g}", lam, config.sweep_alpha, None) for lam in config.lambdas]
    if config.cutoff is not None:  # the option beyond the paper: VCD's plausibility cutoff
        lam, beta = config.cutoff
        methods.append((f"m3id_lambda={lam:g}_cutoff={beta:g}", lam, config.sweep_alpha, beta))
    rows = []
    for name, lam, alpha, beta in methods:
        with torch.no_grad():
            m = _evaluate(
                model, proc, spec, test_imgs, test, pope, lambda_=lam, alpha=alpha, plausibility=beta, **kw
            )
        rows.append({"seed": seed, "method": name, "lambda": lam, "alpha": alpha, "cutoff": beta, **m})
    if config.vcd is not None:  # VCD (Leng et al. 2024) on the same batched loop, for comparison
        with torch.no_grad():
            m = _evaluate(model, proc, spec, test_imgs, test, pope, lambda_=None, alpha=0.0, vcd=config.vcd,
                          seed=base + 7, **kw)
        rows.append({"seed": seed, "method": "vcd", "lambda": None, "alpha": config.vcd[0],
                     "cutoff": config.vcd[1], **m})
    rows[0].update(_reliance_by_position(model, proc, test_imgs[: config.n_reliance], config.max_new_tokens))
    # M3ID + DPO on unlabelled images from the training distribution (no captions used).
    dpo_scenes = sample_scenes(spec, config.n_dpo_images, seed=base + 6)
    dpo_imgs = [
        Image.fromarray(render_scene(spec, s, seed=base * 100_000 + 90_000 + i))
        for i, s in enumerate(dpo_scenes)
    ]
    pairs = build_preference_pairs(
        model,
        proc,
        dpo_imgs,
        [caption_prompt()] * len(dpo_imgs),
        prefix=first_words(1),
        lambda_=config.dpo_lambda,
        alpha=config.dpo_alpha,
        max_new_tokens=config.max_new_tokens,
    )
    history = (
        train_dpo(
            model,
            proc,
            pairs,
            beta=config.dpo_beta,
            learning_rate=config.dpo_lr,
            epochs=config.dpo_epochs,
            batch_size=16,
            seed=seed,
        )
        if pairs
        else []
    )
    with torch.no_grad():
        m = _evaluate(model, proc, spec, test_imgs, test, pope, lambda_=None, alpha=0.0, **kw)
    final_loss = next((h["loss"] for h in reversed(history) if "loss" in h), float("nan"))
    rows.append(
        {
            "seed": seed,
            "method": "m3id+dpo_greedy",
            "lambda": None,
            "alpha": None,
            **m,
            "dpo_pairs": len(pairs),
            "dpo_final_loss": final_loss,
        }
    )
    return rows


METRICS = (
    "chair_i",
    "chair_s",
    "cover",
    "length",
    "pope_accuracy",
    "pope_f1",
    "pope_yes_ratio",
    "pope_unparsed",
    "pope_random_accuracy",
    "pope_random_f1",
    "pope_random_yes_ratio",
    "pope_random_unparsed",
)


def _aggregate(
    rows: list[dict[str, Any]], keys: tuple[str, ...] = METRICS
) -> dict[str, dict[str, dict[str, float]]]:
    """method -> metric -> {mean, std (over seeds, ddof=1; 0 for one seed), min, max}.

    A metric that a method's rows lack is left out for that method.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        out[method] = {}
        for key in keys:
            vals = [float(r[key]) for r in sel if key in r]
            if not vals:
                continue
            out[method][key] = {
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
    return out


def _figure(agg: dict, config: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = list(agg)
    for ax, keys, title in (
        (axes[0], ("chair_s", "chair_i", "cover"), "captioning"),
        (axes[1], ("pope_random_accuracy", "pope_accuracy", "pope_yes_ratio"), "POPE (random, adversarial)"),
    ):
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            means = [agg[n][key]["mean"] for n in names]
            stds = [agg[n][key]["std"] for n in names]
            ax.bar([i + j * width for i in range(len(names))], means, width, yerr=stds, label=key, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{title}: mean ± std over {len(config.seeds)} seeds")
        ax.legend(fontsize=7)
    ax = axes[2]
    lams = list(config.lambdas)
    for key in ("chair_s", "cover"):
        ax.errorbar(
            lams,
            [agg[f"m3id_lambda={lam:g}"][key]["mean"] for lam in lams],
            yerr=[agg[f"m3id_lambda={lam:g}"][key]["std"] for lam in lams],
            marker="o",
            label=key,
            capsize=2,
        )
        ax.axhline(agg["greedy"][key]["mean"], ls="--", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xlabel(f"lambda (alpha = {config.sweep_alpha:g}); dashed: greedy")
    ax.set_title("lambda sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """Spawned workers inherit ``OMP/MKL/OPENBLAS_NUM_THREADS = threads``: no OpenMP or BLAS pool sized to
    every core is created in a worker before ``torch.set_num_threads`` runs (the parent's values return)."""
    before = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: str(threads) for k in _THREAD_VARS})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def thread_env_point(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """Sweep point that reports the thread variables its worker sees and its process id (tests
    :func:`seed_sweep`)."""
    return {"pid": os.getpid(), **{k: os.environ.get(k) for k in _THREAD_VARS}}


def point_config(config: Any, drop: Sequence[str] = ("seeds", "workers")) -> dict[str, Any]:
    """The JSON config of a seed's sweep point: every field of ``config`` but ``drop`` (the seed list and
    the worker count do not change a seed's rows, so adding a seed reuses the finished ones)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in drop}


def tuples(value: Any) -> Any:
    """JSON lists back to the tuples of the frozen configs (recursively; dicts keep their keys)."""
    if isinstance(value, list):
        return tuple(tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    return value


def seed_sweep(name: str, fn: Any, points: list[Point], config: Any, out: Path) -> list[dict[str, Any]]:
    """Results of ``fn`` at ``points`` on the sweep runner (:mod:`layerwise.sweep`), in point order.

    The executor, ``--resume`` and the point folder come from :func:`layerwise.sweep.current_options`
    (``layerwise reproduce --executor/--resume``); when none is chosen (the in-process default) and
    ``config.workers > 1``, the points run in ``config.workers`` spawned processes. Every point runs with
    ``config.torch_threads`` torch threads, and workers start with the OpenMP/BLAS thread variables set to
    it. Each point draws from its own seeded streams and its result travels as JSON whatever the
    executor, so the numbers do not depend on it (tested).
    """
    opts = current_options()
    if opts.executor == "inprocess" and config.workers > 1 and len(points) > 1:
        opts = dataclasses.replace(opts, executor="process", max_workers=config.workers)
    opts = dataclasses.replace(opts, threads=config.torch_threads)
    folder = opts.folder_for(name, Path(out) / "points")
    env = _thread_env(config.torch_threads) if opts.executor != "inprocess" else contextlib.nullcontext()
    with env:
        return run_sweep(fn, points, folder, opts).results()


def seed_point(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """Sweep point of the m3id study: ``{"rows": [...]}``, every row of ``seed`` (one per decoding method).

    ``config`` is :func:`point_config` of a :class:`Config` (JSON: tuples as lists).
    """
    return {"rows": _one_seed(Config(**tuples(config)), seed)}


def _run_seeds(config: Config, out: Path) -> list[dict[str, Any]]:
    """Rows of every seed of ``config``, each seed one sweep point (see :func:`seed_sweep`)."""
    common = point_config(config)
    results = seed_sweep("m3id", seed_point, [Point(common, seed) for seed in config.seeds], config, out)
    return [row for res in results for row in res["rows"]]


def run(config: Config, out: Path) -> dict[str, Any]:
    """Run the study for every seed; write results.json, results.csv and m3id.png into ``out``."""
    from ..decoding._hf import require

    require("transformers", "hf")
    require("trl", "dpo")

    if config.pope_split not in POPE_SPLITS:
        from ..errors import ParameterError

        raise ParameterError(f"pope_split must be one of {POPE_SPLITS}, got {config.pope_split!r}")
    out = Path(out)
    rows = _run_seeds(config, out)
    agg = _aggregate(rows)
    write_csv(out / "results.csv", rows)
    write_json(out / "results.json", {"per_seed": rows, "aggregate": agg})
    _figure(agg, config, out / "m3id.png")
    _reliance_figure(rows, config.max_new_tokens, out / "m3id_reliance.png")
    summary: dict[str, Any] = {}
    shown = ["greedy", "m3id_default", f"m3id_lambda={config.dpo_lambda:g}", "vcd", "m3id+dpo_greedy"]
    if config.cutoff is not None:
        shown.insert(3, f"m3id_lambda={config.cutoff[0]:g}_cutoff={config.cutoff[1]:g}")
    for method in shown:
        if method in agg:
            for key in ("chair_s", "chair_i", "cover", "pope_accuracy", "pope_random_accuracy"):
                summary[f"{method}:{key}"] = round(agg[method][key]["mean"], 4)
                summary[f"{method}:{key}_std"] = round(agg[method][key]["std"], 4)
    from ._m3id_report import m3id_report

    return {**summary, **m3id_report(config, rows, agg)}  # claims, tables, figures, text for the report


EXPERIMENTS.register(
    "m3id",
    Experiment(
        name="m3id",
        run=run,
        scales={
            "quick": Config(),
            "full": Config(
                seeds=(0, 1, 2, 3, 4),
                n_train_scenes=20000,
                train_steps=6000,
                n_test_scenes=1000,
                n_dpo_images=1000,
            ),
        },
        description="M3ID vs greedy vs M3ID+DPO on a toy Llava: CHAIR, Cover, POPE over seeds",
        extras=("hf", "dpo"),
        systems=("M3ID",),
    ),
)
