"""Local, convolutional and deep hierarchical kernels; kernel regression; teacher-student learning curves.

Everything is torch, float64 by default, on the device of the inputs; Gram matrices are computed in blocks
of rows (memory O(rows x N)), exploiting symmetry when ``Y is None``.

>>> import torch
>>> from layerwise.kernels import hierarchical_kernel, conv_kernel, KernelRegressor, make_kernel
>>> X = torch.rand(8, 16, dtype=torch.float64)
>>> hierarchical_kernel(X, None, filters=(4, 4), kind="ntk").shape
torch.Size([8, 8])
>>> student = make_kernel({"type": "conv", "s": 4, "base": "ntk_relu"})
>>> model = KernelRegressor(student).fit(X, X[:, 0])
"""

from .base import (
    BASE_KERNELS,
    BaseKernel,
    arccos_k0,
    arccos_k1,
    full_kernel,
    get_base_kernel,
    laplace,
    nngp_relu,
    ntk_relu,
    register_base_kernel,
)
from .curves import ExponentFit, LearningCurve, fit_exponent, kernel_spectrum, learning_curve
from .data import hypercube, patch_spheres, sphere
from .hierarchical import hierarchical_kernel
from .local import conv_kernel, local_kernel, patch_index
from .regression import KernelRegressor, gaussian_random_field
from .spec import KernelSpec, make_kernel
from .spectral_theory import (
    eigenlearning_kappa,
    predicted_learning_curve,
    spectral_decomposition,
    tail_as_ridge,
)

__all__ = [
    "BASE_KERNELS",
    "BaseKernel",
    "register_base_kernel",
    "get_base_kernel",
    "arccos_k0",
    "arccos_k1",
    "laplace",
    "ntk_relu",
    "nngp_relu",
    "full_kernel",
    "local_kernel",
    "conv_kernel",
    "patch_index",
    "hierarchical_kernel",
    "KernelRegressor",
    "gaussian_random_field",
    "learning_curve",
    "LearningCurve",
    "fit_exponent",
    "ExponentFit",
    "kernel_spectrum",
    "hypercube",
    "sphere",
    "patch_spheres",
    "make_kernel",
    "KernelSpec",
    "eigenlearning_kappa",
    "predicted_learning_curve",
    "spectral_decomposition",
    "tail_as_ridge",
]
