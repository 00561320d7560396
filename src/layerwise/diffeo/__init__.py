"""Maximum-entropy diffeomorphisms and relative stability R_f (Petrini, Favero, Geiger, Wyart, NeurIPS 2021).

- :mod:`~layerwise.diffeo.fields`: displacement fields (batched), temperature range, typical displacement.
- :mod:`~layerwise.diffeo.transform`: :func:`deform` (one ``grid_sample``), :func:`matched_noise`,
  :class:`RandomDiffeo` (data augmentation).
- :mod:`~layerwise.diffeo.stability`: :func:`relative_stability` (D_f, G_f, R_f per layer).
- :mod:`~layerwise.diffeo.support`: :func:`principal_subspace` (noise inside the data's support: the control).
- :mod:`~layerwise.diffeo.procedural`: :func:`procedural_shapes` (an offline 32 x 32 image world whose classes
  are invariant to smooth deformations).
- :mod:`~layerwise.diffeo.grid`: the paper's figure 1 (diffeos of increasing T next to noise of equal norm).

>>> import torch
>>> from layerwise.diffeo import RandomDiffeo, relative_stability, sample_fields, deform
>>> x = torch.rand(16, 3, 32, 32)
>>> y = deform(x, sample_fields(16, 32, 32, c=5, T=1e-3, seed=0))
"""

from .fields import (
    centre_displacement_rms,
    estimate_typical_displacement,
    fields_from_coefficients,
    mode_mask,
    mode_std,
    sample_coefficients,
    sample_fields,
    sine_basis,
    temperature_for_displacement,
    temperature_range,
    typical_displacement,
)
from .grid import log_temperatures, plot_sample_grid, sample_grid
from .procedural import PROCEDURAL_CLASSES, procedural_shapes
from .stability import ESTIMATORS, NOISE_NORMS, Stability, relative_stability
from .support import principal_subspace
from .transform import RandomDiffeo, deform, matched_noise

__all__ = [
    "sample_fields",
    "sample_coefficients",
    "fields_from_coefficients",
    "mode_mask",
    "mode_std",
    "sine_basis",
    "temperature_range",
    "typical_displacement",
    "temperature_for_displacement",
    "centre_displacement_rms",
    "estimate_typical_displacement",
    "deform",
    "matched_noise",
    "RandomDiffeo",
    "relative_stability",
    "Stability",
    "ESTIMATORS",
    "NOISE_NORMS",
    "principal_subspace",
    "procedural_shapes",
    "PROCEDURAL_CLASSES",
    "sample_grid",
    "plot_sample_grid",
    "log_temperatures",
]
