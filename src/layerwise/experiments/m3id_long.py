"""m3id-long: does M3ID at the paper's defaults help once captions are long enough for its weight to grow?

Command::

    layerwise reproduce m3id-long --scale quick --out results

The ``m3id`` experiment's captions are at most 6 tokens, so the paper's weight ``exp(0.02 t) - 1`` stays
below 0.13 there. Here the same toy world (:mod:`layerwise.decoding.toy_vlm`) is made for long generations:
12 object kinds, 5 to 8 objects per scene (plus co-occurring partners), each object written as "there is a
<object>" and listed in a random order (``shuffle_captions``; in a fixed order the choice at each step is
nearly binary, the model stays confident and the paper's gate ``max p < 0.3`` never opened on the validation
seed), so captions run to about 20-50 tokens (30 on average) and the paper's weight ``exp(0.02 t) - 1``
reaches about 0.5-1.7 by the end (0.8 at the average length). Four co-occurrence pairs (``scene.p_cooccur`` in
training, broken in the test scenes), partners drawn at low contrast, and ``image_dropout`` of the training
examples without the image (so the image-free branch is a real language prior). Training is captioning only.

For greedy decoding and for M3ID at the paper's defaults (lambda 0.02, alpha 0.3) and larger lambdas at the
same alpha we report CHAIR_s, CHAIR_i, Cover, length (words), ``partner``: the fraction of test scenes with
``A`` present and ``B`` absent whose caption names ``B`` (the co-occurrence hallucination the setting plants),
``changed``: the fraction of captions that differ from greedy; and for greedy, ``gate``: the fraction of
generated tokens at which the paper's gate ``max p < alpha`` is open. Mean and standard deviation over seeds,
and (``paired_vs_greedy`` in results.json) of the per-seed difference from greedy (same model, same scenes).
The world and training sizes were fixed on a validation seed (100) that is not among the reported seeds, for
a model that learns the task within the quick budget (greedy Cover about 0.8), before looking at M3ID's
effect on the reported seeds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import save_figure, write_csv, write_json
from ..decoding.toy_vlm import SceneSpec
from ._base import EXPERIMENTS, Experiment
from .m3id import _aggregate, _run_seeds, _trained_toy_world

__all__ = ["Config", "run"]


@dataclass(frozen=True)
class Config:
    """Sizes of the m3id-long study (see the module docstring)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    # 12 object kinds, 5-8 per scene plus partners, four 90%-co-occurring pairs (50% in test scenes),
    # each object written "there is a X" in a random order: 20-50-token captions.
    scene: SceneSpec = SceneSpec(
        objects=("cat", "dog", "bus", "car", "tree", "kite", "bird", "fork", "cup", "boat", "knife", "spoon"),
        pairs=(("fork", "cup"), ("bus", "car"), ("kite", "bird"), ("knife", "spoon")),
        min_objects=5,
        max_objects=8,
        caption_phrase="there is a {}",
        shuffle_captions=True,
    )
    n_train_scenes: int = 3000
    train_steps: int = 1200
    batch_size: int = 32
    image_dropout: float = 0.2
    hidden: int = 64
    n_test_scenes: int = 200
    max_new_tokens: int = 64
    default_lambda: float = 0.02  # the paper's settings
    default_alpha: float = 0.3
    lambdas: tuple[float, ...] = (0.05, 0.1)  # larger lambdas at the paper's alpha
    torch_threads: int = 1


METRICS = ("chair_s", "chair_i", "cover", "length", "partner", "changed", "gate", "tokens")


