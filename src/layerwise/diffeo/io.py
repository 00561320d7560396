"""Reading images and user models for ``layerwise diffeo`` (safe loaders; Pillow only where needed).

``load_model("pkg.module:factory", weights)`` imports the user's module and calls the factory: that runs the
user's own code, like ``python -c "import pkg.module"``. MODULE is a dotted name (looked up on ``sys.path``,
then in the current folder) or a path to a ``.py`` file. Weights are read with safetensors or
``torch.load(weights_only=True)``, never by unpickling arbitrary objects.

Every reader estimates what it is about to allocate from the file headers and refuses (``ResourceError``)
what the machine cannot hold; images over Pillow's decompression-bomb limit are refused, not decoded.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

from .._resources import check_memory
from .._validation import check_int
from ..errors import CheckpointError, InputDataError, MissingExtraError, ParameterError

__all__ = ["read_image", "read_images", "read_image_folder", "load_model", "check_model_accepts"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingExtraError("reading image files needs Pillow: pip install 'layerwise[data]'") from err
    return Image


def _open(Image, path: Path):
    """``Image.open`` with Pillow's decompression-bomb warning and error turned into an InputDataError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise InputDataError(f"image {path} is too large to decode safely (a decompression bomb?): "
                                 f"{err}") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels."""
    Image = _pil()
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"image {path} does not exist or is not a file")
    try:
        with _open(Image, path) as img:
            return img.size
    except OSError as err:
        raise InputDataError(f"cannot read image {path}: {err}") from None


def _image_bytes(width: int, height: int, size: int | None, channels: int) -> int:
    """Peak bytes of reading one image: the decoded file (RGBA at worst), the resized copy, the float copy."""
    out = (size * size if size is not None else width * height) * channels
    return 4 * width * height + 2 * out + 4 * out


def read_image(path: str | Path, size: int | None = None, grayscale: bool = False) -> torch.Tensor:
    """One image file as a float32 tensor (C, H, W) in [0, 1] (C = 3, or 1 if ``grayscale``).

    The size is read from the header first: an image over Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``), or one whose decoding would not fit in memory, is refused.
    """
    Image = _pil()
    path = Path(path)
    if size is not None:
        size = check_int("size", size, low=2)
    if not path.is_file():
        raise InputDataError(f"image {path} does not exist or is not a file")
    c = 1 if grayscale else 3
    try:
        with _open(Image, path) as img:
            check_memory(_image_bytes(img.width, img.height, size, c),
                         f"reading image {path} ({img.width} x {img.height} pixels"
                         + (f", resized to {size} x {size})" if size is not None else ")"))
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = img.convert("L" if grayscale else "RGB")
            if size is not None:
                img = img.resize((size, size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            h, w = img.height, img.width
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputDataError(f"image {path} is too large to decode safely: {err}") from None
    except OSError as err:
        raise InputDataError(f"cannot read image {path}: {err}") from None
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
        c = 1 if grayscale else 3
        sizes = [image_size(f) for f in files]  # headers only
        total = sum(4 * c * (size * size if size is not None else w * h) for w, h in sizes)
        check_memory(2 * total, f"reading {len(files)} images from {source}")
        images = [read_image(f, size=size, grayscale=grayscale) for f in files]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise InputDataError(f"--images: files in {source} have different sizes {sorted(shapes)[:4]}; "
                                 "pass --size to resize them")
        return torch.stack(images)
    if source.suffix.lower() == ".npy" and source.is_file():
        import numpy as np

        try:
            array = np.load(source, mmap_mode="r", allow_pickle=False)  # the header only, for now
        except (ValueError, OSError, EOFError) as err:
            raise InputDataError(f"cannot read {source} as a .npy array: "
                                 f"{err or type(err).__name__}") from None
        if array.ndim == 3:
            array = array[:, None]
        real = np.issubdtype(array.dtype, np.number) and not np.issubdtype(array.dtype, np.complexfloating)
        if array.ndim != 4 or not real:
            raise InputDataError(f"--images {source} must hold a real numeric array (N, C, H, W) or "
                                 f"(N, H, W), got shape {array.shape} and dtype {array.dtype}")
        if max_images is not None:
            array = array[:max_images]
        n, c, h, w = array.shape
        out_pixels = n * c * (size * size if size is not None else h * w)
        check_memory(int(array.nbytes) + 8 * n * c * h * w + 4 * out_pixels,
                     f"reading {source} (shape {tuple(array.shape)}, {array.dtype})")
        images = torch.from_numpy(np.array(array, dtype=np.float32))
        if size is not None:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                     align_corners=False)
        return images
    raise InputDataError(f"--images must be a folder of images or a .npy file, got {source}")


def read_image_folder(root: str | Path, size: int, grayscale: bool = False, max_per_class: int | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A labelled image set laid out as one subfolder per class (``root/<class>/*.png``, e.g. CIFAR-10
    exported as PNGs).

    Parameters
    ----------
    root : folder holding >= 2 class subfolders (sorted by name: class k is the k-th).
    size : every image is resized to ``size x size``.
    grayscale : read one channel instead of three.
    max_per_class : read at most this many images of each class (the first, sorted by file name).

    Returns
    -------
    images (N, C, size, size) float32 in [0, 1], labels (N,) int64, class names.
    """
    root = Path(root)
    size = check_int("size", size, low=2)
    if max_per_class is not None:
        max_per_class = check_int("max_per_class", max_per_class, low=1)
    if not root.is_dir():
        raise InputDataError(f"image folder {root} does not exist or is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        files += [(f, label) for f in found[:max_per_class]]
    if len(classes) < 2 or len(files) < 2:
        raise InputDataError(f"image folder {root} must hold >= 2 class subfolders of images "
                             f"(root/<class>/*.png); found {len(classes)} class(es), {len(files)} image(s)")
    c = 1 if grayscale else 3
    check_memory(2 * 4 * c * size * size * len(files), f"reading {len(files)} images from {root}")
    images = torch.stack([read_image(f, size=size, grayscale=grayscale) for f, _ in files])
    return images, torch.tensor([label for _, label in files], dtype=torch.long), classes


def _import_module(spec: str):
    """The module of ``--model``: a ``.py`` file, a dotted name on ``sys.path`` or in the current folder."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise ParameterError(f"--model: module file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ParameterError(f"--model: cannot load {path} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)  # the user's own code, by the user's request
        except Exception as err:  # noqa: BLE001 - any failure of the user's module is theirs to fix
            raise ParameterError(f"--model: importing your module {path} raised {type(err).__name__}: "
                                 f"{err}") from None
        return module
    try:
        return _import_dotted(spec)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if not (spec == missing or spec.startswith(missing + ".")):
            raise ParameterError(f"--model: importing your module {spec!r} raised ModuleNotFoundError: "
                                 f"{err}") from None
        here = str(Path.cwd())
        if here in sys.path:
            raise ParameterError(f"--model: cannot import module {spec!r}: {err}") from None
        sys.path.insert(0, here)  # as `python -m` would: look in the current folder too
        try:
            return _import_dotted(spec)
        except ModuleNotFoundError as err2:
            raise ParameterError(f"--model: cannot import module {spec!r} (looked on sys.path and in the "
                                 f"current folder {here}): {err2}; a file can be given as "
                                 "path/to/file.py:FACTORY") from None
        finally:
            sys.path.remove(here)


def _import_dotted(spec: str):
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - a failure inside the user's module
        raise ParameterError(f"--model: importing your module {spec!r} raised {type(err).__name__}: "
                             f"{err}") from None


def load_model(spec: str, weights: str | Path | None = None) -> torch.nn.Module:
    """Build ``FACTORY()`` from ``MODULE:FACTORY`` and load a state dict into it.

    Parameters
    ----------
    spec : ``"dotted.module:factory"`` (looked up on ``sys.path``, then in the current folder) or
        ``"path/to/file.py:factory"``; the factory takes no arguments. An exception raised while importing
        the module or inside the factory is reported as a ``ParameterError`` naming them.
    weights : optional ``.safetensors`` file, or a torch file (a state dict, possibly under a
        ``"state_dict"`` or ``"model"`` key) read with ``torch.load(weights_only=True)``.
    """
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1] \
            or not spec.rsplit(":", 1)[0]:
        raise ParameterError(f"--model must be MODULE:FACTORY (e.g. mypkg.nets:build or nets.py:build), "
                             f"got {spec!r}")
    module_name, factory_name = spec.rsplit(":", 1)
    module = _import_module(module_name)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ParameterError(f"--model: {module_name!r} has no callable {factory_name!r}")
    try:
        model = factory()
    except Exception as err:  # noqa: BLE001 - an error inside the user's factory is theirs, not a bug here
        raise ParameterError(f"--model: your factory {spec}() raised {type(err).__name__}: {err}") from None
    if not isinstance(model, torch.nn.Module):
        raise ParameterError(f"--model: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            model.load_state_dict(_read_state_dict(Path(weights)))
        except RuntimeError as err:  # missing/unexpected keys, shape mismatches
            raise CheckpointError(f"--weights {weights} does not fit the model of {spec}: {err}") from None
    return model


def check_model_accepts(model: torch.nn.Module, images: torch.Tensor, spec: str = "the model") -> None:
    """Run ``model`` on the first image; an exception becomes a ParameterError naming the model and the
    input shape (e.g. a 1-channel image set given to a 3-channel model)."""
    try:
        with torch.no_grad():
            model(images[:1])
    except Exception as err:  # noqa: BLE001 - the user's model rejecting the input is a user error
        shape = tuple(images[:1].shape)
        raise ParameterError(f"--model {spec} fails on the images (input shape {shape}, i.e. {shape[1]} "
                             f"channel(s) of {shape[2]} x {shape[3]}): {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}; check --grayscale/--size or "
                             "the model's input layer") from None


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
