"""Claims, tables and texts of the two M3ID experiments (``m3id``, ``m3id-long``) for the report.

The paper (Favero et al., CVPR 2024) reports, for LLaVA 13B, 25% (M3ID) and 28% (M3ID + DPO) fewer
hallucinated objects in captioning (CHAIR_i) and POPE accuracy +21% / +24%. Each claim here compares a
method with greedy decoding *on the same seed* (same model, same test scenes): per seed the relative change
``(method - greedy) / greedy``, then its mean, standard deviation and standard error over seeds.

Verdict rule (fixed before the run, the same for every claim): "reproduced" if the mean change goes the
paper's way by at least half the paper's amount and by more than 2 standard errors; "partly" if it goes the
paper's way by more than 2 standard errors but less than half the paper's amount (a real but smaller
effect); otherwise "not reproduced" (including a change within noise). POPE claims are "not tested at this
scale" when greedy POPE accuracy is below :data:`POPE_LEARNED` (the yes/no task is not learned yet).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .claims import SYSTEMS, Claim, Table, format_mean_std

__all__ = ["paired_relative_change", "paired_claim", "method_table", "POPE_LEARNED"]

PAPER = "Favero et al., CVPR 2024"
POPE_LEARNED = 0.8  # below this greedy POPE accuracy (chance 0.5) the yes/no task is not learned well enough
RULE = ("per-seed relative change vs greedy; reproduced if its mean goes the paper's way by >= half the "
        "paper's amount and by > 2 standard errors, partly if by > 2 standard errors but less than half")


def paired_relative_change(rows: Sequence[dict[str, Any]], method: str, metric: str,
                           baseline: str = "greedy") -> list[float]:
    """Per seed ``(method - baseline) / baseline`` of ``metric`` (seeds where the baseline is 0 skipped)."""
    base = {r["seed"]: r[metric] for r in rows if r["method"] == baseline and metric in r}
    out = []
    for r in rows:
        if r["method"] == method and metric in r and r["seed"] in base and base[r["seed"]]:
            out.append((float(r[metric]) - float(base[r["seed"]])) / float(base[r["seed"]]))
    return out


def _verdict(changes: Sequence[float], paper_change: float) -> str:
    """Apply the module's rule to per-seed relative changes; ``paper_change`` is signed (-0.25, +0.21)."""
    n = len(changes)
    if n == 0:
        return "not tested at this scale"
    mean = statistics.fmean(changes)
    se = (statistics.stdev(changes) / math.sqrt(n)) if n > 1 else math.inf
    direction = 1.0 if paper_change > 0 else -1.0
    gain = direction * mean  # > 0: the paper's way
    if gain <= 2 * se:
        return "not reproduced"  # within noise, or the wrong way
    return "reproduced" if gain >= abs(paper_change) / 2 else "partly"


def paired_claim(rows: Sequence[dict[str, Any]], method: str, metric: str, paper_change: float, claim: str,
                 where: str, label: str, extra: str = "", untested_reason: str | None = None) -> Claim:
    """A claim that ``method`` changes ``metric`` relative to greedy by ``paper_change`` (signed fraction)."""
    changes = paired_relative_change(rows, method, metric)
    paper_value = f"{paper_change:+.0%} {label} (LLaVA 13B)"
    rule = RULE + (f"; not tested when greedy POPE accuracy < {POPE_LEARNED}" if "pope" in metric else "")
    if untested_reason is not None or not changes:
        return Claim(SYSTEMS[8], PAPER, where, claim, paper_value, untested_reason or f"no {method} rows",
                     "not tested at this scale", rule)
    n = len(changes)
    mean = statistics.fmean(changes)
    std = statistics.stdev(changes) if n > 1 else 0.0
    measured = f"{mean:+.1%} +- {std:.1%} ({n} seeds, paired vs greedy)" + (f"; {extra}" if extra else "")
    verdict = _verdict(changes, paper_change)
    return Claim(SYSTEMS[8], PAPER, where, claim, paper_value, measured, verdict, rule)


def _mean(agg: dict[str, Any], method: str, metric: str) -> float | None:
    """``agg[method][metric]["mean"]`` or None when the study did not record it."""
    value = agg.get(method, {}).get(metric, {}).get("mean")
    return float(value) if value is not None else None