def _greedy(model: Any, proc: Any, images: list[Any], prompts: list[str], n: int, alpha: float) -> tuple:
    """Greedy captions, their token counts, and the fraction of generated tokens with ``max p < alpha``."""
    import torch

    inputs = proc(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
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


def _one_seed(config: Config, seed: int) -> list[dict[str, Any]]:
    import torch

    from ..decoding import chair, extract_objects, m3id_generate
    from ..decoding.toy_vlm import caption_prompt

    spec = config.scene
    # Captioning only (no yes/no questions): the study is about long generations.
    proc, model, test, imgs = _trained_toy_world(config, spec, seed, pope_fraction=0.0)
    prompts = [caption_prompt()] * len(imgs)
    synonyms = {o: [o + "s"] for o in spec.objects}
    # scenes where a co-occurrence partner B is absent although its A is present
    risky = [
        (i, b) for i, s in enumerate(test) for a, b in spec.pairs if a in s.objects and b not in s.objects
    ]

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

    with torch.no_grad():
        greedy, tokens, gate = _greedy(
            model, proc, imgs, prompts, config.max_new_tokens, config.default_alpha
        )
    rows = [{"seed": seed, "method": "greedy", "lambda": None, "alpha": None, **scores(greedy, greedy)}]
    rows[0].update(gate=gate, tokens=tokens)
    for lam in (config.default_lambda, *config.lambdas):
        with torch.no_grad():
            captions = m3id_generate(
                model,
                proc,
                imgs,
                prompts,
                lambda_=lam,
                alpha=config.default_alpha,
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                path="batched",
            )
        name = "m3id_default" if lam == config.default_lambda else f"m3id_lambda={lam:g}"
        row = {"seed": seed, "method": name, "lambda": lam, "alpha": config.default_alpha}
        row.update(scores(captions, greedy))
        rows.append(row)
    return rows


def _paired(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> metric -> mean and std over seeds of (method - greedy on the same seed and test scenes)."""
    greedy = {r["seed"]: r for r in rows if r["method"] == "greedy"}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "greedy"):
        sel = [r for r in rows if r["method"] == method]
        out[method] = {}
        for key in ("chair_s", "chair_i", "cover", "partner"):
            d = [r[key] - greedy[r["seed"]][key] for r in sel]
            out[method][key] = {
                "mean": statistics.fmean(d),
                "std": statistics.stdev(d) if len(d) > 1 else 0.0,
                "n_lower": sum(x < 0 for x in d),
            }
    return out


def _figure(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(agg)
    keys = ("chair_s", "chair_i", "cover", "partner", "changed")
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        means = [agg[n][key]["mean"] for n in names]
        stds = [agg[n][key]["std"] for n in names]
        ax.bar([i + j * width for i in range(len(names))], means, width, yerr=stds, label=key, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, fontsize=8)
    ax.set_title("long captions: mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def run(config: Config, out: Path) -> dict[str, Any]:
    """Run the study for every seed; write results.json, results.csv and m3id_long.png into ``out``."""
    from ..decoding._hf import require

    require("transformers", "hf")

    out = Path(out)
    rows = _run_seeds(config, _one_seed, "m3id-long seeds")
    agg = _aggregate(rows, METRICS)
    paired = _paired(rows)
    write_csv(out / "results.csv", rows)
    write_json(out / "results.json", {"per_seed": rows, "aggregate": agg, "paired_vs_greedy": paired})
    _figure(agg, out / "m3id_long.png")
    summary: dict[str, Any] = {}
    for method in agg:
        for key in ("chair_s", "chair_i", "cover", "partner"):
            summary[f"{method}:{key}"] = round(agg[method][key]["mean"], 4)
            summary[f"{method}:{key}_std"] = round(agg[method][key]["std"], 4)
            if method in paired:
                summary[f"{method}:{key}_minus_greedy"] = round(paired[method][key]["mean"], 4)
    summary["greedy:gate_open"] = round(agg["greedy"]["gate"]["mean"], 4)
    summary["greedy:tokens"] = round(agg["greedy"]["tokens"]["mean"], 2)
    # the paper's weight exp(lambda t) - 1 at the last token (<eos>) of a greedy caption of mean length
    summary["paper_weight_at_mean_end"] = round(
        math.expm1(config.default_lambda * (agg["greedy"]["tokens"]["mean"] - 1)), 3
    )
    return summary


EXPERIMENTS.register(
    "m3id-long",
    Experiment(
        name="m3id-long",
        run=run,
        scales={
            "quick": Config(),
            "full": Config(seeds=(0, 1, 2, 3, 4), n_train_scenes=20000, train_steps=6000, n_test_scenes=1000),
        },
        description="M3ID vs greedy on a toy Llava with long captions (20-50 tokens): CHAIR, Cover, seeds",
    ),
)
