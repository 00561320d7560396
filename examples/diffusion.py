"""Diffusion on hierarchical data: the class survives noise below a threshold and is lost above it.

Forward-backward experiment with the exact denoiser (belief propagation): noise RHM data with the eps-process,
draw clean data back from the exact posterior, and measure how often the class is kept; compare with the
mean-field threshold eps*. Run: ``python examples/diffusion.py`` (``--tiny`` for the test size).
Guides: docs/guides/diffusion.md, docs/guides/belief-propagation.md.
"""

from __future__ import annotations

import argparse

from layerwise.hierarchy import RHM, BPDenoiser, critical_noise
from layerwise.hierarchy.forward_backward import forward_backward


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the fraction of classes kept at each noise level and eps*."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (what the tests run)")
    args = parser.parse_args(argv)
    v, m, L = 16, 4, (4 if args.tiny else 7)
    n_data, n_traj = (32, 4) if args.tiny else (256, 16)

    rhm = RHM(v=v, n_c=v, m=m, s=2, L=L, seed=0)
    eps_star = critical_noise(v, m, 2)                          # mean-field threshold
    levels = [0.1, round(eps_star, 2), 0.98]
    res = forward_backward(rhm.sample(n_data, seed=1), "eps", levels, n_trajectories=n_traj,
                           denoiser=BPDenoiser(rhm), seed=2, keep_trajectories=False)
    kept = {lv.level: float(lv.summary()["class_kept"]) for lv in res.levels}
    print(f"RHM(v={v}, m={m}, L={L}), mean-field eps* = {eps_star:.3f}")
    for level, fraction in kept.items():
        print(f"  eps = {level:.2f}: class kept in {fraction:.2f} of reconstructions (chance {1 / v:.2f})")
    return {"eps_star": eps_star, "class_kept": kept, "n_classes": v}


if __name__ == "__main__":
    main()
