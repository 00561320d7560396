"""relative_stability: exact cases (identity, constant model), random linear model, options, bad input."""

from __future__ import annotations

import pytest
import torch

from layerwise.diffeo import relative_stability, temperature_for_displacement
from layerwise.errors import ParameterError


class Counting(torch.nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.inner(x)


def _images(n=40, c=1, size=12, seed=0, dtype=torch.float64):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_random_linear_model_on_white_noise_has_R_near_one():
    """A random linear map does not know diffeos from noise: R_f within 10% of 1 (paper: R_f ~ 1 at init)."""
    torch.manual_seed(0)
    x = torch.randn(300, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 256, 64))
    r = relative_stability(model, x, c=3, n_repeats=2, seed=2, progress=False)[""]
    assert abs(r.R - 1) < 0.1, r
    assert r.D > 0 and r.G > 0


def test_blur_is_more_stable_to_noise_than_to_diffeos():
    """A local average (6 x 6 pooling) removes most of white noise (power / 36) but little of the change a
    smooth displacement makes to a smooth image: R_f well above 1. (The identity has R = 1 exactly: the
    measure separates models.)"""
    g = torch.Generator().manual_seed(3)
    coarse = torch.rand(60, 1, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(24, 24), mode="bilinear", align_corners=True)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(6), torch.nn.Flatten())
    r = relative_stability(model, x, c=3, seed=0, progress=False)[""]
    assert r.R > 5, r


def test_layers_are_read_by_hooks_at_their_own_outputs():
    x = _images(30, c=2)
    conv = torch.nn.Conv2d(2, 3, 3).double()
    head = torch.nn.Linear(3 * 100, 4).double()
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), head)
    res = relative_stability(model, x, layers=["0", "3", ""], c=3, seed=0, progress=False)
    assert res["3"] == res[""].__class__(**{**res[""].to_dict(), "layer": "3"})  # last module = output
    # Layer "0" is the conv output: measured directly on a model made of the conv alone, same draws.
    alone = relative_stability(conv, x, c=3, seed=0, progress=False)[""]
    assert res["0"].D == pytest.approx(alone.D, rel=1e-12) and res["0"].R == pytest.approx(alone.R, rel=1e-12)
    assert res["0"].R != pytest.approx(res[""].R, rel=1e-3)


def test_options_are_used():
    x = _images(25)
    model = Counting(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 3).double()))
    base = relative_stability(model, x, c=3, seed=0, batch_size=10, n_repeats=2, progress=False)[""]
    assert max(model.calls) <= 10
    # 3 batches x 2 sweeps (diffeos, then noise) x (clean + 2 repeats)
    assert len(model.calls) == 3 * 2 * (1 + 2)
    assert base.n_repeats == 2 and base.n_images == 25
    again = relative_stability(model, x, c=3, seed=0, batch_size=10, n_repeats=2, progress=False)[""]
    assert again == base  # same seed, same numbers
    assert relative_stability(model, x, c=3, seed=1, batch_size=10, progress=False)[""].D != base.D
    cold = relative_stability(model, x, c=3, T=base.T / 16, seed=0, batch_size=10, n_repeats=2,
                              allow_below_T_min=True, progress=False)[""]
    assert cold.T == base.T / 16 and cold.diffeo_sq < 0.6 * base.diffeo_sq
    assert base.T == pytest.approx(temperature_for_displacement(12, 3, 1.0))
    c5 = relative_stability(model, x, c=5, T=base.T, seed=0, batch_size=10, progress=False)[""]
    assert c5.c == 5 and c5.diffeo_sq != base.diffeo_sq
    near = relative_stability(model, x, c=3, seed=0, batch_size=10, mode="nearest", progress=False)[""]
    assert near.diffeo_sq != base.diffeo_sq
    med = relative_stability(model, x, c=3, seed=0, batch_size=10, n_repeats=2, estimator="median",
                             progress=False)[""]
    assert med.estimator == "median" and med.pair_sq != base.pair_sq
    per = relative_stability(model, x, c=3, seed=0, batch_size=10, n_repeats=2, noise_norm="per_image",
                             progress=False)[""]
    assert per.noise_norm == "per_image" and per.D == base.D and per.G != base.G


def test_progress_bar_is_shown_only_when_asked(capsys):
    x = _images(8)
    model = torch.nn.Flatten()
    relative_stability(model, x, c=3, seed=0, progress=False)
    assert "relative stability" not in capsys.readouterr().err
    relative_stability(model, x, c=3, seed=0, progress=True)
    assert "relative stability" in capsys.readouterr().err


def test_bad_input_names_the_parameter():
    x = _images(6)
    model = torch.nn.Flatten()
    with pytest.raises(ParameterError, match="T"):
        relative_stability(model, x, T=-1.0, progress=False)
    with pytest.raises(ParameterError, match="c"):
        relative_stability(model, x, c=0, T=1e-3, progress=False)
    with pytest.raises(ParameterError, match="images"):
        relative_stability(model, x[0], progress=False)  # 3-D where 4-D is needed
    with pytest.raises(ParameterError, match="layers"):
        relative_stability(model, x, layers=["fc9"], progress=False)
    with pytest.raises(ParameterError, match="estimator"):
        relative_stability(model, x, estimator="mode", progress=False)
    with pytest.raises(ParameterError, match="images"):
        relative_stability(model, x[:1], progress=False)
    with pytest.raises(ParameterError, match="n_repeats"):
        relative_stability(model, x, n_repeats=0, progress=False)
    with pytest.raises(ParameterError, match="noise_norm"):
        relative_stability(model, x, noise_norm="max", progress=False)
    with pytest.raises(ParameterError, match="max_seconds"):
        relative_stability(model, x, max_seconds=0, progress=False)
    # A failed call leaves no hooks behind.
    seq = torch.nn.Sequential(torch.nn.Flatten())
    with pytest.raises(ParameterError):
        relative_stability(seq, x, layers=["0", "nope"], progress=False)
    assert not seq[0]._forward_hooks
