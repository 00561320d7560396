"""deform (grid_sample) vs an authors'-style remap, identity, modes, dtypes; matched noise; RandomDiffeo."""

from __future__ import annotations

import pytest
import torch

from layerwise.diffeo import (
    RandomDiffeo,
    deform,
    matched_noise,
    sample_coefficients,
    sample_fields,
    temperature_range,
)
from layerwise.errors import ParameterError, ParameterTypeError


def remap_reference(image: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """One image (C, H, W), written like the authors' ``remap`` (floor/ceil gathers, clamped coordinates),
    with the sign of the paper: out(p) = image(p - tau(p))."""
    h, w = image.shape[-2:]
    y, x = torch.meshgrid(torch.arange(h, dtype=dx.dtype), torch.arange(w, dtype=dx.dtype), indexing="ij")
    x = (x - dx).clamp(0, w - 1)
    y = (y - dy).clamp(0, h - 1)
    xf, yf = x.floor().long(), y.floor().long()
    xc, yc = x.ceil().long(), y.ceil().long()
    xv, yv = x - xf, y - yf

    def at(xi, yi):
        return image[:, yi, xi]

    return ((1 - yv) * (1 - xv) * at(xf, yf) + (1 - yv) * xv * at(xc, yf) + yv * (1 - xv) * at(xf, yc)
            + yv * xv * at(xc, yc))


def test_batched_equals_one_at_a_time_and_the_reference_float64():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 14, 19, generator=gen, dtype=torch.float64)
    _, t_max = temperature_range(14, 5)
    fields = sample_fields(5, 14, 19, 5, 2 * t_max, seed=1, dtype=torch.float64)  # large: clamping is hit
    assert float(fields.abs().max()) > 1.5
    batched = deform(images, fields)
    for b in range(5):
        single = deform(images[b:b + 1], fields[b:b + 1])
        assert torch.allclose(batched[b:b + 1], single, atol=1e-12, rtol=0)
        ref = remap_reference(images[b], fields[b, 0], fields[b, 1])
        assert torch.allclose(batched[b], ref, atol=1e-12, rtol=0)


def test_small_temperature_is_the_identity():
    """To 1e-12 in float64. In float32 grid_sample's own round trip through [-1, 1] coordinates costs
    ~W * 2**-24 pixels (1.4e-6 at W = 16 for T = 0 exactly), so float32 is held to 4e-6."""
    images = torch.rand(4, 2, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = deform(images, sample_fields(4, 16, 16, 3, 0.0, seed=0))
    assert (out - images).abs().max() < 1e-12
    out = deform(images, sample_fields(4, 16, 16, 3, 1e-16, seed=0))  # ~1e-7 pixel displacements
    assert (out - images).abs().max() < 1e-6
    out32 = deform(images.float(), sample_fields(4, 16, 16, 3, 0.0, seed=0))
    assert (out32 - images.float()).abs().max() < 4e-6
    moved = deform(images, sample_fields(4, 16, 16, 3, 1e-3, seed=0))
    assert (moved - images).abs().max() > 1e-2


def test_a_uniform_shift_moves_content_by_the_field():
    """out(p) = in(p - tau): a field of +1 px horizontally moves the picture one pixel to the right, and the
    left column is clamped (border padding) to the first column."""
    img = torch.arange(20.0).reshape(1, 1, 4, 5)
    field = torch.zeros(1, 2, 4, 5)
    field[:, 0] = 1.0
    out = deform(img, field)
    assert torch.allclose(out[..., 1:], img[..., :-1], atol=1e-5)
    assert torch.allclose(out[..., 0], img[..., 0], atol=1e-5)
    field = torch.zeros(1, 2, 4, 5)
    field[:, 1] = -1.0  # up
    out = deform(img, field)
    assert torch.allclose(out[..., :-1, :], img[..., 1:, :], atol=1e-5)


def test_nearest_mode_picks_existing_pixels():
    images = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fields = sample_fields(3, 12, 12, 4, 3e-3, seed=3, dtype=torch.float64)
    near = deform(images, fields, mode="nearest")
    lin = deform(images, fields, mode="bilinear")
    for b in range(3):
        values = set(images[b].flatten().tolist())
        assert all(v in values for v in near[b].flatten().tolist())
    assert (near - lin).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 1, 9, 9), (2, 4, 10, 17)])
def test_shapes_channels_and_dtypes(dtype, shape):
    images = torch.rand(shape, dtype=dtype)
    n, _, h, w = shape
    out = deform(images, sample_fields(n, h, w, 3, 1e-3, seed=0, dtype=torch.float64))
    assert out.shape == images.shape and out.dtype == dtype
    # Every channel gets the same displacement: deforming channels separately gives the same result.
    fields = sample_fields(n, h, w, 3, 1e-3, seed=0)
    per_channel = torch.cat([deform(images[:, k:k + 1], fields) for k in range(shape[1])], 1)
    assert torch.allclose(deform(images, fields), per_channel, atol=1e-6)


