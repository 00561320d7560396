"""Every script in examples/ runs at its tiny size and shows what it claims to show.

Each example is imported from its file and its ``main(["--tiny"])`` called; the assertions check the
property the example demonstrates (closed forms, orderings the papers predict, exact identities), so an
example that silently stopped demonstrating it fails here.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NINE = ["rhm", "diffusion", "kernels_locality", "hierarchical_kernels", "diffeo", "task_arithmetic",
        "tangent_space", "lines", "m3id"]


def run(name: str, *args: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--tiny", *args])


def test_one_example_per_system():
    from layerwise.experiments.claims import SYSTEMS

    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(NINE)
    assert len(NINE) == len(SYSTEMS)


def test_rhm_enumeration_is_complete_and_indices_round_trip():
    out = run("rhm")
    v, m, s, L = 4, 2, 2, 2
    assert out["P_max"] == v * m ** ((s**L - 1) // (s - 1)) == out["distinct"]
    assert out["d"] == s**L
    assert out["round_trip"]
    assert out["labels"] == out["tree_root"]


def test_diffusion_class_is_lost_above_the_threshold():
    out = run("diffusion")
    kept = list(out["class_kept"].values())            # levels 0.1, eps*, 0.98
    assert 0 < out["eps_star"] < 1
    assert kept[0] > 0.9 and kept[2] < 0.25 and kept[0] > kept[1] > kept[2]


def test_kernels_locality_orders_the_students_as_the_paper():
    beta = run("kernels_locality")["beta"]
    assert beta["conv"] < 0.1                           # plateau: cannot represent a non-invariant teacher
    assert beta["local"] > beta["full"] > beta["conv"]  # locality beats the full kernel


def test_hierarchical_kernel_adapts_to_a_local_target():
    out = run("hierarchical_kernels")
    assert out["gram_shape"] == (256, 256)
    for ev in out["spectra"].values():
        assert all(a >= b - 1e-12 for a, b in zip(ev, ev[1:], strict=False)) and ev[-1] > -1e-10
    assert out["beta"]["first patch"] > out["beta"]["whole input"] > 0


def test_diffeo_identity_has_relative_stability_one():
    out = run("diffeo")
    for name, r in out["stability"].items():
        assert r["R"] == pytest.approx(r["D"] / r["G"], rel=1e-9), name
    assert out["stability"]["identity"]["R"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < out["displacement"] < 3 * out["predicted_displacement"]


def test_task_arithmetic_addition_does_both_tasks():
    losses = run("task_arithmetic")["losses"]
    for merged in ("A + B (task arithmetic)", "TIES + LiNeS"):
        a, b = losses[merged]
        assert a < 0.05 * losses["pre-trained"][0] and b < 0.05 * losses["pre-trained"][1], merged
    assert losses["fine-tuned A"][1] > 0.5 * losses["pre-trained"][1]   # each fine-tune alone: one task only


def test_tangent_space_is_a_first_order_expansion_and_addition_helps():
    out = run("tangent_space")
    assert all(3.6 < r < 4.4 for r in out["taylor_ratios"])
    for name in ("plain", "linearized"):
        acc = out[name]["added_accuracy"]
        assert all(a > p + 0.2 for a, p in zip(acc, out["pretrained_accuracy"], strict=True)), name
        assert 0 <= out[name]["mean_xi"] <= 1


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_lines_scales_follow_the_closed_form(alpha):
    out = run("lines", "--alpha", str(alpha))
    (depth,) = out["num_blocks"].values()
    assert depth == 6
    for key, scale in out["scales"].items():
        i = int(key.split(".")[1])
        assert scale == pytest.approx(alpha + (1 - alpha) * i / (depth - 1), rel=1e-6), key
    errors = out["errors"]
    assert errors["fine-tuned"][1] < errors["pre-trained"][1]
    assert errors["LiNeS"][0] < errors["fine-tuned"][0]         # the edit forgets less of task A


def test_m3id_without_correction_equals_greedy():
    pytest.importorskip("transformers")
    out = run("m3id", "--lambda", "0")
    assert out["m3id"] == out["greedy"] and len(out["greedy"]) == 4
    for metrics in out["chair"].values():
        assert all(0 <= metrics[k] <= 1 or math.isnan(metrics[k]) for k in ("chair_i", "chair_s"))
