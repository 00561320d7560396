"""chunks: forward-backward changes come in correlated chunks; their susceptibility peaks at the transition.

Command::

    layerwise reproduce chunks --scale quick --out results   # ~25 s on 2 cores (27 CPU-s)
    layerwise reproduce chunks --scale full --out results    # L = 5, 7, 9, 2.3 min (2 cores, load 2.4)
    layerwise reproduce chunks --scale full --executor process --resume   # one sweep point per noise level

For RHM data (``v = n_c = 32, m = 8, s = 2``) each ``x0`` is run through forward-backward with the exact BP
denoiser ``n_traj`` times per noise level. With ``sigma_i = 1`` if token ``i`` changed, the connected
correlations ``C_ij`` over trajectories at fixed ``x0`` (averaged over ``x0``) give the susceptibility
``chi = sum_ij C_ij / sum_i C_ii`` and ``C(r)`` (:mod:`layerwise.hierarchy.observables`). Measured:

* chi vs eps for several L: it peaks near the transition eps* and its maximum grows with L;
* C(r) at several eps for the largest L, and a power-law fit ``C(r) ~ r**(-a)`` at the chi peak;
* chi vs mask fraction for the masking process (its peak sits at a smaller noise level).

The report's claims (rules in :func:`_report`): the chi peak at the largest L within 0.04 of eps* (two grid
steps); chi_max growing with L; |a - 1| <= 0.2 for C(r) ~ r^-a; the masking peak within 0.05 of 0.3.

Papers (Sclocchi, Favero, Levi, Wyart, ICLR 2025; PNAS 2025): chi peaks at the class transition (for
v = 32, m = 8, s = 2 near eps ≈ 0.72-0.74 for the eps-process and near mask fraction ≈ 0.3 for masking),
and at the transition ``C(r) ~ 1/r``; the correlation length diverges as ``|eps - eps*|**(-nu)`` with
``nu = ln s / ln F'(p*)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import save_figure, write_csv, write_json
from ..hierarchy import theory as mf
from ..hierarchy.observables import fit_power_law, peak_location
from ._base import EXPERIMENTS, Experiment, grid
from ._bp_levels import measure_curves
from .claims import SYSTEMS, Claim, Table, verdict_from, verdict_within

__all__ = ["Config", "run"]


@dataclass(frozen=True)
class Config:
    """Sizes of the chunks study (see the module docstring)."""

    v: int = 32
    n_c: int = 32
    m: int = 8
    s: int = 2
    depths: tuple[int, ...] = (4, 6, 8)
    # Denser steps around the transition, where chi peaks.
    eps_levels: tuple[float, ...] = grid(0.5, 0.66, 0.04) + grid(0.68, 0.78, 0.02) + grid(0.82, 0.9, 0.04)
    n_x0: int = 64  # starting data per level
    n_traj: int = 16  # forward-backward runs per x0
    mask_levels: tuple[float, ...] = grid(0.05, 0.65, 0.06)  # masking process, at the largest L
    # Fit C(r) ~ r^-a on 1 <= r <= fraction * d: well inside the system, away from the finite-size cutoff
    # (results.json also lists the exponent for other ranges: the fit is sensitive to it).
    fit_r_max_fraction: float = 0.125
    float32: bool = False
    threads: int = 2  # torch threads of each sweep point (BP's sums, hence the last bits, depend on it)
    device: str = "cpu"  # where the leaf evidence is built and BP runs (reproduce --device)
    rules_seed: int = 0
    seed: int = 2


def _curves(config: Config, out: Path) -> list[list[dict[str, Any]]]:
    """Per-level summaries of the eps-process at every depth, then of masking at the largest depth: one
    sweep point per (process, depth, noise level) (:mod:`._bp_levels`), so ``--executor`` and ``--resume``
    apply."""
    def spec(L: int, process: str) -> dict[str, Any]:
        return {"v": config.v, "n_c": config.n_c, "m": config.m, "s": config.s, "L": L,
                "rules_seed": config.rules_seed, "process": process, "n_data": config.n_x0,
                "n_traj": config.n_traj, "float32": config.float32, "threads": config.threads,
                "device": config.device}

    curves = [(spec(L, "eps"), config.eps_levels, config.seed + 100 * L) for L in config.depths]
    curves.append((spec(max(config.depths), "mask"), config.mask_levels, config.seed + 7))
    return measure_curves("chunks", curves, out)


def run(config: Config, out: Path) -> dict[str, Any]:
    """Run the study into ``out``; returns the key numbers (chi peaks next to the mean-field eps*)."""
    v, m, s = config.v, config.m, config.s
    eps_star = mf.critical_noise(v, m, s)
    eps = list(config.eps_levels)
    *depth_rows, mask_rows = _curves(config, out)
    sweeps: dict[int, list[dict[str, Any]]] = {}
    peaks: dict[int, dict[str, float]] = {}
    for L, rows in zip(config.depths, depth_rows, strict=True):
        chi = [r["chi"] for r in rows]
        k = max(range(len(chi)), key=lambda i: chi[i] if chi[i] == chi[i] else -1.0)
        peaks[L] = {"eps_peak": peak_location(eps, chi), "chi_max": chi[k], "eps_peak_grid": eps[k]}
        sweeps[L] = rows
    L_max = max(config.depths)
    d = s**L_max
    rows = sweeps[L_max]
    k_peak = eps.index(peaks[L_max]["eps_peak_grid"])
    r, C_r = rows[k_peak]["r"], rows[k_peak]["C_r"]
    try:
        exponent, prefactor = fit_power_law(torch.tensor(r), torch.tensor(C_r), 1.0,
                                            max(2.0, config.fit_r_max_fraction * d))
    except ValueError:
        exponent, prefactor = float("nan"), float("nan")
    by_range = {}
    r_t, C_t = torch.tensor(r), torch.tensor(C_r)
    for frac in (1 / 16, 1 / 8, 1 / 4, 1 / 2):
        try:
            by_range[f"{frac:g}"] = fit_power_law(r_t, C_t, 1.0, max(2.0, frac * d))[0]
        except ValueError:
            by_range[f"{frac:g}"] = float("nan")
    # Masking process at the largest depth.
    mask_chi = [r["chi"] for r in mask_rows]
    mask_peak = peak_location(list(config.mask_levels), mask_chi)

    chi_max = [peaks[L]["chi_max"] for L in sorted(config.depths)]
    summary = {
        "eps_star_theory": round(eps_star, 4),
        **{f"chi_peak_eps_L{L}": round(peaks[L]["eps_peak"], 4) for L in sorted(config.depths)},
        **{f"chi_max_L{L}": round(peaks[L]["chi_max"], 3) for L in sorted(config.depths)},
        "chi_max_grows_with_L": bool(all(b > a for a, b in zip(chi_max, chi_max[1:], strict=False))),
        f"C_r_exponent_L{L_max}": round(exponent, 3),
        "C_r_exponent_theory": 1.0,
        "mask_chi_peak": round(mask_peak, 4),
    }
    results = {
        "config": config,
        "theory": {"eps_star": eps_star, "nu": mf.correlation_exponent(v, m, s), "C_r_exponent": 1.0},
        "eps_process": {str(L): {"peak": peaks[L], "levels": sweeps[L]} for L in sweeps},
        "C_r_fit": {"L": L_max, "eps": eps[k_peak], "exponent": exponent, "prefactor": prefactor,
                    "r_range": [1.0, max(2.0, config.fit_r_max_fraction * d)],
                    "exponent_by_r_max_fraction": by_range},
        "mask_process": {"L": L_max, "peak": mask_peak, "levels": mask_rows},
        "summary": summary,
    }
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", [{"process": "eps", "L": L, "level": row["level"], "chi": row["chi"],
                                     "xi": row["xi"], "change_probability": row["change_probability"],
                                     "class_kept": row["class_kept"]}
                                    for L, rs in sweeps.items() for row in rs]
              + [{"process": "mask", "L": L_max, "level": row["level"], "chi": row["chi"], "xi": row["xi"],
                  "change_probability": row["change_probability"], "class_kept": row["class_kept"]}
                 for row in mask_rows])
    _figures(config, sweeps, peaks, mask_rows, eps_star, (exponent, prefactor), k_peak, out)
    return {**summary, **_report(config, peaks, eps_star, exponent, by_range, eps[k_peak], mask_peak, d)}


ICLR = "Sclocchi, Favero, Levi, Wyart, ICLR 2025"
# Verdict rules, fixed before the run (the eps grid near the transition has steps of 0.02).
PEAK_TOL, PEAK_PARTLY_TOL = 0.04, 0.08  # |eps of the chi peak at the largest L - eps*|: 2 and 4 grid steps
EXPONENT_TOL, EXPONENT_PARTLY_TOL = 0.2, 0.4  # |a - 1| for C(r) ~ r^-a
MASK_PEAK, MASK_TOL, MASK_PARTLY_TOL = 0.3, 0.05, 0.10  # the paper's "near 0.3", to its one digit


def _report(config: Config, peaks: dict[int, dict[str, float]], eps_star: float, exponent: float,
            by_range: dict[str, float], eps_fit: float, mask_peak: float, d: int) -> dict[str, Any]:
    """Claims, tables, figure captions and text for the report."""
    depths = sorted(config.depths)
    L_max = depths[-1]
    chi_max = [peaks[L]["chi_max"] for L in depths]
    grows = all(b > a for a, b in zip(chi_max, chi_max[1:], strict=False))
    sys = SYSTEMS[1]
    samples = f"{config.n_x0} x0 x {config.n_traj} trajectories per level"
    ranges = ", ".join(f"r <= {float(f) * d:g}: {a:.2f}" for f, a in by_range.items())
    claims = [
        Claim(sys, ICLR, "Fig. 2 (RHM)", "the susceptibility chi of the token changes peaks at the class "
              "transition eps*", f"peak near eps* = {eps_star:.3f} (paper: 0.72-0.74)",
              f"{peaks[L_max]['eps_peak']:.3f} (L={L_max}; parabola through the top 3 grid points, "
              f"{samples})",
              verdict_within(peaks[L_max]["eps_peak"], eps_star, PEAK_TOL, PEAK_PARTLY_TOL),
              f"reproduced if within +-{PEAK_TOL} of eps*, partly within +-{PEAK_PARTLY_TOL}"),
        Claim(sys, ICLR, "Fig. 2 (RHM)", "the peak of chi grows with the depth L (a diverging correlation "
              "length)", "chi_max increasing with L",
              "chi_max " + ", ".join(f"L={L}: {c:.2f}" for L, c in zip(depths, chi_max, strict=True))
              + f" (single estimates, {samples})",
              verdict_from(grows, chi_max[-1] > chi_max[0]),
              "reproduced if chi_max increases at every step in L, partly if only the largest L beats the "
              "smallest"),
        Claim(sys, ICLR, "Sec. on correlations", "at the transition the change correlations decay as a power "
              "law C(r) ~ 1/r", "exponent 1",
              f"{exponent:.2f} (fit 1 <= r <= {config.fit_r_max_fraction * d:g} at eps = {eps_fit:g}, "
              f"L={L_max}); other ranges: {ranges}",
              verdict_within(exponent, 1.0, EXPONENT_TOL, EXPONENT_PARTLY_TOL),
              f"reproduced if |a - 1| <= {EXPONENT_TOL} on the configured fit range, partly if <= "
              f"{EXPONENT_PARTLY_TOL}"),
        Claim(sys, ICLR, "masking process", "under masking chi peaks at a smaller noise level, near mask "
              "fraction 0.3", "~0.3", f"{mask_peak:.3f} (L={L_max}, {samples})",
              verdict_within(mask_peak, MASK_PEAK, MASK_TOL, MASK_PARTLY_TOL),
              f"reproduced if within +-{MASK_TOL} of 0.3, partly within +-{MASK_PARTLY_TOL}"),
    ]
    chi_table = Table(
        name="chi_peaks",
        caption=f"eps-process: where chi peaks and its height, per depth (eps* = {eps_star:.4f}); look for "
                "peaks approaching eps* and heights growing with L",
        columns=("L", "d", "eps at chi peak", "chi_max"),
        rows=tuple({"L": L, "d": config.s**L, "eps at chi peak": round(peaks[L]["eps_peak"], 4),
                    "chi_max": round(peaks[L]["chi_max"], 3)} for L in depths))
    fit_table = Table(
        name="C_r_exponent",
        caption=f"exponent a of C(r) ~ r^-a at the chi peak (L={L_max}, d={d}) for several fit ranges 1 <= r "
                "<= r_max: the fit depends on the range (finite-size cutoff at large r)",
        columns=("r_max", "r_max / d", "exponent a"),
        rows=tuple({"r_max": float(f) * d, "r_max / d": f, "exponent a": round(a, 3)}
                   for f, a in by_range.items()))
    return {
        "claims": claims,
        "tables": [chi_table, fit_table],
        "figures": {
            "chi.png": "Left: chi against eps for each depth; the peaks should sit at the dashed eps* and "
                       "grow with L. Right: chi against the mask fraction for the masking process (peak "
                       "near 0.3).",
            "C_of_r.png": f"C(r) on log-log axes at L={L_max} for a few noise levels; at the chi peak it "
                          "should follow the dashed power-law fit with exponent close to 1.",
        },
        "text": "Each datum is noised and denoised many times with the exact posterior; the tokens that "
                "change do so in correlated chunks. Their susceptibility chi (sum of the connected "
                "correlations) peaks at the class transition eps* and grows with depth, and there the "
                "correlations decay "
                "as 1/r. Look at where the chi curves peak and at the C(r) slope.",
    }


def _figures(config: Config, sweeps: dict[int, list[dict[str, Any]]], peaks: dict[int, dict[str, float]],
             mask_rows: list[dict[str, Any]], eps_star: float, fit: tuple[float, float], k_peak: int,
             out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for k, (L, rows) in enumerate(sorted(sweeps.items())):
        ax[0].plot([r["level"] for r in rows], [r["chi"] for r in rows], "o-", ms=3, color=f"C{k}",
                   label=f"L={L}")
    ax[0].axvline(eps_star, color="k", ls="--", lw=1, label=f"eps* = {eps_star:.3f}")
    ax[0].set_xlabel("eps")
    ax[0].set_ylabel("chi = sum C_ij / sum C_ii")
    ax[0].set_title("eps-process")
    ax[0].legend(fontsize=7)
    ax[1].plot([r["level"] for r in mask_rows], [r["chi"] for r in mask_rows], "o-", ms=3)
    ax[1].set_xlabel("mask fraction")
    ax[1].set_ylabel("chi")
    ax[1].set_title(f"masking, L={max(sweeps)}")
    save_figure(fig, out / "chi.png")

    L_max = max(sweeps)
    rows = sweeps[L_max]
    fig, ax = plt.subplots(figsize=(6, 4))
    picks = sorted({0, max(0, k_peak - 2), k_peak, min(len(rows) - 1, k_peak + 2), len(rows) - 1})
    for j, k in enumerate(picks):
        r = torch.tensor(rows[k]["r"][1:])
        c = torch.tensor(rows[k]["C_r"][1:])
        keep = c > 0
        ax.loglog(r[keep], c[keep], ".-", color=f"C{j}", label=f"eps={rows[k]['level']:.2f}"
                  + (" (chi peak)" if k == k_peak else ""))
    exponent, prefactor = fit
    if exponent == exponent:
        r = torch.tensor(rows[k_peak]["r"][1:])
        ax.loglog(r, prefactor * r ** (-exponent), "k--", lw=1, label=f"fit r^-{exponent:.2f}")
    top = max(max(row["C_r"][1:]) for row in rows)
    ax.set_ylim(bottom=1e-4 * top)  # C(r) estimates below this are noise
    ax.set_xlabel("distance r (tokens)")
    ax.set_ylabel("C(r)")
    ax.set_title(f"C(r), L={L_max}")
    ax.legend(fontsize=7)
    save_figure(fig, out / "C_of_r.png")


EXPERIMENTS.register(
    "chunks",
    Experiment(
        name="chunks",
        run=run,
        scales={
            "quick": Config(),
            "full": Config(depths=(5, 7, 9), eps_levels=grid(0.5, 0.9, 0.02), n_x0=64, n_traj=32,
                           mask_levels=grid(0.02, 0.7, 0.04)),
        },
        description="RHM forward-backward: correlated chunks of changes; chi peaks at the transition "
        "(ICLR 2025)",
        systems=(SYSTEMS[1],),
    ),
)
