"""Reading images and user models for ``layerwise diffeo`` (safe loaders; Pillow only where needed).

``load_model("pkg.module:factory", weights)`` imports the user's module and calls the factory: that runs the
user's own code, like ``python -c "import pkg.module"``. Weights are read with safetensors or
``torch.load(weights_only=True)``, never by unpickling arbitrary objects.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from .._validation import check_int
from ..errors import CheckpointError, InputDataError, MissingExtraError, ParameterError

__all__ = ["read_image", "read_images", "load_model"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingExtraError("reading image files needs Pillow: pip install 'layerwise[data]'") from err
    return Image


def read_image(path: str | Path, size: int | None = None, grayscale: bool = False) -> torch.Tensor:
    """One image file as a float32 tensor (C, H, W) in [0, 1] (C = 3, or 1 if ``grayscale``)."""
    Image = _pil()
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"image {path} does not exist or is not a file")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if grayscale else "RGB")
            if size is not None:
                if size < 2:
                    raise ParameterError(f"size must be >= 2, got {size}")
                img = img.resize((size, size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            h, w = img.height, img.width
    except OSError as err:
        raise InputDataError(f"cannot read image {path}: {err}") from None
    c = 1 if grayscale else 3
    return data.reshape(h, w, c).permute(2, 0, 1).float() / 255.0  # (C, H, W)


def read_images(source: str | Path, size: int | None = None, grayscale: bool = False,
                max_images: int | None = None) -> torch.Tensor:
    """Images (N, C, H, W) float32 from a ``.npy`` file ((N, C, H, W) or (N, H, W)) or a folder of images."""
    if size is not None:
        check_int("--size", size, low=2)
    if max_images is not None:
        check_int("--max-images", max_images, low=1)  # a negative slice would silently drop images
    source = Path(source)
    if source.is_dir():
        files = sorted(f for f in source.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if max_images is not None:
            files = files[:max_images]
        if len(files) < 2:
            raise InputDataError(f"--images folder {source} holds {len(files)} image file(s); need >= 2")
        images = [read_image(f, size=size, grayscale=grayscale) for f in files]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise InputDataError(f"--images: files in {source} have different sizes {sorted(shapes)[:4]}; "
                                 "pass --size to resize them")
        return torch.stack(images)
    if source.suffix.lower() == ".npy" and source.is_file():
        import numpy as np

        try:
            array = np.load(source, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise InputDataError(f"cannot read {source} as a .npy array: {err}") from None
        if array.ndim == 3:
            array = array[:, None]
        if array.ndim != 4 or not np.issubdtype(array.dtype, np.number):
            raise InputDataError(f"--images {source} must hold a numeric array (N, C, H, W) or (N, H, W), "
                                 f"got shape {array.shape} and dtype {array.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(array)).float()
        if max_images is not None:
            images = images[:max_images]
        if size is not None:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                     align_corners=False)
        return images
    raise InputDataError(f"--images must be a folder of images or a .npy file, got {source}")


def _import_module(spec: str):
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise ParameterError(f"--model: module file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # the user's own code, by the user's request
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as err:
        raise ParameterError(f"--model: cannot import module {spec!r}: {err}") from None


def load_model(spec: str, weights: str | Path | None = None) -> torch.nn.Module:
    """Build ``FACTORY()`` from ``MODULE:FACTORY`` and load a state dict into it.

    Parameters
    ----------
    spec : ``"dotted.module:factory"`` or ``"path/to/file.py:factory"``; the factory takes no arguments.
    weights : optional ``.safetensors`` file, or a torch file (a state dict, possibly under a
        ``"state_dict"`` or ``"model"`` key) read with ``torch.load(weights_only=True)``.
    """
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1]:
        raise ParameterError(f"--model must be MODULE:FACTORY (e.g. mypkg.nets:build), got {spec!r}")
    module_name, factory_name = spec.rsplit(":", 1)
    module = _import_module(module_name)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ParameterError(f"--model: {module_name!r} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ParameterError(f"--model: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            model.load_state_dict(_read_state_dict(Path(weights)))
        except RuntimeError as err:  # missing/unexpected keys, shape mismatches
            raise CheckpointError(f"--weights {weights} does not fit the model of {spec}: {err}") from None
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"--weights {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad checkpoint for the user
        raise CheckpointError(f"cannot read --weights {path}: {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--weights {path} does not hold a state dict of tensors")
    return state
