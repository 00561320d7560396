"""End-to-end forward-backward runs on a user's checkpoints: load, run, write results and figures.

Used by ``layerwise diffusion text|images``. Each run writes into ``out``: ``results.json`` (per level: the
mean change, chi, chi over ``r <= r_max``, the correlation length and C(r)), ``results.csv`` (one row per
level) and ``chi.png`` / ``C_of_r.png``. The folder appears atomically when the run succeeds; every
argument, the input files, the optional extras and the output folder are checked before a model is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._device import resolve_device
from .._extras import require_extras
from .._io import atomic_directory, check_output_dir, save_figure, write_csv, write_json
from .._validation import check_choice, check_float, check_int, check_seed
from ..errors import CheckpointError, InputDataError, MissingExtraError, ParameterError, ParameterTypeError

__all__ = ["run_text", "run_images", "write_results"]


def write_results(out: str | os.PathLike, kind: str, levels: Sequence[dict[str, Any]],
                  meta: dict[str, Any], level_name: str) -> dict[str, Any]:
    """Write results.json, results.csv and the chi / C(r) figures of per-level summaries into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    x = [lv[level_name] for lv in levels]
    results = {"kind": kind, **meta, "levels": list(levels)}
    write_json(out / "results.json", results)
    scalar = [{k: v for k, v in lv.items() if not isinstance(v, (list, tuple))} for lv in levels]
    write_csv(out / "results.csv", scalar)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(x, [lv["chi"] for lv in levels], "o-", label="chi (all pairs)")
    if "chi_r_max" in levels[0]:
        ax[0].plot(x, [lv["chi_r_max"] for lv in levels], "s--", label=f"chi (r <= {meta.get('r_max')})")
    ax[0].set_xlabel(level_name)
    ax[0].set_ylabel("susceptibility chi")
    ax[0].legend()
    ax[1].plot(x, [lv["change_probability"] for lv in levels], "o-")
    ax[1].set_xlabel(level_name)
    ax[1].set_ylabel("mean change")
    fig.suptitle(f"{kind}: forward-backward")
    save_figure(fig, out / "chi.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for lv in levels:
        r, c = lv["r"][1:], lv["C_r"][1:]
        ax.plot(r, c, ".-", label=f"{level_name}={lv[level_name]}")
    ax.set_xscale("log")
    ax.set_xlabel("distance r")
    ax.set_ylabel("C(r)")
    ax.legend(fontsize=7)
    save_figure(fig, out / "C_of_r.png")
    return results


def run_text(
    model: str,
    text_file: str | os.PathLike,
    out: str | os.PathLike,
    levels: Sequence[float],
    *,
    n_passages: int = 32,
    length: int = 128,
    n_trajectories: int = 16,
    n_steps: int = 16,
    strategy: str = "ancestral",
    batch_size: int = 16,
    r_max: float = 10.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
    mask_id: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Forward-backward with a masked LM checkpoint on passages of a text file; write results into ``out``.

    ``overwrite`` allows replacing a folder ``out`` written by an earlier layerwise run (anything else that
    is not empty is refused, see :func:`layerwise._io.check_output_dir`).
    """
    from .text import MaskedLMDenoiser, passages_from_text, text_forward_backward

    # Everything that can be checked without the model, before loading it.
    levels = _check_levels(levels)
    n_passages = check_int("n_passages", n_passages, low=1)
    length = check_int("length", length, low=2)
    n_trajectories = check_int("n_trajectories", n_trajectories, low=2)
    n_steps = check_int("n_steps", n_steps, low=1)
    check_choice("strategy", strategy, ("ancestral", "confidence"))
    batch_size = check_int("batch_size", batch_size, low=1)
    r_max = check_float("r_max", r_max, low=0.0, low_open=True)
    seed = check_seed(seed)
    device = resolve_device(device)
    if mask_id is not None:
        mask_id = check_int("mask_id", mask_id, low=0)
    text = _read_text(text_file)
    require_extras(("hf",), "diffusion text (masked language models)")
    inputs = [model, text_file, *([tokenizer] if tokenizer else [])]
    out = check_output_dir(out, overwrite=overwrite, inputs=inputs)

    den = MaskedLMDenoiser.from_pretrained(model, tokenizer=tokenizer, mask_id=mask_id,
                                           trust_remote_code=trust_remote_code, device=device,
                                           n_steps=n_steps, strategy=strategy, batch_size=batch_size)
    ids = passages_from_text(den.tokenizer, text, length=length, n_passages=n_passages)
    res = text_forward_backward(den, ids, levels, n_trajectories, seed=seed, progress=progress)
    summaries = _summaries(res.levels, ("level", "change_probability", "chi", "chi_r_max", "xi", "r", "C_r"),
                           r_max=r_max)
    meta = {"model": str(model), "text_file": str(text_file), "n_passages": int(ids.shape[0]),
            "length": length, "n_trajectories": n_trajectories, "n_steps": n_steps, "strategy": strategy,
            "r_max": r_max, "seed": seed}
    with atomic_directory(out) as tmp:
        results = write_results(tmp, "text", summaries, meta, "level")
    return results


def _summaries(levels: Sequence[Any], keys: Sequence[str], **kwargs: Any) -> list[dict[str, Any]]:
    """The ``keys`` of each level's ``summary(**kwargs)``: the rows :func:`write_results` stores."""
    return [{k: s[k] for k in keys} for s in (lv.summary(**kwargs) for lv in levels)]


def _check_levels(levels: Sequence[float]) -> list[float]:
    """Mask fractions: a non-empty sequence of numbers in [0, 1]."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise ParameterTypeError(f"levels must be a sequence of numbers in [0, 1], got {levels!r}")
    if len(levels) == 0:
        raise ParameterError("levels must hold at least one mask fraction in [0, 1], got none")
    return [check_float(f"levels[{i}]", lv, low=0.0, high=1.0) for i, lv in enumerate(levels)]


def _read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path`` (the --text file), or InputDataError/OSError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such text file", str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputDataError(
            f"text file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    if not text.strip():
        raise InputDataError(f"text file {str(path)!r} is empty")
    return text


def _load_images(folder: str | os.PathLike, size: int, n: int | None) -> torch.Tensor:
    """Images of a folder (PNG/JPEG), RGB, resized to ``size`` and scaled to [-1, 1]: (N, 3, size, size)."""
    import numpy as np
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if n is not None:
        paths = paths[:n]
    if not paths:
        raise FileNotFoundError(2, "no .png/.jpg images in folder", str(folder))
    arrays = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (H, W, 3), 0..255
        arrays.append(t.permute(2, 0, 1) / 127.5 - 1.0)  # (3, H, W) in [-1, 1]
    return torch.stack(arrays)


@torch.no_grad()
def _generate(unet: Any, scheduler: Any, n: int, n_steps: int, seed: int) -> torch.Tensor:
    """Unconditional samples of the model (pure noise run through the reverse chain): (n, C, H, W)."""
    from .images import denoise_from

    cfg = unet.config
    shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    # Starting the chain at the last training step from x0 = 0 is sampling from pure noise (abar_T ~ 0).
    x, _ = denoise_from(unet, scheduler, torch.zeros(shape), int(scheduler.config.num_train_timesteps) - 1,
                        n_steps, seed)
    return x.clamp(-1, 1)


def run_images(
    pipeline: str,
    encoder: str,
    out: str | os.PathLike,
    timesteps: Sequence[int],
    *,
    images: str | os.PathLike | None = None,
    n_images: int = 16,
    n_trajectories: int = 8,
    n_inference_steps: int = 50,
    scheduler: str = "ddim",
    batch_size: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    encoder_size: int | None = None,
    progress: bool = True,
    normalization: str = "processor",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Forward-backward with a diffusers UNet pipeline folder; patch changes in a HF vision encoder's space.

    Starting images come from ``images`` (a folder) or, if None, are generated by the model itself.
    ``encoder_size`` is the encoder's input resolution (default: its config's ``image_size``); the patch
    grid is ``encoder_size // patch_size`` on a side. ``normalization`` gives the mean/std applied before
    the encoder: ``"processor"`` (default) reads them from the encoder's image processor
    (``preprocessor_config.json``) and refuses when it cannot be loaded; ``"imagenet"`` uses the ImageNet
    statistics. ``overwrite`` allows replacing a folder ``out`` written by an earlier layerwise run.
    """
    from .images import hf_patch_encoder, image_forward_backward, load_unet_and_scheduler

    timesteps = _check_timesteps(timesteps)
    n_images = check_int("n_images", n_images, low=1)
    n_trajectories = check_int("n_trajectories", n_trajectories, low=2)
    n_inference_steps = check_int("n_inference_steps", n_inference_steps, low=1)
    check_choice("scheduler", scheduler, ("ddim", "ddpm"))
    batch_size = check_int("batch_size", batch_size, low=1)
    seed = check_seed(seed)
    device = resolve_device(device)
    if encoder_size is not None:
        encoder_size = check_int("encoder_size", encoder_size, low=1)
    check_choice("normalization", normalization, ("processor", "imagenet"))
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(2, "no such folder of images", str(images))
    require_extras(("diffusion",), "diffusion images")
    inputs = [pipeline, encoder, *([images] if images is not None else [])]
    out = check_output_dir(out, overwrite=overwrite, inputs=inputs)

    try:
        from transformers import AutoModel
    except ImportError as err:  # pragma: no cover
        raise MissingExtraError(
            "the image encoder needs transformers: pip install 'layerwise[diffusion]'"
        ) from err
    unet, sched = load_unet_and_scheduler(pipeline, scheduler=scheduler, device=device)
    vision = AutoModel.from_pretrained(encoder, trust_remote_code=trust_remote_code).to(device).eval()
    vision = getattr(vision, "vision_model", vision)  # CLIP-style models: use the vision tower
    if normalization == "imagenet":
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    else:
        mean, std = _processor_statistics(encoder, trust_remote_code)
    enc = hf_patch_encoder(vision, image_size=encoder_size, mean=mean, std=std)
    size = int(unet.config.sample_size)
    x0 = _load_images(images, size, n_images) if images is not None else _generate(
        unet, sched, n_images, n_inference_steps, seed)
    res = image_forward_backward(unet, sched, x0, timesteps, n_trajectories, enc,
                                 n_inference_steps=n_inference_steps, batch_size=batch_size,
                                 seed=(seed + 1) % (1 << 63), progress=progress)
    summaries = _summaries(res, ("timestep", "change_probability", "chi", "xi", "r", "C_r"))
    meta = {"pipeline": str(pipeline), "encoder": str(encoder), "n_images": int(x0.shape[0]),
            "n_trajectories": n_trajectories, "n_inference_steps": n_inference_steps, "scheduler": scheduler,
            "grid": list(res[0].statistics.grid), "seed": seed,
            "images": None if images is None else str(images), "normalization": normalization,
            "mean": list(mean), "std": list(std)}
    with atomic_directory(out) as tmp:
        results = write_results(tmp, "images", summaries, meta, "timestep")
    return results


def _check_timesteps(timesteps: Sequence[int]) -> list[int]:
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence):
        raise ParameterTypeError(f"timesteps must be a sequence of integers >= 0, got {timesteps!r}")
    if len(timesteps) == 0:
        raise ParameterError("timesteps must hold at least one step, got none")
    return [check_int(f"timesteps[{i}]", t, low=0) for i, t in enumerate(timesteps)]


def _processor_statistics(encoder: str, trust_remote_code: bool) -> tuple[tuple[float, ...], ...]:
    """The image mean and std of ``encoder``'s image processor; CheckpointError when there is none."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(encoder, trust_remote_code=trust_remote_code)
        mean, std = tuple(float(x) for x in proc.image_mean), tuple(float(x) for x in proc.image_std)
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as err:
        detail = " ".join(str(err).split())[:160]
        raise CheckpointError(
            f"cannot read the image mean/std of encoder {str(encoder)!r} from its image processor "
            f"({type(err).__name__}: {detail}); save its preprocessor_config.json with it, or pass "
            "normalization='imagenet' (--normalization imagenet) to use the ImageNet statistics"
        ) from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(
            f"the image processor of encoder {str(encoder)!r} gives mean={mean}, std={std}; expected three "
            "channels with std > 0"
        )
    return mean, std
