"""TaskVector algebra against dense computations on flattened parameter vectors."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from layerwise.editing import TaskVector


def _models(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pre = {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "h": torch.randn(5, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(10),
        "pos_ids": torch.arange(4),
    }
    fts = []
    for _ in range(2):
        ft = {
            k: (
                v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v + 1
            )
            for k, v in pre.items()
        }
        fts.append(ft)
    return pre, fts


def _flat(sd, keys):
    return torch.cat([sd[k].double().reshape(-1) for k in keys])


FLOAT_KEYS = ["w", "b", "h"]


def test_tensors_are_differences_and_integer_buffers_are_skipped():
    pre, (ft, _) = _models()
    tau = TaskVector(pre, ft)
    assert tau.keys() == FLOAT_KEYS
    for k in FLOAT_KEYS:
        assert torch.allclose(tau[k].double(), ft[k].double() - pre[k].double(), atol=1e-6)
    assert tau["h"].dtype == torch.float64 and tau["w"].dtype == torch.float32


def test_algebra_matches_dense_vectors():
    pre, (ft1, ft2) = _models(1)
    t1, t2 = TaskVector(pre, ft1), TaskVector(pre, ft2)
    v1 = _flat(ft1, FLOAT_KEYS) - _flat(pre, FLOAT_KEYS)
    v2 = _flat(ft2, FLOAT_KEYS) - _flat(pre, FLOAT_KEYS)
    combo = 2.5 * t1 - t2 * 0.5 + (-t1)
    assert torch.allclose(_flat(combo.to_dict(), FLOAT_KEYS), 1.5 * v1 - 0.5 * v2, atol=1e-5)
    assert torch.allclose(_flat(sum([t1, t2]).to_dict(), FLOAT_KEYS), v1 + v2, atol=1e-5)
    assert t1.dot(t2) == pytest.approx(float(v1 @ v2), rel=1e-5)
    assert t1.norm(1) == pytest.approx(float(v1.abs().sum()), rel=1e-5)
    assert t1.norm(2) == pytest.approx(float(v1.norm()), rel=1e-5)
    assert t1.dot(t1) == pytest.approx(t1.norm(2) ** 2, rel=1e-6)


def test_apply_to_adds_scaled_vector_and_copies_buffers():
    pre, (ft, _) = _models(2)
    tau = TaskVector(pre, ft)
    out = tau.apply_to(pre, scale=1.0)
    for k in FLOAT_KEYS:
        assert torch.allclose(out[k], ft[k], atol=1e-5) and out[k].dtype == pre[k].dtype
    assert torch.equal(out["bn.num_batches_tracked"], pre["bn.num_batches_tracked"])
    neg = (-tau).apply_to(pre, scale=0.3)  # forgetting: theta_0 - 0.3 tau
    assert torch.allclose(neg["w"], pre["w"] - 0.3 * (ft["w"] - pre["w"]), atol=1e-6)


def test_lazy_over_files_equals_in_memory(tmp_path):
    pre, (ft, _) = _models(3)
    safetensors.torch.save_file(pre, str(tmp_path / "pre.safetensors"))
    safetensors.torch.save_file(ft, str(tmp_path / "ft.safetensors"))
    lazy = TaskVector(tmp_path / "pre.safetensors", tmp_path / "ft.safetensors")
    mem = TaskVector(pre, ft)
    assert lazy.norm(1) == pytest.approx(mem.norm(1), rel=1e-12)
    assert set(lazy.keys()) == set(mem.keys())


def test_errors_name_the_problem():
    pre, (ft, _) = _models(4)
    bad = dict(ft, w=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="shape of 'w'"):
        TaskVector(pre, bad)
    t = TaskVector(pre, ft)
    other = TaskVector({"w": pre["w"]}, {"w": ft["w"]})
    with pytest.raises(ValueError, match="differ"):
        _ = t + other
    with pytest.raises(TypeError, match="real number"):
        _ = t * "2"
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        t.norm(3)
    with pytest.raises(ValueError, match="base lacks"):
        t.apply_to({"w": pre["w"]})