def method_table(name: str, caption: str, agg: dict[str, dict[str, dict[str, float]]], n_seeds: int,
                 metrics: Sequence[str]) -> Table:
    """Rows = decoding methods, columns = metrics as ``mean +- std (n seeds)``."""
    rows = []
    for method, stats in agg.items():
        row: dict[str, Any] = {"method": method}
        for key in metrics:
            row[key] = format_mean_std(stats[key]["mean"], stats[key]["std"], n_seeds) if key in stats else ""
        rows.append(row)
    return Table(name=name, caption=caption, columns=("method", *metrics), rows=tuple(rows))


def m3id_report(config: Any, rows: list[dict[str, Any]], agg: dict[str, Any]) -> dict[str, Any]:
    """Report parts of the ``m3id`` experiment (captions <= ``max_new_tokens`` tokens, POPE, DPO)."""
    n = len(config.seeds)
    split = config.pope_split
    pope_key = "pope_random_accuracy" if split == "random" else "pope_accuracy"
    greedy_pope = _mean(agg, "greedy", pope_key)
    pope_untested = None
    if greedy_pope is not None and greedy_pope < POPE_LEARNED:
        pope_untested = f"greedy POPE accuracy ({split} split) {greedy_pope:.2f}: yes/no is not learned"
    pope_extra = f"{split} split"
    if greedy_pope is not None:
        pope_extra += f"; greedy accuracy {greedy_pope:.2f}"
    weight = math.expm1(config.default_lambda * config.max_new_tokens)
    claims = [
        paired_claim(rows, "m3id_default", "chair_i", -0.25,
                     "M3ID (lambda 0.02, alpha 0.3) reduces the share of hallucinated objects in captions",
                     "Abstract; Tab. 1", "CHAIR_i",
                     f"captions <= {config.max_new_tokens} tokens, so the weight exp(lambda t) - 1 stays <= "
                     f"{weight:.2f}"),
        paired_claim(rows, "m3id+dpo_greedy", "chair_i", -0.28,
                     "M3ID + DPO (preferences built without labels) reduces hallucinated objects further",
                     "Abstract; Tab. 1", "CHAIR_i"),
        paired_claim(rows, "m3id_default", pope_key, 0.21, "M3ID improves POPE accuracy",
                     "Abstract; Tab. 2", "POPE accuracy", pope_extra, untested_reason=pope_untested),
        paired_claim(rows, "m3id+dpo_greedy", pope_key, 0.24, "M3ID + DPO improves POPE accuracy",
                     "Abstract; Tab. 2", "POPE accuracy", pope_extra, untested_reason=pope_untested),
    ]
    table = method_table(
        "methods", f"every decoding method on the bias-broken test scenes, mean +- std over {n} seeds: lower "
        "CHAIR is better, but only together with a Cover that does not drop; POPE on its random split (any "
        "absent object) and its adversarial split (the absent co-occurrence partner)", agg, n,
        ("chair_s", "chair_i", "cover", "length", "pope_random_accuracy", "pope_random_yes_ratio",
         "pope_accuracy", "pope_f1", "pope_yes_ratio"))
    return {
        "claims": claims,
        "tables": [table],
        "figures": {"m3id.png": "Captioning metrics (left) and POPE (middle) per decoding method, and "
                                "CHAIR_s and Cover against lambda (right; dashed: greedy). Look for a CHAIR "
                                "drop larger than the error bars without a matching loss of Cover.",
                    "m3id_reliance.png": "KL(p_c || p_u) and attention mass on image tokens at each "
                                         "generated position of greedy captions (mean +- std over seeds): "
                                         "how much the image still matters along these short captions."},
        "text": f"A tiny Llava is trained from scratch on synthetic scenes whose captions carry a "
                f"co-occurrence bias, then decoded greedily, with M3ID and after M3ID + DPO on test scenes "
                f"where the bias is broken ({n} seeds). Captions are short here (<= {config.max_new_tokens} "
                f"tokens), so the paper's defaults barely act; m3id-long repeats the study on long captions.",
    }


