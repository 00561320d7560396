"""m3id-long: M3ID in a toy world where the paper's premise holds, over 5 seeds, with its diagnostic.

Command::

    layerwise reproduce m3id-long --scale quick --out results    # ~80 s on 2 cores (5 seeds, 3 processes)
    layerwise reproduce m3id-long --scale full --out results --executor process   # 8 seeds: ~14 min

Each seed (and the validation run) is one point of the sweep runner (:mod:`layerwise.sweep`), so
``--executor`` and ``--resume`` work; without an executor the seeds run in ``Config.workers`` processes.

The paper (Favero et al., CVPR 2024, Sec. 3, Fig. 2) rests on a premise: as a caption grows, the model's
reliance on the image fades and the language prior takes over, and hallucinations come from that prior.
This study first *measures* the premise with :func:`layerwise.decoding.visual_reliance` (``KL(p_c || p_u)``
between the next-token distributions with and without the image, and the attention mass on image tokens)
at each object a greedy caption names, then compares greedy decoding with M3ID.

The toy world (:mod:`layerwise.decoding.toy_vlm`): 12 object kinds, 5-8 per scene, each written "there is
a <object>" (20-50-token captions); four co-occurrence pairs (A, B) with B joining A in 90% of training
scenes and 50% of test scenes, B drawn at low contrast under pixel noise; 20% of training examples without
the image, so the image-free branch is a real language prior; 20% yes/no questions (POPE).

Why ``weak_last`` (a change of the toy, measured on validation seed 100 before any test seed was run): in
the previous version the objects were listed in a uniformly random order, and the diagnostic showed the
opposite of the premise there: KL at the k-th named object *grew* with k (0.11 nats at the first object,
0.6 at the ninth), because each named object removes a candidate and the image has to single out the rest.
Real captions name salient objects first and small or faint ones later; with the faint partners listed last
(``SceneSpec(weak_last=True)``), the KL peaks around the fourth object and then falls by an order of
magnitude, and the attention mass on image tokens decays steadily: the premise holds, and that is where
the prior names absent partners (greedy partner hallucination about 0.9 on the validation seed).

Methods, per seed (same trained model and test scenes): greedy; M3ID at the paper's defaults (lambda 0.02,
alpha 0.3); and M3ID at ``chosen`` = (lambda, alpha), picked on the validation seed (never a test seed) from
the grid ``grid_lambdas x grid_alphas`` by the rule fixed here: the lowest CHAIR_i among settings whose Cover
is at most ``max_cover_drop`` below greedy's. Quick scale uses the stored choice (from a validation run with
this very config, numbers in ``VALIDATION_NOTE``); ``select_on_validation=True`` (full scale) reruns the grid.
Metrics: CHAIR_s, CHAIR_i, Cover, length, partner (share of test scenes with A present and B absent whose
caption names B), POPE accuracy/F1 (adversarial, t0 = question length), and the per-seed paired difference
from greedy with a paired t-test across seeds.

Reproducibility: every number is bit-identical across runs on one machine (same CPU instruction set, torch
and transformers versions, 1 torch thread per seed). Across machines, float32 training differs in the last
bits from the first steps on (MKL and oneDNN choose AVX2 or AVX-512 kernels by CPU), which over hundreds of
steps becomes a different trained model: expect differences within the seed-to-seed spread. Setting
``MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` before the run pins the kernels for
comparisons across x86 machines.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._io import save_figure, write_csv, write_json
from ..decoding.toy_vlm import SceneSpec
from ..sweep import Point
from ._base import EXPERIMENTS, Experiment
from .m3id import _aggregate, _pope_items, _trained_toy_world, point_config, seed_sweep, tuples

__all__ = ["Config", "run", "select_setting", "seed_point"]

VALIDATION_NOTE = (
    "validation seed 100, quick config (100 test scenes): greedy CHAIR_i 0.270, Cover 0.789, partner 0.917; "
    "M3ID (lambda, alpha) -> CHAIR_i / Cover / partner: (0.02, 0.3) 0.273/0.779/0.908, (0.05, 0.6) "
    "0.245/0.742/0.734 [chosen: Cover drop 0.047 <= 0.05], (0.05, 0.9) 0.238/0.731/0.651 [Cover drop 0.058], "
    "(0.1, 0.6) 0.174/0.557/0.275, (0.2, 0.9) 0.113/0.377/0.110"
)


@dataclass(frozen=True)
class Config:
    """Sizes of the m3id-long study (see the module docstring)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    validation_seed: int = 100  # settings are chosen here, never on the reported seeds
    scene: SceneSpec = SceneSpec(
        objects=("cat", "dog", "bus", "car", "tree", "kite", "bird", "fork", "cup", "boat", "knife", "spoon"),
        pairs=(("fork", "cup"), ("bus", "car"), ("kite", "bird"), ("knife", "spoon")),
        min_objects=5,
        max_objects=8,
        caption_phrase="there is a {}",
        shuffle_captions=True,
        weak_last=True,
    )
    n_train_scenes: int = 2000
    train_steps: int = 700
    batch_size: int = 32
    image_dropout: float = 0.2
    pope_fraction: float = 0.0  # yes/no questions in training (full: 0.2; quick: captioning only)
    hidden: int = 48
    n_test_scenes: int = 100
    max_new_tokens: int = 64
    t0_pope: float = 5.0  # "is there a X ?": the question length, as the paper does for VQA
    default_lambda: float = 0.02  # the paper's settings
    default_alpha: float = 0.3
    chosen: tuple[float, float] = (0.05, 0.6)  # (lambda, alpha) from the validation seed, see VALIDATION_NOTE
    select_on_validation: bool = False
    grid_lambdas: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    grid_alphas: tuple[float, ...] = (0.3, 0.6, 0.9)
    max_cover_drop: float = 0.05
    n_reliance: int = 48  # test scenes whose greedy captions are scored by visual_reliance
    device: str = "cpu"  # where the toy Llava trains and decodes (reproduce --device); data drawn on CPU
    # seeds run in parallel processes (1: in this process) when no --executor is chosen; results do not
    # depend on it. 3 processes on 2 cores keep both cores busy to the end (2 would leave one idle while
    # the fifth seed runs alone). Each seed is one point of the sweep runner: --executor, --resume
    workers: int = 3
    torch_threads: int = 1