def test_matched_noise_has_the_diffeo_norm():
    images = torch.rand(6, 3, 16, 16, dtype=torch.float64)
    deformed = deform(images, sample_fields(6, 16, 16, 5, 2e-3, seed=0))
    eta = matched_noise(images, deformed, seed=1)
    target = (deformed - images).flatten(1).norm(dim=1)
    assert torch.allclose(eta.flatten(1).norm(dim=1), target, rtol=1e-12, atol=0)
    assert float(target.min()) > 0
    # Its direction is Gaussian: not the diffeo's change.
    cos = (eta.flatten(1) * (deformed - images).flatten(1)).sum(1) / target**2
    assert float(cos.abs().max()) < 0.3
    assert torch.equal(eta, matched_noise(images, deformed, seed=1))


def test_random_diffeo_is_seeded_and_accepts_3d_and_4d():
    x = torch.rand(4, 3, 16, 16)
    a = RandomDiffeo(c=3, T=2e-3, generator=0)
    b = RandomDiffeo(c=3, T=2e-3, generator=torch.Generator().manual_seed(0))
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb) and not torch.equal(ya, x)
    assert not torch.equal(a(x), ya)  # the generator advances
    # Same as the functional path with the same draws.
    ref = deform(x, sample_fields(4, 16, 16, 3, torch.full((4,), 2e-3), seed=0))
    assert torch.allclose(ya, ref, atol=1e-6)
    # One field per image: different images get different fields.
    same = RandomDiffeo(c=3, T=2e-3, generator=1)(x[:1].expand(2, -1, -1, -1).contiguous())
    assert (same[0] - same[1]).abs().max() > 1e-3
    single = RandomDiffeo(c=3, T=2e-3, generator=0)(x[0])
    assert single.shape == (3, 16, 16) and not torch.equal(single, x[0])


def test_random_diffeo_T_range_mode_and_uint8():
    aug = RandomDiffeo(c=3, T_range=(1e-4, 1e-2), generator=0)
    T = aug.make_params(torch.zeros(2000, 1, 8, 8))["T"]
    assert float(T.min()) >= 1e-4 and float(T.max()) <= 1e-2
    # log-uniform: the median is the geometric mean of the ends, 1e-3.
    assert abs(float(T.log10().median()) + 3) < 0.05
    x = torch.rand(2, 1, 12, 12)
    near = RandomDiffeo(c=3, T=3e-3, mode="nearest", generator=0)(x)
    lin = RandomDiffeo(c=3, T=3e-3, mode="bilinear", generator=0)(x)
    assert (near - lin).abs().max() > 1e-3
    img = (torch.rand(3, 16, 16) * 255).to(torch.uint8)
    out = RandomDiffeo(c=3, T=1e-3, generator=0)(img)
    assert out.dtype == torch.uint8 and out.shape == img.shape
    seq = torch.nn.Sequential(RandomDiffeo(c=3, T=1e-3, generator=0), torch.nn.Flatten())
    assert seq(x).shape == (2, 144)
    assert "T_range" in repr(aug)
    # The same drawn params deform an image batch and its label masks alike.
    aug = RandomDiffeo(c=3, T=3e-3, generator=2)
    params = aug.make_params(x)
    mask = (x > 0.5).double()
    warped_mask = aug.transform(mask, params, mode="nearest")
    assert torch.equal(warped_mask, deform(mask, params["fields"], mode="nearest"))
    assert set(warped_mask.unique().tolist()) <= {0.0, 1.0}


def test_bad_input_names_the_parameter():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ParameterError, match="images"):
        deform(x[0], sample_fields(1, 8, 8, 3, 1e-3, seed=0))  # 3-D where 4-D is needed
    with pytest.raises(ParameterError, match="fields"):
        deform(x, sample_fields(1, 8, 8, 3, 1e-3, seed=0))
    with pytest.raises(ParameterError, match="mode"):
        deform(x, sample_fields(2, 8, 8, 3, 1e-3, seed=0), mode="bicubic")
    with pytest.raises(ParameterTypeError, match="images"):
        deform(x.to(torch.int64), sample_fields(2, 8, 8, 3, 1e-3, seed=0))
    with pytest.raises(ParameterError, match="T"):
        RandomDiffeo(c=3)
    with pytest.raises(ParameterError, match="T"):
        RandomDiffeo(c=3, T=-1.0)
    with pytest.raises(ParameterError, match="c"):
        RandomDiffeo(c=0, T=1e-3)
    with pytest.raises(ParameterError, match="T_range"):
        RandomDiffeo(c=3, T_range=(0.0, 1e-3))
    with pytest.raises(ParameterError, match="images"):
        RandomDiffeo(c=3, T=1e-3)(torch.rand(8, 8))
    with pytest.raises(ParameterError, match="deformed"):
        matched_noise(x, x[:1], seed=0)
    assert sample_coefficients(0, 3, 1e-3, seed=0).shape == (0, 2, 3, 3)


def test_random_diffeo_rounds_integer_images_to_nearest():
    """uint8 input: the result is the float deformation (same draws) rounded to the nearest integer and
    clamped to [0, 255]; truncation would be off by one on about half of the pixels."""
    img = (torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    out = RandomDiffeo(c=3, T=2e-3, generator=7)(img)
    exact = RandomDiffeo(c=3, T=2e-3, generator=7)(img.to(torch.float32))  # the same fields
    assert out.dtype == torch.uint8
    assert torch.equal(out, exact.round().clamp(0, 255).to(torch.uint8))
    frac = exact - exact.floor()
    assert float((frac > 0.5).double().mean()) > 0.2  # many pixels where rounding and truncation differ
