"""phase-transition: forward-backward on RHM data with the exact BP denoiser -- the class flips at eps*.

Command::

    layerwise reproduce phase-transition --scale quick --out results   # ~15 s on an idle 2-core CPU
    layerwise reproduce phase-transition --scale full --out results    # L = 3..9, ~20 min

For an RHM with ``v = n_c = 32, m = 8, s = 2`` and depths ``L``, data ``x0`` are noised with the eps-process
(leaf evidence ``(1 - eps) δ_{x0} + eps / v``) and ``x̂0`` is drawn from the exact posterior by belief
propagation (:class:`layerwise.hierarchy.forward_backward.BPDenoiser`). Measured:

* P(class kept) vs eps for every L, with the mean-field curve ``p_0`` (iterate ``F`` from
  ``p_L = 1 - eps + eps/v``) overlaid; the threshold is where P(class kept) crosses 1/2 (and where it
  crosses the unstable fixed point ``p*``); the width of the drop (crossings of 3/4 and 1/4) shrinks with L;
* the reconstruction of every level at the largest L (the class drops sharply, the leaves change smoothly);
* the same for the uniform-resampling and masking processes (not equivalent to the eps-process: their
  thresholds sit elsewhere, reported as measured).

Paper (Sclocchi, Favero, Wyart, PNAS 2025, Fig. 2 and our mean-field derivation,
``eps* = v (v - 2m + 1) / ((v - 1)(v - m)) ≈ 0.7312``): with exact BP at L = 9, P(class kept) ≈ 0.86 at
eps = 0.70 and ≈ 0.05 at eps = 0.75; at L = 7 and eps = 0.75 the class is kept with ≈ 0.14 and the leaves
with ≈ 0.67.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._io import save_figure, write_csv, write_json
from ..hierarchy import RHM
from ..hierarchy import theory as mf
from ..hierarchy.forward_backward import BPDenoiser, forward_backward
from ..hierarchy.observables import crossing_point
from ._base import EXPERIMENTS, Experiment, grid

__all__ = ["Config", "run"]


@dataclass(frozen=True)
class Config:
    """Sizes of the phase-transition study (see the module docstring)."""

    v: int = 32
    n_c: int = 32
    m: int = 8
    s: int = 2
    depths: tuple[int, ...] = (3, 5, 7, 9)  # L values of the eps-process sweep
    eps_levels: tuple[float, ...] = grid(0.5, 0.9, 0.025)
    n_data: int = 512  # starting data per level (one trajectory each)
    process_depth: int = 7  # L used for the uniform and masking processes
    process_levels: tuple[float, ...] = grid(0.0, 0.95, 0.05)
    processes: tuple[str, ...] = ("uniform", "mask")
    float32: bool = False  # BP messages in float32 (faster; adequate for sampling)
    rules_seed: int = 0
    seed: int = 1


def _measure(rhm: RHM, process: str, levels: tuple[float, ...], cfg: Config, seed: int,
             executor: Executor | None) -> list[dict[str, Any]]:
    data = rhm.sample(cfg.n_data, seed=seed)
    den = BPDenoiser(rhm, dtype=torch.float32 if cfg.float32 else torch.float64)
    res = forward_backward(data, process, levels, 1, den, seed=seed + 1, keep_trajectories=False,
                           executor=executor)
    return [{"level": r.level, "class_kept": r.class_kept, "class_kept_se": r.class_kept_se,
             "level_kept": r.level_kept.tolist()} for r in res.levels]


def _crossings(levels: list[float], kept: list[float], p_star: float) -> dict[str, float]:
    half = crossing_point(levels, kept, 0.5)
    return {
        "threshold_half": half,
        "threshold_p_star": crossing_point(levels, kept, p_star),
        "width": crossing_point(levels, kept, 0.25) - crossing_point(levels, kept, 0.75),
    }


def run(config: Config, out: Path, executor: Executor | None = None) -> dict[str, Any]:
    """Run the study into ``out``; returns the key numbers (thresholds next to the mean-field eps*)."""
    v, m, s = config.v, config.m, config.s
    eps_star = mf.critical_noise(v, m, s)
    p_star = mf.critical_point(v, m, s)
    theory = {"eps_star": eps_star, "p_star": p_star, "nu": mf.correlation_exponent(v, m, s),
              "F_prime_at_p_star": float(mf.mean_field_slope(p_star, v, m, s))}
    results: dict[str, Any] = {"config": config, "theory": theory}
    # ---- eps-process, several depths
    curves: dict[int, list[dict[str, Any]]] = {}
    per_depth = {}
    for L in tqdm(config.depths, desc="phase-transition: depths", unit="L"):
        rhm = RHM(v, config.n_c, m, s, L, seed=config.rules_seed)
        rows = _measure(rhm, "eps", config.eps_levels, config, config.seed + 100 * L, executor)
        mean_field = mf.level_curves(torch.tensor(config.eps_levels), v, m, s, L)[:, 0].tolist()
        for row, p0 in zip(rows, mean_field, strict=True):
            row["mean_field"] = p0
        curves[L] = rows
        kept = [r["class_kept"] for r in rows]
        per_depth[L] = {**_crossings(list(config.eps_levels), kept, p_star),
                        "mean_field_threshold_half": crossing_point(list(config.eps_levels), mean_field, 0.5)}
    results["eps_process"] = {"curves": {str(L): c for L, c in curves.items()},
                              "thresholds": {str(L): t for L, t in per_depth.items()}}
    # ---- uniform resampling and masking at one depth
    rhm = RHM(v, config.n_c, m, s, config.process_depth, seed=config.rules_seed)
    procs: dict[str, Any] = {}
    for name in tqdm(("eps", *config.processes), desc="phase-transition: processes", unit="process"):
        rows = _measure(rhm, name, config.process_levels, config, config.seed + 7, executor)
        kept = [r["class_kept"] for r in rows]
        procs[name] = {"curve": rows, **_crossings(list(config.process_levels), kept, p_star)}
    results["processes"] = {"depth": config.process_depth, **procs}

    L_max = max(config.depths)
    widths = [per_depth[L]["width"] for L in sorted(config.depths)]
    summary = {
        "eps_star_theory": round(eps_star, 4),
        f"threshold_L{L_max}": round(per_depth[L_max]["threshold_half"], 4),
        f"threshold_p_star_L{L_max}": round(per_depth[L_max]["threshold_p_star"], 4),
        f"mean_field_threshold_L{L_max}": round(per_depth[L_max]["mean_field_threshold_half"], 4),
        "width_by_L": {str(L): round(w, 4) for L, w in zip(sorted(config.depths), widths, strict=True)},
        "sharpens_with_L": bool(all(b < a for a, b in zip(widths, widths[1:], strict=False))),
        **{f"threshold_{name}": round(procs[name]["threshold_half"], 4) for name in config.processes},
    }
    results["summary"] = summary
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", [{"L": L, **{k: v for k, v in row.items() if k != "level_kept"}}
                                    for L, rows in curves.items() for row in rows])
    _figures(config, curves, per_depth, procs, eps_star, out)
    return summary


def _figures(config: Config, curves: dict[int, list[dict[str, Any]]], per_depth: dict[int, dict[str, float]],
             procs: dict[str, Any], eps_star: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = list(config.eps_levels)
    fine = [eps[0] + (eps[-1] - eps[0]) * k / 200 for k in range(201)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (L, rows) in enumerate(sorted(curves.items())):
        color = f"C{k}"
        ax.errorbar(eps, [r["class_kept"] for r in rows], yerr=[r["class_kept_se"] for r in rows], fmt="o",
                    ms=3, color=color, label=f"L={L} (BP)")
        mean_field = mf.level_curves(torch.tensor(fine), config.v, config.m, config.s, L)[:, 0]
        ax.plot(fine, mean_field.tolist(), "-", color=color, lw=1, alpha=0.7)
    ax.axvline(eps_star, color="k", ls="--", lw=1, label=f"eps* = {eps_star:.3f}")
    ax.set_xlabel("eps (noise level)")
    ax.set_ylabel("P(class kept)")
    ax.set_title(f"v={config.v}, m={config.m}, s={config.s}: points = exact BP, lines = mean field")
    ax.legend(fontsize=7)
    save_figure(fig, out / "class_kept.png")

    L_max = max(curves)
    rows = curves[L_max]
    fig, ax = plt.subplots(figsize=(6, 4))
    for level in range(L_max + 1):
        tag = " (class)" if level == 0 else " (leaves)" if level == L_max else ""
        ax.plot(eps, [r["level_kept"][level] for r in rows], "o-", ms=2, color=plt.cm.viridis(level / L_max),
                label=f"level {level}{tag}")
    ax.axvline(eps_star, color="k", ls="--", lw=1)
    ax.set_xlabel("eps")
    ax.set_ylabel("P(symbol kept)")
    ax.set_title(f"reconstruction by level, L={L_max}")
    ax.legend(fontsize=6)
    save_figure(fig, out / "levels.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in procs.items():
        curve = res["curve"]
        line = ax.plot([r["level"] for r in curve], [r["class_kept"] for r in curve], "o-", ms=3, label=name)
        if res["threshold_half"] == res["threshold_half"]:
            ax.axvline(res["threshold_half"], color=line[0].get_color(), ls=":", lw=1)
    ax.axhline(0.5, color="gray", lw=0.5)
    ax.set_xlabel("noise level (eps / resampling probability / mask fraction)")
    ax.set_ylabel("P(class kept)")
    ax.set_title(f"noise processes at L={config.process_depth} (dotted: P = 1/2)")
    ax.legend()
    save_figure(fig, out / "processes.png")


EXPERIMENTS.register(
    "phase-transition",
    Experiment(
        name="phase-transition",
        run=run,
        scales={
            "quick": Config(),
            "full": Config(depths=(3, 4, 5, 6, 7, 8, 9), eps_levels=grid(0.5, 0.9, 0.01), n_data=1024,
                           process_depth=9, process_levels=grid(0.0, 0.98, 0.02)),
        },
        description="RHM forward-backward with exact BP: class kept vs noise, sharp at eps* (PNAS 2025)",
    ),
)
