"""Maximum-entropy displacement fields (Petrini, Favero, Geiger, Wyart, NeurIPS 2021, Sec. 2).

Coordinates ``u`` (along the width) and ``v`` (along the height) run over ``[0, 1]`` from the first to the
last pixel centre: ``u_k = k / (W - 1)``, as in the authors' code (``torch.linspace(0, 1, n)``). Each
component of the displacement field is an independent sine series that vanishes on the border::

    tau_a(u, v) = sum_{i, j >= 1} C_aij sin(i pi u) sin(j pi v),    C_aij ~ N(0, T / (i^2 + j^2))   (eq. 3)

**Cutoff convention.** Modes with ``sqrt(i^2 + j^2) < c + 0.5`` are kept (the authors' code; some ports use
``i^2 + j^2 <= c^2``, which drops e.g. (3, 1) at c = 3). With this rule the largest single index is ``c``.

**Units.** ``tau`` is measured in units of the image side, and as in the paper a displacement ``tau`` is
``tau * n`` pixels (``tau_u * W`` horizontally, ``tau_v * H`` vertically). The fields returned here are in
pixels, the unit :func:`layerwise.diffeo.deform` takes. (Between the border pixel centres there are ``n - 1``
pixel steps, not ``n``: the paper's formulas ignore that 1/n difference and so do we.)

Temperature range (paper, Sec. 2): ``T_min = 1 / (pi n^2 ln c)`` gives a typical displacement of half a
pixel at the centre; ``T_max = 4 / (pi^3 c^2 ln c)`` is the largest T at which typical fields have no
"overhangs" (the map stays a diffeomorphism). The typical displacement at the centre is asymptotically
(large c) ``delta = (n / 2) sqrt(pi T ln c)`` pixels; at small c the finite sum is larger (c = 5: x1.15), so
:func:`estimate_typical_displacement` (Monte-Carlo) or :func:`centre_displacement_rms` (exact mode sum)
should be used when the number matters.

>>> fields = sample_fields(4, 32, 32, c=3, T=1e-3, seed=0)   # (4, 2, 32, 32), pixels
>>> fields.shape
torch.Size([4, 2, 32, 32])
>>> T_min, T_max = temperature_range(32, 3)
"""

from __future__ import annotations

import math

import torch

from .._resources import check_memory
from ..errors import ParameterError
from ._checks import check_float, check_int, check_temperature, generator_of

__all__ = [
    "mode_mask",
    "mode_std",
    "sine_basis",
    "sample_coefficients",
    "fields_from_coefficients",
    "sample_fields",
    "temperature_range",
    "typical_displacement",
    "temperature_for_displacement",
    "centre_displacement_rms",
    "estimate_typical_displacement",
]


def mode_mask(c: int) -> torch.Tensor:
    """Kept modes: ``mask[i-1, j-1] = sqrt(i^2 + j^2) < c + 0.5`` for ``i, j = 1..c``. Shape (c, c), bool."""
    c = check_int("c", c, low=1)
    k = torch.arange(1, c + 1, dtype=torch.float64)
    r2 = k[:, None] ** 2 + k[None, :] ** 2
    return r2.sqrt() < c + 0.5