def m3id_long_report(config: Any, rows: list[dict[str, Any]], agg: dict[str, Any], paired: dict[str, Any],
                     decay_ratios: Sequence[float], chosen: tuple[float, float]) -> dict[str, Any]:
    """Report parts of the ``m3id-long`` experiment: the premise (reliance decays along the caption), then
    greedy vs M3ID at the paper's defaults and at the validation-chosen setting, paired over seeds."""
    n = len(config.seeds)
    tokens, gate = _mean(agg, "greedy", "tokens"), _mean(agg, "greedy", "gate")
    extra = []
    if tokens is not None:
        weight = math.expm1(config.default_lambda * (tokens - 1))
        extra.append(f"greedy captions {tokens:.0f} tokens on average, weight exp(lambda t) - 1 = "
                     f"{weight:.2f} at their end")
    if gate is not None:
        extra.append(f"gate open at {gate:.0%} of tokens")
    ratios = [r for r in decay_ratios if math.isfinite(r)]
    if ratios:
        mean = statistics.fmean(ratios)
        se = statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else math.inf
        verdict = "reproduced" if mean + 2 * se < 0.5 else ("partly" if mean < 1 else "not reproduced")
        measured = (f"KL at the last object slot half the captions reach / peak KL = {mean:.2f} +- "
                    f"{statistics.stdev(ratios) if len(ratios) > 1 else 0.0:.2f} ({len(ratios)} seeds)")
    else:
        verdict, measured = "not tested at this scale", "no caption named an object"
    greedy_pope = _mean(agg, "greedy", "pope_accuracy")
    pope_untested = (f"greedy POPE accuracy {greedy_pope:.2f}: the yes/no task is not learned at this scale"
                     if greedy_pope is not None and greedy_pope < POPE_LEARNED else None)
    cover = paired.get("m3id_chosen", {}).get("cover", {}).get("mean")
    chosen_extra = f"lambda {chosen[0]:g}, alpha {chosen[1]:g} (validation seed {config.validation_seed})"
    if cover is not None:
        chosen_extra += f"; Cover {cover:+.3f} vs greedy"
    claims = [
        Claim(SYSTEMS[8], PAPER, "Sec. 3, Fig. 2",
              "as more tokens are generated, the reliance on the image decreases (the premise of M3ID)",
              "decays with t", measured, verdict,
              "KL(p_c || p_u) per object slot of greedy captions; reproduced if the ratio (last slot half "
              "the captions reach / peak) is < 0.5 by 2 standard errors over seeds, partly if < 1"),
        paired_claim(rows, "m3id_default", "chair_i", -0.25,
                     "on long captions, M3ID at the paper's defaults (lambda 0.02, alpha 0.3) reduces the "
                     "share of hallucinated objects", "Abstract; Tab. 1", "CHAIR_i", "; ".join(extra)),
        paired_claim(rows, "m3id_chosen", "chair_i", -0.25,
                     "M3ID with lambda and alpha chosen on a validation seed reduces the share of "
                     "hallucinated objects", "Abstract; Tab. 1", "CHAIR_i", chosen_extra),
        paired_claim(rows, "m3id_chosen", "pope_accuracy", 0.21, "M3ID improves POPE accuracy",
                     "Abstract; Tab. 2", "POPE accuracy", untested_reason=pope_untested),
    ]
    table = method_table(
        "methods", f"greedy, M3ID at the paper's defaults and at the validation-chosen setting on long "
        f"captions, mean +- std over {n} seeds; partner = share of scenes naming an absent co-occurrence "
        "partner, changed = share of captions that differ from greedy", agg, n,
        ("chair_s", "chair_i", "cover", "length", "partner", "changed", "pope_accuracy"))
    keys = ("chair_s", "chair_i", "cover", "partner", "pope_accuracy")

    def cell(stats: dict[str, Any], k: str) -> str:
        if k not in stats:
            return ""
        st = stats[k]
        p = st.get("p_paired_t", float("nan"))
        ptxt = f", p = {p:.3f}" if isinstance(p, float) and math.isfinite(p) else ""
        return f"{st['mean']:+.3f} +- {st['std']:.3f} (lower in {st.get('n_lower', '?')}/{n}{ptxt})"

    diffs = Table(
        name="paired_vs_greedy",
        caption="per-seed difference from greedy (same model, same scenes): mean +- std over seeds, the "
                "number of seeds where the method is lower, and the paired t-test p-value across seeds",
        columns=("method", *keys),
        rows=tuple({"method": m, **{k: cell(stats, k) for k in keys}} for m, stats in paired.items()),
    )
    return {
        "claims": claims,
        "tables": [table, diffs],
        "figures": {
            "m3id_long.png": "Left: KL(p_c || p_u) at the k-th object of greedy captions (grey: seeds; blue: "
            "mean +- std): reliance on the image rises, then fades as the faint objects come. Middle: "
            "attention mass on image tokens, decaying along the caption. Right: metrics per method; M3ID "
            "should lower CHAIR and partner bars without a matching loss of Cover."
        },
        "text": "A toy Llava trained on scenes whose captions list salient objects first and faint "
                "co-occurrence partners last (20-50 tokens). The diagnostic checks the paper's premise first "
                "(reliance on the image fades along the caption); then greedy decoding is compared with M3ID "
                "at the paper's defaults and at a setting chosen on a validation seed, seed by seed.",
    }
