"""Diffeomorphism stability: deform images with max-entropy diffeos, measure R_f = D_f / G_f of models.

D_f is how much a model's output moves under a small smooth deformation of its input, G_f how much it moves
under isotropic noise of the same norm, each relative to how far apart two different inputs are; the paper
finds that good image classifiers have a small R_f. Here: smooth random images, three models (the identity,
a fully connected net, a convolutional net with global pooling). Run: ``python examples/diffeo.py``
(``--tiny`` for the test size). Guide: docs/guides/diffeo.md.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from layerwise.diffeo import (
    deform,
    relative_stability,
    sample_fields,
    temperature_range,
    typical_displacement,
)


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 1, size, size) images: white noise blurred by upsampling a coarse grid (values ~ N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, size // 4, size // 4, generator=gen)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the measured displacement and each model's D_f, G_f, R_f."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (what the tests run)")
    args = parser.parse_args(argv)
    n, size = (16, 16) if args.tiny else (256, 32)
    x = _smooth_images(n, size, seed=0)

    c = 3
    T_min, T_max = temperature_range(size, c=c)                 # diffeos are smooth and visible in between
    T = (T_min * T_max) ** 0.5
    fields = sample_fields(n, size, size, c=c, T=T, seed=1)     # (n, 2, size, size) displacements in pixels
    measured = float(fields.pow(2).sum(1).sqrt().mean())
    predicted = typical_displacement(size, c, T)                # asymptotic formula
    y = deform(x, fields)                                       # x(p - tau(p)), one field per image
    print(f"T = {T:.4f}: mean displacement {measured:.2f} px (formula {predicted:.2f} px); "
          f"|y - x| / |x| = {float((y - x).norm() / x.norm()):.3f}")

    torch.manual_seed(0)
    models = {
        "identity": nn.Identity(),    # each noise has its image's diffeo norm, so D_f = G_f and R_f = 1
        "fully connected": nn.Sequential(nn.Flatten(), nn.Linear(size * size, 64), nn.ReLU(),
                                         nn.Linear(64, 10)),
        "CNN + global pool": nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(),
                                           nn.Conv2d(16, 16, 5, padding=2), nn.ReLU(),
                                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
    }
    results = {}
    for name, model in models.items():
        # noise_norm="per_image": each noise vector gets its own image's ||tau x - x||. The paper's
        # normalisation (the default, noise_norm="mean") gives every noise vector the mean of those norms;
        # for the identity it gives R_f = E[n^2] / E[n]^2 >= 1 instead of 1.
        r = relative_stability(model.eval(), x, c=c, T=T, n_repeats=2, seed=2, noise_norm="per_image",
                               progress=False)[""]
        paper = relative_stability(model, x, c=c, T=T, n_repeats=2, seed=2, progress=False)[""]
        results[name] = {"D": r.D, "G": r.G, "R": r.R, "R_paper": paper.R}
        print(f"{name:>18}: D_f = {r.D:.4f}, G_f = {r.G:.4f}, R_f = {r.R:.3f} "
              f"(paper's noise norm: R_f = {paper.R:.3f})")
    return {"displacement": measured, "predicted_displacement": predicted, "stability": results}


if __name__ == "__main__":
    main()