METRICS = (
    "chair_s",
    "chair_i",
    "cover",
    "length",
    "partner",
    "changed",
    "gate",
    "tokens",
    "pope_accuracy",
    "pope_f1",
    "pope_yes_ratio",
)
PAIRED = ("chair_s", "chair_i", "cover", "partner", "pope_accuracy")


def select_setting(rows: Sequence[dict[str, Any]], max_cover_drop: float) -> tuple[float, float]:
    """The rule: lowest CHAIR_i among M3ID rows whose Cover is >= greedy's minus ``max_cover_drop``
    (ties: the smaller lambda, then the smaller alpha); the paper's defaults if none qualifies."""
    greedy = next(r for r in rows if r["method"] == "greedy")
    ok = [r for r in rows if r["method"] != "greedy" and r["cover"] >= greedy["cover"] - max_cover_drop]
    if not ok:
        return (0.02, 0.3)
    best = min(ok, key=lambda r: (r["chair_i"], r["lambda"], r["alpha"]))
    return (best["lambda"], best["alpha"])


def _greedy(model: Any, proc: Any, images: list[Any], prompts: list[str], n: int, alpha: float) -> tuple:
    """Greedy captions, their token counts, and the fraction of generated tokens with ``max p < alpha``."""
    import torch

    inputs = proc(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=n, output_scores=True, return_dict_in_generate=True
    )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    eos = model.generation_config.eos_token_id
    ended = (new == eos).long().cumsum(dim=1)
    active = (ended - (new == eos).long()) == 0  # tokens up to and including the first <eos>
    maxp = torch.stack([s.float().softmax(-1).max(-1).values for s in out.scores], dim=1)  # (batch, steps)
    gate = ((maxp < alpha) & active).sum().item() / active.sum().item()
    tokens = active.sum(dim=1).float().mean().item()
    return proc.tokenizer.batch_decode(new, skip_special_tokens=True), tokens, gate


def _reliance_by_object(model: Any, proc: Any, spec: SceneSpec, images: list[Any], n_tokens: int) -> dict:
    """Mean KL(p_c || p_u) and image-attention mass at the k-th object a greedy caption names (k = 0, 1..),
    and the number of captions reaching slot k."""
    from ..decoding import visual_reliance
    from ..decoding.toy_vlm import caption_prompt

    res = visual_reliance(model, proc, images, [caption_prompt()] * len(images), max_new_tokens=n_tokens)
    ids = {proc.tokenizer.convert_tokens_to_ids(o) for o in spec.objects}
    kl: list[list[float]] = []
    att: list[list[float]] = []
    for i in range(res.tokens.shape[0]):
        k = 0
        for t in range(res.tokens.shape[1]):
            if not res.valid[i, t]:
                break
            if int(res.tokens[i, t]) in ids:
                if k == len(kl):
                    kl.append([])
                    att.append([])
                kl[k].append(float(res.kl[i, t]))
                att[k].append(float(res.image_attention[i, t]))
                k += 1
    return {
        "kl": [statistics.fmean(v) for v in kl],
        "attention": [statistics.fmean(v) for v in att],
        "count": [len(v) for v in kl],
    }


