"""lines: LiNeS (Wang et al., ICLR 2025) for single-task forgetting and multi-task merging.

Command::

    layerwise reproduce lines --scale quick --out results   # ~20-30 s on 2 idle cores (less after
                                                            # task-arithmetic in the same process)

Same world as ``task-arithmetic`` (shared through a per-process cache): a small ViT pre-trained on upright
digits, frozen prototype heads, non-linear fine-tunes on each downstream task. Each seed is one point of
the sweep runner (:mod:`layerwise.sweep`; ``--executor``, ``--resume``), as in ``task-arithmetic``.

(c) Single task: the fine-tuned model forgets the other tasks (control = every other downstream task and
    the held-out upright digits, each normalized by its zero-shot accuracy). LiNeS scales the update of
    block ``i`` of ``L`` by ``alpha + (1 - alpha) i / (L - 1)``, alpha in {1.0, 0.9, ..., 0.0} chosen on
    validation by ``2 * target_normalized + control_normalized``; compared with plain fine-tuning and with
    a uniform scaling ``theta0 + s tau`` (WiSE-FT-like) whose ``s`` gives the same validation target
    accuracy.
(d) Multi-task: task arithmetic, TIES and Consensus merges of all task vectors, with the merge coefficient
    searched on validation on the authors' grids (0.1-1.0 step 0.1; 0.1-1.5 for TIES), against the same
    merges with LiNeS (alpha automatic, beta searched on the same grid).

Paper (ViT-B/32): LiNeS keeps the target accuracy (EuroSAT 99.87 -> 98.70 at alpha = 0.1) while the control
tasks recover most of their zero-shot accuracy (e.g. SUN397 52.6 -> 62.0, zero-shot 63.2), and it improves
every merging baseline it is added to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import save_figure, write_csv
from ..editing.lines import apply_lines, multitask_alpha
from ..editing.merge import merge_models
from ..editing.task_vector import TaskVector
from ..sweep import Point, current_options, run_sweep
from ..tangent.evaluation import (
    LINES_ALPHA_GRID,
    LINES_BETA_GRIDS,
    search_addition,
    search_lines_single,
)
from ._base import EXPERIMENTS, Experiment, grid
from ._editing_world import (
    CONTROL,
    PAIRED_RULE,
    config_from_point,
    get_world,
    mean,
    one_thread,
    paired_verdict,
    point_config,
    world_spec,
)
from .claims import Claim, Table, mean_std

PAPER = "Wang et al., ICLR 2025 (LiNeS)"
METHODS = ("task_arithmetic", "ties", "consensus")
# The merge coefficient of the plain baselines is searched on the grids of the LiNeS authors' protocol (0.1 to
# 1.0 in steps of 0.1 for task arithmetic and Consensus, 0.1 to 1.5 for TIES), the grids LiNeS' beta uses.
SCALE_GRIDS: dict[str, tuple[float, ...]] = {m: LINES_BETA_GRIDS[m] for m in METHODS}


@dataclass(frozen=True)
class Config:
    arch: str = "vit"
    tasks: tuple[str, ...] = ("rot90", "invert", "stripes", "checker")
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_steps: int = 350
    ft_steps: int = 40
    ft_batch: int = 32
    ft_lr: float = 2e-3
    n_train: int = 500
    n_val: int = 120
    n_test: int = 199
    uniform_grid: tuple[float, ...] = grid(0.0, 1.0, 0.1)
    device: str = "cpu"  # where the fine-tunes and evaluations run (reproduce --device)


def _single_task(w, config: Config, zs: dict) -> dict:
    tasks = list(config.tasks)
    rows = []
    curves = {"lines": [], "uniform": []}
    for t in tasks:
        controls = [c for c in [*tasks, CONTROL] if c != t]
        tau = TaskVector.from_tensors(w.tau("nonlinear", t))
        ft_val = w.acc_deltas(tau.to_dict(), t, "val")

        def measure(deltas, split, t=t, controls=controls):
            accs = w.acc_deltas_many(deltas, [t, *controls], split)  # one forward pass for all tasks
            control = mean([accs[c] / zs[c][split] for c in controls])
            return accs[t], control  # target accuracy, control normalized by zero-shot

        lines_deltas = {a: apply_lines(tau, a).to_dict() for a in LINES_ALPHA_GRID}
        search = search_lines_single(lambda a, ld=lines_deltas, m=measure: m(ld[a], "val"), ft_val, 1.0)
        # s = 0 is the pre-trained model itself: its features are cached (the same numbers, no forward pass)
        uniform = {s: (s * tau).to_dict() if s else None for s in config.uniform_grid}
        uni_val = {s: measure(uniform[s], "val") for s in config.uniform_grid}
        target_val = search.best_evaluation[0]
        reach = [s for s in config.uniform_grid if uni_val[s][0] >= target_val]
        s_match = min(reach) if reach else max(config.uniform_grid)
        ft_test = measure(tau.to_dict(), "test")
        li_test = measure(lines_deltas[search.best], "test")
        un_test = measure(uniform[s_match], "test")
        zs_control = mean([1.0 for _ in controls])
        rows.append(
            {
                "task": t,
                "alpha": search.best,
                "s": s_match,
                "zs_target": zs[t]["test"],
                "ft_target": ft_test[0],
                "lines_target": li_test[0],
                "uniform_target": un_test[0],
                "ft_control": ft_test[1],
                "lines_control": li_test[1],
                "uniform_control": un_test[1],
                "zs_control": zs_control,
            }
        )
        ftv = ft_val
        curves["lines"].append([(ev[0] / ftv, ev[1]) for ev in search.evaluations])
        curves["uniform"].append([(uni_val[s][0] / ftv, uni_val[s][1]) for s in config.uniform_grid])
    return {"rows": rows, "curves": curves}


def _multi_task(w, config: Config) -> dict:
    tasks = list(config.tasks)
    theta0 = w.theta0
    taus = [TaskVector.from_tensors(w.tau("nonlinear", t)) for t in tasks]
    models = [{k: v + tau[k] if k in tau.keys() else v for k, v in theta0.items()} for tau in taus]
    ft = {t: {s: w.acc_deltas(taus[i].to_dict(), t, s) for s in ("val", "test")} for i, t in enumerate(tasks)}
    out = {}
    for method in METHODS:
        merged = merge_models(method, models, theta0).tensors
        tau_m = TaskVector.from_tensors({k: merged[k] - theta0[k] for k in taus[0].keys()})
        plain = {s: (s * tau_m).to_dict() for s in SCALE_GRIDS[method]}

        def evaluate(deltas, split):
            return w.acc_deltas_many(deltas, tasks, split)

        r = search_addition(
            lambda s, p=plain: evaluate(p[s], "val"), {t: ft[t]["val"] for t in tasks}, SCALE_GRIDS[method]
        )
        alpha = multitask_alpha(taus, tau_m)
        with_lines = {b: apply_lines(tau_m, alpha, b).to_dict() for b in LINES_BETA_GRIDS[method]}
        rl = search_addition(
            lambda b, d=with_lines: evaluate(d[b], "val"),
            {t: ft[t]["val"] for t in tasks},
            LINES_BETA_GRIDS[method],
        )
        test_plain = evaluate(plain[r.best], "test")
        test_lines = evaluate(with_lines[rl.best], "test")
        out[method] = {
            "scale": r.best,
            "lines_alpha": alpha,
            "lines_beta": rl.best,
            "plain_norm": mean([test_plain[t] / ft[t]["test"] for t in tasks]),
            "lines_norm": mean([test_lines[t] / ft[t]["test"] for t in tasks]),
            "plain_abs": mean(list(test_plain.values())),
            "lines_abs": mean(list(test_lines.values())),
        }
    return out


def _seed(config: Config, seed: int) -> dict:
    w = get_world(world_spec(config, config.arch, seed))
    zs_split = {s: w.acc_deltas_many(None, [*config.tasks, CONTROL], s) for s in ("val", "test")}
    zs = {t: {s: zs_split[s][t] for s in zs_split} for t in [*config.tasks, CONTROL]}
    return {"seed": seed, "single": _single_task(w, config, zs), "multi": _multi_task(w, config)}


def _plots(results: list[dict], config: Config, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for key, color, label in (
        ("lines", "tab:red", "LiNeS (alpha 1.0 -> 0.0)"),
        ("uniform", "tab:blue", "uniform scaling s (1.0 -> 0.0)"),
    ):
        curves = [c for r in results for c in r["single"]["curves"][key]]  # (runs, grid, 2)
        arr = torch.tensor(curves, dtype=torch.float64).mean(0)
        if key == "uniform":
            arr = arr.flip(0)
        ax.plot(arr[:, 0], arr[:, 1], "o-", color=color, label=label, ms=3)
    ax.set_xlabel("target accuracy / fine-tuned")
    ax.set_ylabel("control accuracy / zero-shot")
    ax.set_title(
        f"single task, validation (mean of {len(config.tasks)} tasks x {len(results)} seeds)", fontsize=9
    )
    ax.legend(fontsize=8)
    save_figure(fig, out / "lines_tradeoff.png")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = torch.arange(len(METHODS), dtype=torch.float64)
    for off, key, label in ((-0.2, "plain_norm", "without LiNeS"), (0.2, "lines_norm", "with LiNeS")):
        vals = [[r["multi"][m][key] for r in results] for m in METHODS]
        errs = [torch.tensor(v).std().item() if len(v) > 1 else 0.0 for v in vals]
        ax.bar(x + off, [mean(v) for v in vals], width=0.4, yerr=errs, capsize=4, label=label)
    ax.set_xticks(x, METHODS)
    ax.set_ylabel("normalized accuracy (test)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    save_figure(fig, out / "lines_multitask.png")
    return {
        "lines_tradeoff.png": "Single task, validation splits: control accuracy (normalized by zero-shot) "
        "against target accuracy (normalized by fine-tuned) as LiNeS alpha or a uniform scale s goes from 1 "
        "to 0. A curve above the other keeps more control accuracy at the same target accuracy.",
        "lines_multitask.png": "Multi-task merging of all task vectors, test splits: normalized accuracy "
        "(mean +- std over seeds) of task arithmetic, TIES and Consensus without and with LiNeS.",
    }


def seed_point(config: dict, seed: int) -> dict:
    """One sweep point: the single-task and multi-task results of one seed (JSON-able).

    Module-level so that spawned, Dask or SLURM workers import it; in one process the pre-trained model and
    the fine-tunes are cached and shared with ``task-arithmetic`` (:mod:`._editing_world`)."""
    with one_thread():
        return _seed(config_from_point(Config, config), seed)


def run(config: Config, out: Path) -> dict:
    points = [Point(point_config(config), s) for s in config.seeds]
    opts = current_options()
    results = run_sweep(seed_point, points, opts.folder_for("lines", out / "points"), opts).results()
    n = len(results)
    # (c) single task: per seed, average over tasks
    per_seed = []
    for r in results:
        rows = r["single"]["rows"]
        per_seed.append({k: mean([row[k] for row in rows]) for k in rows[0] if k != "task"})
        per_seed[-1]["ft_target_norm"] = mean([row["ft_target"] / row["ft_target"] for row in rows])
        per_seed[-1]["lines_target_norm"] = mean([row["lines_target"] / row["ft_target"] for row in rows])
        per_seed[-1]["uniform_target_norm"] = mean([row["uniform_target"] / row["ft_target"] for row in rows])
        per_seed[-1]["zs_target_norm"] = mean([row["zs_target"] / row["ft_target"] for row in rows])
    write_csv(
        out / "single_task_rows.csv",
        [{"seed": r["seed"], **row} for r in results for row in r["single"]["rows"]],
    )

    def col(key):
        return [p[key] for p in per_seed]

    single_rows = []
    for name, t, c, coef in (
        ("zero-shot", "zs_target", "zs_control", None),
        ("fine-tuned", "ft_target", "ft_control", None),
        ("LiNeS", "lines_target", "lines_control", "alpha"),
        ("uniform scaling (same target)", "uniform_target", "uniform_control", "s"),
    ):
        single_rows.append(
            {
                "model": name,
                "target acc": mean_std(col(t)),
                "target norm": mean_std(col(t + "_norm")),
                "control norm": mean_std(col(c)),
                "coefficient": mean_std(col(coef)) if coef else "-",
            }
        )
    multi_rows = []
    for m in METHODS:
        for label, key, coef in (("without LiNeS", "plain", "scale"), ("with LiNeS", "lines", "lines_beta")):
            multi_rows.append(
                {
                    "method": m,
                    "LiNeS": label,
                    "normalized acc": mean_std([r["multi"][m][f"{key}_norm"] for r in results]),
                    "absolute acc": mean_std([r["multi"][m][f"{key}_abs"] for r in results]),
                    "coefficient": mean_std([r["multi"][m][coef] for r in results]),
                }
            )
    figures = _plots(results, config, out)
    claims = []
    v, d, s = paired_verdict(col("lines_control"), col("ft_control"))
    target_kept = mean(col("lines_target_norm"))
    if v == "reproduced" and target_kept < 0.95:
        v = "partly"
    claims.append(
        Claim(
            system="LiNeS",
            paper=PAPER,
            where="Sec. 4 (single task), Fig. 1/Table 1",
            claim="LiNeS keeps the fine-tuned target accuracy while the control tasks recover most of their "
            "zero-shot accuracy",
            paper_value="ViT-B/32 EuroSAT alpha=0.1: target 99.87 -> 98.70; SUN397 control 52.6 -> 62.0 "
            "(zero-shot 63.2)",
            measured=(
                f"target norm {mean_std(col('lines_target_norm'))} (fine-tuned 1); control norm "
                f"fine-tuned {mean_std(col('ft_control'))} -> LiNeS {mean_std(col('lines_control'))}; "
                f"difference {d:+.3f} +- {s:.3f} (s.e., {n} seeds)"
            ),
            verdict=v,
            rule=PAIRED_RULE + " (control, LiNeS vs fine-tuned); partly if the LiNeS target "
            "normalized accuracy is below 0.95",
        )
    )
    v, d, s = paired_verdict(col("lines_control"), col("uniform_control"))
    claims.append(
        Claim(
            system="LiNeS",
            paper=PAPER,
            where="Sec. 4, comparison with WiSE-FT-style interpolation",
            claim="at the same target accuracy, depth-dependent scaling keeps more control accuracy than a "
            "uniform scaling of the task vector",
            paper_value="LiNeS improves on uniform interpolation (WiSE-FT) in the target/control trade-off",
            measured=(
                f"control norm LiNeS {mean_std(col('lines_control'))} vs uniform "
                f"{mean_std(col('uniform_control'))} at target norm {mean_std(col('lines_target_norm'))} vs "
                f"{mean_std(col('uniform_target_norm'))}; difference {d:+.3f} +- {s:.3f} (s.e.)"
            ),
            verdict=v,
            rule=PAIRED_RULE + " (control, LiNeS vs uniform scaling at matched validation target)",
        )
    )
    verdicts, parts = [], []
    for m in METHODS:
        vm, dm, sm = paired_verdict(
            [r["multi"][m]["lines_norm"] for r in results], [r["multi"][m]["plain_norm"] for r in results]
        )
        verdicts.append(vm)
        parts.append(f"{m} {dm:+.3f} +- {sm:.3f}")
    if all(x == "reproduced" for x in verdicts):
        v = "reproduced"
    elif any(x != "not reproduced" for x in verdicts):
        v = "partly"
    else:
        v = "not reproduced"
    claims.append(
        Claim(
            system="LiNeS",
            paper=PAPER,
            where="Sec. 5 (multi-task merging), Table 3",
            claim="adding LiNeS to task arithmetic, TIES and Consensus improves their multi-task accuracy",
            paper_value="improves every merging baseline (8/14/20 tasks, ViT-B/32 to L/14)",
            measured="normalized accuracy gain with LiNeS: " + "; ".join(parts) + f" (s.e., {n} seeds)",
            verdict=v,
            rule="per method: " + PAIRED_RULE + "; reproduced if reproduced for all three, partly if "
            "partly/reproduced for at least one",
        )
    )
    tables = [
        Table(
            name="lines_single_task",
            caption=(
                "Single task (test splits; mean over tasks, then mean +- std over seeds): target accuracy, "
                "target normalized by fine-tuned, control normalized by zero-shot; coefficient = LiNeS alpha "
                "or uniform s "
                "(chosen on validation)."
            ),
            columns=("model", "target acc", "target norm", "control norm", "coefficient"),
            rows=tuple(single_rows),
        ),
        Table(
            name="lines_multi_task",
            caption=(
                "Multi-task merging of all task vectors (test splits): coefficient = merge scale without "
                "LiNeS, "
                "beta with LiNeS (alpha automatic), chosen on validation."
            ),
            columns=("method", "LiNeS", "normalized acc", "absolute acc", "coefficient"),
            rows=tuple(multi_rows),
        ),
    ]
    text = (
        f"{config.arch}, tasks {', '.join(config.tasks)}, {n} seeds. Single task: control normalized "
        "accuracy "
        f"{mean_std(col('ft_control'))} after fine-tuning, {mean_std(col('lines_control'))} with LiNeS "
        f"(target kept at {mean_std(col('lines_target_norm'))} of fine-tuned), "
        f"{mean_std(col('uniform_control'))} with a uniform scaling of matched validation target. Multi-task "
        "normalized accuracy without -> with LiNeS: "
        + "; ".join(
            f"{m} {mean(r['multi'][m]['plain_norm'] for r in results):.3f} -> "
            f"{mean(r['multi'][m]['lines_norm'] for r in results):.3f}"
            for m in METHODS
        )
        + ". Quick scale: short fine-tunes of a 4-block ViT; the full scale uses 8 tasks and 5 seeds."
    )
    return {
        "claims": claims,
        "tables": tables,
        "figures": figures,
        "text": text,
        "single_control_ft": round(mean(col("ft_control")), 4),
        "single_control_lines": round(mean(col("lines_control")), 4),
        "single_control_uniform": round(mean(col("uniform_control")), 4),
        "single_target_norm_lines": round(target_kept, 4),
        **{
            f"multi_{m}_gain": round(
                mean([r["multi"][m]["lines_norm"] - r["multi"][m]["plain_norm"] for r in results]), 4
            )
            for m in METHODS
        },
    }


EXPERIMENTS.register(
    "lines",
    Experiment(
        name="lines",
        run=run,
        scales={
            "quick": Config(),
            "full": Config(
                tasks=("rot90", "invert", "mirror", "blocky", "edges", "shapes", "stripes", "checker"),
                seeds=(0, 1, 2, 3, 4),
                pretrain_steps=2000,
                ft_steps=300,
                n_val=150,
                uniform_grid=grid(0.0, 1.0, 0.05),
            ),
        },
        description="LiNeS: single-task forgetting vs uniform scaling; multi-task merging with/without LiNeS",
        extras=("data",),
        systems=("LiNeS",),
    ),
)