def mode_std(c: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard deviation of each coefficient at T = 1: ``1 / sqrt(i^2 + j^2)`` on kept modes, else 0.

    Returns shape (c, c), indexed ``[i - 1, j - 1]`` (i along the width, j along the height).
    """
    mask = mode_mask(c)
    k = torch.arange(1, c + 1, dtype=torch.float64)
    r2 = k[:, None] ** 2 + k[None, :] ** 2
    return (mask / r2.sqrt()).to(dtype)


def sine_basis(n: int, modes: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``sin(k pi x_p)`` at ``x_p = p / (n - 1)``, p = 0..n-1, k = 1..modes. Shape (n, modes)."""
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    k = torch.arange(1, modes + 1, dtype=torch.float64)
    return torch.sin(math.pi * x[:, None] * k[None, :]).to(dtype=dtype, device=device)


def sample_coefficients(
    n: int, c: int, T: float | torch.Tensor, seed: int | torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Draw the sine coefficients of ``n`` fields: ``C[b, a, i-1, j-1] ~ N(0, T_b / (i^2 + j^2))``.

    Parameters
    ----------
    n : number of fields.
    c : cutoff (>= 1); modes with ``sqrt(i^2 + j^2) < c + 0.5`` are kept.
    T : temperature (>= 0), one number or a tensor (n,) with one temperature per field.
    seed : int, CPU ``torch.Generator`` or None. Draws are made on the CPU in float64, so the same seed gives
        the same fields on every device and dtype.

    Returns
    -------
    Tensor (n, 2, c, c), float64 on the CPU unless ``dtype`` says otherwise; component 0 is horizontal.
    """
    n = check_int("n", n, low=0)
    c = check_int("c", c, low=1)
    T = check_temperature(T, n)
    check_memory(8 * c * c * (4 * n + 4), f"the sine coefficients of {n} fields with cutoff c = {c}")
    gen = generator_of(seed)
    std = mode_std(c)  # (c, c)
    z = torch.randn(n, 2, c, c, generator=gen, dtype=torch.float64)
    if isinstance(T, torch.Tensor):
        scale = T.detach().to("cpu", torch.float64).sqrt().reshape(n, 1, 1, 1)  # (n, 1, 1, 1)
    else:
        scale = math.sqrt(T)
    return (z * std * scale).to(dtype)


def fields_from_coefficients(coefficients: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Displacement fields in pixels from sine coefficients, for the whole batch in one einsum.

    Parameters
    ----------
    coefficients : (n, 2, m, m) tensor ``C[b, a, i-1, j-1]`` (i along the width, j along the height), in
        units of the image side. Component a = 0 is horizontal, a = 1 vertical.
    height, width : image size in pixels (>= 2).

    Returns
    -------
    Tensor (n, 2, height, width), same dtype and device as ``coefficients``: ``out[b, 0]`` is the horizontal
    displacement ``tau_u * width`` and ``out[b, 1]`` the vertical one ``tau_v * height``, in pixels.
    """
    if not isinstance(coefficients, torch.Tensor) or coefficients.dim() != 4 or coefficients.shape[1] != 2 \
            or coefficients.shape[2] != coefficients.shape[3]:
        shape = tuple(coefficients.shape) if isinstance(coefficients, torch.Tensor) else type(coefficients)
        raise ParameterError(f"coefficients must be a tensor of shape (n, 2, m, m), got {shape}")
    height = check_int("height", height, low=2)
    width = check_int("width", width, low=2)
    m = coefficients.shape[-1]
    n = coefficients.shape[0]
    check_memory(coefficients.element_size() * (3 * n * 2 * height * width + m * (height + width)),
                 f"{n} displacement fields of {height} x {width} pixels", coefficients.device)
    kw = {"dtype": coefficients.dtype, "device": coefficients.device}
    su = sine_basis(width, m, **kw)  # (W, m): sin(i pi u_x)
    sv = sine_basis(height, m, **kw)  # (H, m): sin(j pi v_y)
    tau = torch.einsum("baij,xi,yj->bayx", coefficients, su, sv)  # (n, 2, H, W), units of the side
    scale = torch.tensor([width, height], **kw).reshape(1, 2, 1, 1)
    return tau * scale


def sample_fields(
    n: int,
    height: int,
    width: int,
    c: int,
    T: float | torch.Tensor,
    seed: int | torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample ``n`` independent maximum-entropy displacement fields at once (no per-image loop).

    Parameters
    ----------
    n : number of fields (one per image).
    height, width : image size in pixels (>= 2); rectangular images are fine.
    c : cutoff (>= 1): modes with ``sqrt(i^2 + j^2) < c + 0.5``.
    T : temperature (>= 0), a number or a tensor (n,) of per-image temperatures
        (see :func:`temperature_range`).
    seed : int, CPU ``torch.Generator`` or None (fresh entropy).
    dtype, device : of the result (coefficients are always drawn on the CPU in float64).

    Returns
    -------
    Tensor (n, 2, height, width): horizontal (``[:, 0]``) and vertical (``[:, 1]``) displacement in pixels;
    zero on the border pixels.

    Example
    -------
    >>> f = sample_fields(8, 24, 32, c=5, T=2e-3, seed=0)
    >>> tuple(f.shape), float(f[:, :, 0].abs().max()) < 1e-5
    ((8, 2, 24, 32), True)
    """
    coefficients = sample_coefficients(n, c, T, seed)
    height = check_int("height", height, low=2)
    width = check_int("width", width, low=2)
    return fields_from_coefficients(coefficients.to(device=device), height, width).to(dtype)


def temperature_range(size: int, c: int) -> tuple[float, float]:
    """``(T_min, T_max) = (1 / (pi n^2 ln c), 4 / (pi^3 c^2 ln c))`` for images of side ``size`` (Sec. 2).

    ``T_min``: typical displacement of half a pixel at the centre (asymptotic formula). ``T_max``: largest T
    without overhangs for typical fields. Needs ``c >= 2`` (``ln 1 = 0``). Note ``T_min < T_max`` only when
    ``size`` is large enough compared with ``c`` (``n^2 > pi^2 c^2 / 4``).
    """
    n = check_int("size", size, low=2)
    c = check_int("c", c, low=2)
    log_c = math.log(c)
    return 1.0 / (math.pi * n**2 * log_c), 4.0 / (math.pi**3 * c**2 * log_c)


def typical_displacement(size: int, c: int, T: float) -> float:
    """Asymptotic typical displacement at the centre, in pixels: ``delta = (n / 2) sqrt(pi T ln c)``.

    The large-c limit of :func:`centre_displacement_rms` (1.27x larger at c = 3, 1.15x at c = 5, 1.08x at
    c = 15). Needs ``c >= 2``.
    """
    n = check_int("size", size, low=2)
    c = check_int("c", c, low=2)
    T = check_float("T", T, low=0.0)
    return 0.5 * n * math.sqrt(math.pi * T * math.log(c))


def temperature_for_displacement(size: int, c: int, delta: float) -> float:
    """The T whose asymptotic typical displacement is ``delta`` pixels: ``4 delta^2 / (pi n^2 ln c)``."""
    n = check_int("size", size, low=2)
    c = check_int("c", c, low=2)
    delta = check_float("delta", delta, low=0.0)
    return 4.0 * delta**2 / (math.pi * n**2 * math.log(c))


def centre_displacement_rms(size: int, c: int, T: float) -> float:
    """Exact root-mean-square displacement (norm of the 2-D vector) at the image centre, in pixels.

    ``E |tau(1/2, 1/2)|^2 n^2 = 2 T n^2 sum_{kept modes, i and j odd} 1 / (i^2 + j^2)``.
    """
    n = check_int("size", size, low=2)
    c = check_int("c", c, low=1)
    T = check_float("T", T, low=0.0)
    k = torch.arange(1, c + 1, dtype=torch.float64)
    odd = (k % 2 == 1).to(torch.float64)
    var = mode_std(c) ** 2 * odd[:, None] * odd[None, :]  # sin^2(k pi / 2) = 1 for odd k, else 0
    return n * math.sqrt(2.0 * T * float(var.sum()))


def estimate_typical_displacement(
    size: int, c: int, T: float, n_samples: int = 10_000, seed: int | torch.Generator | None = 0,
) -> tuple[float, float]:
    """Monte-Carlo estimate of the rms displacement at the centre (pixels), with its standard error.

    Draws ``n_samples`` fields and evaluates them at ``u = v = 1/2`` (exactly, from the coefficients).

    Returns
    -------
    (rms, standard_error), both in pixels (the error by the delta method).
    """
    n = check_int("size", size, low=2)
    n_samples = check_int("n_samples", n_samples, low=2)
    coefficients = sample_coefficients(n_samples, c, T, seed)  # (S, 2, c, c)
    k = torch.arange(1, coefficients.shape[-1] + 1, dtype=torch.float64)
    s = torch.sin(math.pi * k / 2)  # (c,)
    tau = torch.einsum("baij,i,j->ba", coefficients, s, s) * n  # (S, 2) pixels
    sq = (tau**2).sum(1)  # (S,)
    mean = float(sq.mean())
    rms = math.sqrt(mean)
    se = float(sq.std()) / math.sqrt(n_samples) / (2 * rms) if rms > 0 else 0.0
    return rms, se