def _one_seed(
    config: Config, seed: int, settings: tuple[tuple[str, float, float], ...], reliance: bool = True
) -> dict[str, Any]:
    """Train the toy for ``seed``; score greedy and every (name, lambda, alpha) in ``settings``."""
    import torch

    from ..decoding import chair, extract_objects, m3id_generate, pope_metrics
    from ..decoding.toy_vlm import caption_prompt

    spec = config.scene
    proc, model, test, imgs = _trained_toy_world(config, spec, seed, pope_fraction=config.pope_fraction)
    prompts = [caption_prompt()] * len(imgs)
    synonyms = {o: [o + "s"] for o in spec.objects}
    risky = [
        (i, b) for i, s in enumerate(test) for a, b in spec.pairs if a in s.objects and b not in s.objects
    ]
    pope_idx, pope_q, pope_labels = _pope_items(spec, test, seed=1000 * seed + 5)
    pope_imgs = [imgs[i] for i in pope_idx]

    def scores(captions: list[str], reference: list[str]) -> dict[str, float]:
        m = chair(captions, [s.objects for s in test], synonyms)
        found = [extract_objects(c, synonyms) for c in captions]
        return {
            "chair_s": m["chair_s"],
            "chair_i": m["chair_i"],
            "cover": m["cover"],
            "length": m["length"],
            "partner": sum(b in found[i] for i, b in risky) / len(risky) if risky else 0.0,
            "changed": sum(c != r for c, r in zip(captions, reference, strict=True)) / len(captions),
        }

    def pope(answers: list[str]) -> dict[str, float]:
        pm = pope_metrics(answers, pope_labels)
        return {"pope_accuracy": pm["accuracy"], "pope_f1": pm["f1"], "pope_yes_ratio": pm["yes_ratio"]}

    with torch.no_grad():
        greedy, tokens, gate = _greedy(
            model, proc, imgs, prompts, config.max_new_tokens, config.default_alpha
        )
        answers, _, _ = _greedy(model, proc, pope_imgs, pope_q, 2, config.default_alpha)
    rows = [
        {
            "seed": seed,
            "method": "greedy",
            "lambda": None,
            "alpha": None,
            **scores(greedy, greedy),
            **pope(answers),
            "gate": gate,
            "tokens": tokens,
        }
    ]
    for name, lam, alpha in settings:
        with torch.no_grad():
            captions = m3id_generate(
                model,
                proc,
                imgs,
                prompts,
                lambda_=lam,
                alpha=alpha,
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                path="batched",
            )
            answers = m3id_generate(
                model,
                proc,
                pope_imgs,
                pope_q,
                lambda_=lam,
                alpha=alpha,
                t0=config.t0_pope,
                max_new_tokens=2,
                do_sample=False,
                path="batched",
            )
        rows.append(
            {
                "seed": seed,
                "method": name,
                "lambda": lam,
                "alpha": alpha,
                **scores(captions, greedy),
                **pope(answers),
            }
        )
    out: dict[str, Any] = {"rows": rows}
    if reliance:
        out["reliance"] = _reliance_by_object(
            model, proc, spec, imgs[: config.n_reliance], config.max_new_tokens
        )
    return out


