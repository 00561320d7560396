"""Forward-backward with the exact BP denoiser, one noise level per sweep point (phase-transition, chunks).

Each point is one noise level of one process at one depth: it rebuilds the RHM from its rules seed, draws the
starting data from the point's seed and runs :func:`~layerwise.hierarchy.forward_backward.forward_backward`
at that level alone. Every level's randomness is derived from the seed and the level's value
(:func:`~layerwise.hierarchy.forward_backward.level_seeds`), so a level's numbers are those of a run over the
whole grid, whatever executor ran it and in whatever order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..hierarchy import RHM
from ..hierarchy.forward_backward import BPDenoiser, forward_backward
from ..sweep import Point, current_options, run_sweep

__all__ = ["level_point", "measure_curves"]


def level_point(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """One sweep point: forward-backward at one noise level; returns the level's
    :meth:`~layerwise.hierarchy.forward_backward.LevelResult.summary`.

    ``config`` holds ``v, n_c, m, s, L, rules_seed`` (the RHM), ``process`` ("eps", "uniform", "mask"),
    ``level``, ``n_data`` (starting data), ``n_traj`` (runs per datum) and ``float32`` (BP precision);
    ``seed`` draws the starting data (the noise uses ``seed + 1``). An optional ``threads`` runs the point
    with that many torch threads (instead of the sweep's ``threads``): the last bits of BP's sums depend on
    it, so it is part of the point's config and the numbers stay the same on every executor. An optional
    ``device`` (default ``"cpu"``) is where the leaf evidence is built and BP runs (the data, the noise and
    BP's posterior draws come from CPU generators, so a GPU changes the numbers only by round-off).
    """
    previous = torch.get_num_threads()
    if config.get("threads") and config["threads"] != previous:
        torch.set_num_threads(config["threads"])
    try:
        rhm = RHM(config["v"], config["n_c"], config["m"], config["s"], config["L"],
                  seed=config["rules_seed"])
        data = rhm.sample(config["n_data"], seed=seed)
        den = BPDenoiser(rhm, dtype=torch.float32 if config["float32"] else torch.float64,
                         device=config.get("device", "cpu"))
        res = forward_backward(data, config["process"], [config["level"]], config["n_traj"], den,
                               seed=seed + 1, keep_trajectories=False)
        return res.levels[0].summary()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _nan(value: Any) -> Any:
    """Undo the JSON round trip of the sweep files: None (a NaN) back to NaN, in lists too."""
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_nan(v) for v in value]
    return value


def measure_curves(name: str, curves: Sequence[tuple[dict[str, Any], Sequence[float], int]],
                   out: Path) -> list[list[dict[str, Any]]]:
    """Run every ``(common config, levels, data seed)`` curve on the sweep runner, one point per level.

    Returns the rows of each curve (one :func:`level_point` summary per level, in the order of ``levels``).
    The points are kept under ``current_options().folder_for(name, out / "points")``.
    """
    points = [Point({**common, "level": float(t)}, seed) for common, levels, seed in curves for t in levels]
    opts = current_options()
    threads = {common.get("threads") for common, _, _ in curves}
    if len(threads) == 1 and None not in threads:  # every point sets it: let the sweep set it once
        opts = dataclasses.replace(opts, threads=threads.pop())
    results = run_sweep(level_point, points, opts.folder_for(name, out / "points"), opts).results()
    rows = [{k: _nan(v) for k, v in r.items()} for r in results]
    grouped, start = [], 0
    for _, levels, _ in curves:
        grouped.append(rows[start:start + len(levels)])
        start += len(levels)
    return grouped
