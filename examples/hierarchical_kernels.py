"""Deep hierarchical CNN kernels: the tree-CNN NTK adapts to targets that depend on few input patches.

The neural tangent kernel of a tree CNN (filter = stride, layers of filter sizes (4, 4), inputs of d = 16
coordinates in 4 unit-norm patches) is computed exactly; its spectrum is printed beside that of a shallow
(16,) tree. As a student it learns a teacher that depends on the first patch only (effective dimension 3)
with a larger exponent than a teacher that depends on the whole input. Run:
``python examples/hierarchical_kernels.py`` (``--tiny`` for the test size). Guide: docs/guides/kernels.md.
"""

from __future__ import annotations

import argparse

import torch

from layerwise.kernels import hierarchical_kernel, kernel_spectrum, learning_curve, make_kernel, patch_spheres


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the spectra's head and the fitted exponent of each teacher."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (what the tests run)")
    args = parser.parse_args(argv)
    n_spec, P_list, n_test, seeds = ((256, [32, 64, 128, 256], 256, [0, 1]) if args.tiny
                                     else (1024, [64, 128, 256, 512, 1024], 1024, [0, 1, 2, 3]))
    sampler = patch_spheres(16, 4)                               # (n, 16): 4 patches, each on S^3
    X = sampler(n_spec, torch.Generator().manual_seed(0))
    K = hierarchical_kernel(X, None, filters=(4, 4), kind="ntk")  # (n, n) float64, exact
    spectra = {f: kernel_spectrum(make_kernel({"type": "hierarchical", "filters": list(f)}), X)
               for f in [(4, 4), (16,)]}
    for f, ev in spectra.items():
        print(f"filters {f}: leading eigenvalues {[round(float(e), 4) for e in ev[:5]]}, "
              f"eigenvalue 100 / eigenvalue 1 = {float(ev[99] / ev[0]):.2e}")

    student = make_kernel({"type": "hierarchical", "filters": [4, 4], "kind": "ntk"})
    teachers = {"first patch": make_kernel({"type": "hierarchical", "filters": [4], "support": [0, 4]}),
                "whole input": make_kernel({"type": "hierarchical", "filters": [4, 4]})}
    curves = learning_curve(teachers, {"tree NTK": student}, P_list=P_list, n_test=n_test, seeds=seeds,
                            sampler=sampler)
    betas = {}
    for (teacher, _), curve in curves.items():
        fit = curve.fit()
        betas[teacher] = fit.beta
        print(f"teacher {teacher:>12}: test error ~ P^-beta, beta = {fit}")
    return {"gram_shape": tuple(K.shape), "spectra": {f: ev[:100].tolist() for f, ev in spectra.items()},
            "beta": betas}


if __name__ == "__main__":
    main()