def seed_point(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """Sweep point of m3id-long: :func:`_one_seed` of ``seed`` with the point's ``settings`` and
    ``reliance``; ``config`` holds them and every field of :class:`Config` but ``seeds`` and ``workers``
    (JSON: tuples as lists, the scene as a dict)."""
    cfg = tuples(config)
    settings, reliance = cfg.pop("settings"), cfg.pop("reliance")
    cfg["scene"] = SceneSpec(**cfg["scene"])
    return _one_seed(Config(**cfg), seed, settings, reliance)


def _run_points(config: Config, points: list[tuple[int, tuple, bool]], out: Path) -> list[dict[str, Any]]:
    """``_one_seed`` for each (seed, settings, reliance) point on the sweep runner (see
    :func:`layerwise.experiments.m3id.seed_sweep`: ``config.workers`` processes unless an executor is
    chosen)."""
    common = point_config(config)
    pts = [Point({**common, "settings": settings, "reliance": reliance}, seed)
           for seed, settings, reliance in points]
    return seed_sweep("m3id-long", seed_point, pts, config, out)


def _paired(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> metric -> mean, std, n_lower and the paired t-test p-value across seeds of
    (method - greedy on the same seed and test scenes)."""
    from scipy import stats

    greedy = {r["seed"]: r for r in rows if r["method"] == "greedy"}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "greedy"):
        sel = [r for r in rows if r["method"] == method]
        out[method] = {}
        for key in PAIRED:
            d = [r[key] - greedy[r["seed"]][key] for r in sel]
            p = float("nan")
            if len(d) > 1 and statistics.stdev(d) > 0:
                p = float(
                    stats.ttest_rel([r[key] for r in sel], [greedy[r["seed"]][key] for r in sel]).pvalue
                )
            out[method][key] = {
                "mean": statistics.fmean(d),
                "std": statistics.stdev(d) if len(d) > 1 else 0.0,
                "n_lower": sum(x < 0 for x in d),
                "p_paired_t": p,
            }
    return out


def _decay_ratio(curve: dict[str, list]) -> float:
    """KL at the last object slot that at least half the captions reach, over the largest slot KL."""
    n = curve["count"][0] if curve["count"] else 0
    slots = [k for k, c in enumerate(curve["count"]) if c >= n / 2]
    if not slots or max(curve["kl"]) <= 0:
        return float("nan")
    return curve["kl"][slots[-1]] / max(curve["kl"])


def _figure(agg: dict, curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, key, label in (
        (axes[0], "kl", "KL(p_c || p_u) [nats]"),
        (axes[1], "attention", "attention on image"),
    ):
        for curve in curves:
            ax.plot(range(len(curve[key])), curve[key], color="0.75", lw=0.8)
        n = min(len(c[key]) for c in curves)
        if n == 0:  # no caption named an object (an untrained model)
            continue
        stack = np.array([c[key][:n] for c in curves])
        ax.errorbar(
            range(n),
            stack.mean(0),
            yerr=stack.std(0),
            marker="o",
            capsize=2,
            color="C0",
            label=f"mean +- std over {len(curves)} seeds",
        )
        ax.set_xlabel("k-th object named by the greedy caption")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0].set_title("reliance on the image along the caption")
    axes[1].set_title("attention mass on image tokens")
    ax = axes[2]
    names = list(agg)
    keys = ("chair_s", "chair_i", "cover", "partner", "pope_accuracy")
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        means = [agg[n][key]["mean"] for n in names]
        stds = [agg[n][key]["std"] for n in names]
        ax.bar([i + j * width for i in range(len(names))], means, width, yerr=stds, label=key, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, fontsize=8)
    ax.set_title("test scenes: mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def run(config: Config, out: Path) -> dict[str, Any]:
    """Validation (optional), then every seed; write results.json/.csv and m3id_long.png into ``out``."""
    from ..decoding._hf import require

    require("transformers", "hf")
    out = Path(out)
    validation: dict[str, Any] | None = None
    chosen = config.chosen
    if config.select_on_validation:
        grid = tuple(
            (f"grid_lambda={lam:g}_alpha={a:g}", lam, a)
            for lam in config.grid_lambdas
            for a in config.grid_alphas
        )
        validation = _run_points(replace(config, workers=1), [(config.validation_seed, grid, False)], out)[0]
        chosen = select_setting(validation["rows"], config.max_cover_drop)
    settings = (
        ("m3id_default", config.default_lambda, config.default_alpha),
        ("m3id_chosen", chosen[0], chosen[1]),
    )
    results = _run_points(config, [(seed, settings, True) for seed in config.seeds], out)
    rows = [r for res in results for r in res["rows"]]
    curves = [res["reliance"] for res in results]
    agg = _aggregate(rows, METRICS)
    paired = _paired(rows)
    ratios = [_decay_ratio(c) for c in curves]
    write_csv(out / "results.csv", rows)
    write_json(
        out / "results.json",
        {
            "per_seed": rows,
            "aggregate": agg,
            "paired_vs_greedy": paired,
            "chosen": chosen,
            "chosen_on": "validation run of this config" if validation else VALIDATION_NOTE,
            "validation_rows": validation["rows"] if validation else None,
            "reliance_by_object": curves,
            "reliance_decay_ratio": ratios,
        },
    )
    _figure(agg, curves, out / "m3id_long.png")
    summary: dict[str, Any] = {
        "greedy_chair_i": round(agg["greedy"]["chair_i"]["mean"], 4),
        "chosen_chair_i": round(agg["m3id_chosen"]["chair_i"]["mean"], 4),
        "chosen_lambda": chosen[0],
        "chosen_alpha": chosen[1],
        "reliance_decay_ratio": round(statistics.fmean(ratios), 3),
        "paper_weight_at_mean_end": round(
            math.expm1(config.default_lambda * (agg["greedy"]["tokens"]["mean"] - 1)), 3
        ),
    }
    from ._m3id_report import m3id_long_report

    return {**summary, **m3id_long_report(config, rows, agg, paired, ratios, chosen)}


EXPERIMENTS.register(
    "m3id-long",
    Experiment(
        name="m3id-long",
        run=run,
        scales={
            "quick": Config(),
            "full": Config(
                seeds=tuple(range(8)),
                n_train_scenes=8000,
                train_steps=3000,
                hidden=64,
                pope_fraction=0.2,
                n_test_scenes=500,
                n_reliance=128,
                select_on_validation=True,
            ),
        },
        description="M3ID where reliance on the image fades: diagnostic, greedy vs M3ID over 5 seeds",
        extras=("hf",),
        systems=("M3ID",),
    ),
)
