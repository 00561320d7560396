"""Locality defeats the curse of dimensionality: teacher-student learning curves of kernel regression.

The teacher is a Gaussian random field with a *local* Laplace kernel (filters of s = 2 adjacent sites of a
ring of d = 8 sites). The test error of a student decays as ``P**-beta``: about 1/2 for the local student
(set by the filter size, not by d), a plateau for the convolutional one (it cannot represent a teacher that
is not translation-invariant) and about 1/d for the full Laplace kernel (the curse of dimensionality).
Run: ``python examples/kernels_locality.py`` (``--tiny`` for the test size).
Guide: docs/guides/kernels.md.
"""

from __future__ import annotations

import argparse

from layerwise.kernels import hypercube, learning_curve, make_kernel


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the fitted decay exponent of each student."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (what the tests run)")
    args = parser.parse_args(argv)
    tiny = ([32, 64, 128], 128, [0, 1])
    P_list, n_test, seeds = tiny if args.tiny else ([64, 128, 256, 512], 512, [0, 1, 2, 3])

    teacher = make_kernel({"type": "local", "s": 2, "sigma": 2.0})
    students = {name: make_kernel({"type": name, "s": 2, "sigma": 2.0}) for name in ("local", "conv")}
    students["full"] = make_kernel({"type": "full", "sigma": 2.0})
    curves = learning_curve(teacher, students, P_list=P_list, n_test=n_test, seeds=seeds,
                            sampler=hypercube(8))               # inputs uniform in [0, 1]^8
    betas = {}
    for (_, student), curve in curves.items():
        fit = curve.fit()                          # beta with a 95% interval (jackknife over seeds)
        betas[student] = fit.beta
        print(f"student {student:>5}: test error ~ P^-beta, beta = {fit}")
    return {"beta": betas, "P": P_list}


if __name__ == "__main__":
    main()
