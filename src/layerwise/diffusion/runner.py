"""End-to-end forward-backward runs on a user's checkpoints: load, run, write results and figures.

Used by ``layerwise diffusion text|images``. Each run writes into ``out``: ``results.json`` (per level: the
mean change, chi, chi over ``r <= r_max``, the correlation length and C(r)), ``results.csv`` (one row per
level) and ``chi.png`` / ``C_of_r.png``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import save_figure, write_csv, write_json

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
    device: str = "cpu",
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
    mask_id: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Forward-backward with a masked LM checkpoint on passages of a text file; write results into ``out``."""
    from .text import MaskedLMDenoiser, passages_from_text, text_forward_backward

    den = MaskedLMDenoiser.from_pretrained(model, tokenizer=tokenizer, mask_id=mask_id,
                                           trust_remote_code=trust_remote_code, device=device,
                                           n_steps=n_steps, strategy=strategy, batch_size=batch_size)
    text = Path(text_file).read_text(encoding="utf-8")
    ids = passages_from_text(den.tokenizer, text, length=length, n_passages=n_passages)
    res = text_forward_backward(den, ids, levels, n_trajectories, seed=seed, progress=progress)
    summaries = []
    for lv in res.levels:
        s = lv.summary(r_max=r_max)
        keys = ("level", "change_probability", "chi", "chi_r_max", "xi", "r", "C_r")
        summaries.append({k: s[k] for k in keys})
    meta = {"model": str(model), "text_file": str(text_file), "n_passages": int(ids.shape[0]),
            "length": length, "n_trajectories": n_trajectories, "n_steps": n_steps, "strategy": strategy,
            "r_max": r_max, "seed": seed}
    return write_results(out, "text", summaries, meta, "level")


def _load_images(folder: str | os.PathLike, size: int, n: int | None) -> torch.Tensor:
    """Images of a folder (PNG/JPEG), RGB, resized to ``size`` and scaled to [-1, 1]: (N, 3, size, size)."""
    import numpy as np
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if n is not None:
        paths = paths[:n]
    if not paths:
        raise FileNotFoundError(f"no .png/.jpg images in {str(folder)!r}")
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
    device: str = "cpu",
    trust_remote_code: bool = False,
    encoder_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Forward-backward with a diffusers UNet pipeline folder; patch changes in a HF vision encoder's space.

    Starting images come from ``images`` (a folder) or, if None, are generated by the model itself.
    ``encoder_size`` is the encoder's input resolution (default: its config's ``image_size``); the patch
    grid is ``encoder_size // patch_size`` on a side.
    """
    from .images import hf_patch_encoder, image_forward_backward, load_unet_and_scheduler

    try:
        from transformers import AutoModel
    except ImportError as err:  # pragma: no cover
        raise ImportError("the image encoder needs transformers: pip install 'layerwise[diffusion]'") from err
    unet, sched = load_unet_and_scheduler(pipeline, scheduler=scheduler, device=device)
    vision = AutoModel.from_pretrained(encoder, trust_remote_code=trust_remote_code).to(device).eval()
    vision = getattr(vision, "vision_model", vision)  # CLIP-style models: use the vision tower
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(encoder)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no processor saved: ImageNet statistics
    enc = hf_patch_encoder(vision, image_size=encoder_size, mean=mean, std=std)
    size = int(unet.config.sample_size)
    x0 = _load_images(images, size, n_images) if images is not None else _generate(
        unet, sched, n_images, n_inference_steps, seed)
    res = image_forward_backward(unet, sched, x0, timesteps, n_trajectories, enc,
                                 n_inference_steps=n_inference_steps, batch_size=batch_size, seed=seed + 1,
                                 progress=progress)
    summaries = []
    for lv in res:
        s = lv.summary()
        summaries.append({"timestep": s["timestep"], "change_probability": s["change_probability"],
                          "chi": s["chi"], "xi": s["xi"], "r": s["r"], "C_r": s["C_r"]})
    meta = {"pipeline": str(pipeline), "encoder": str(encoder), "n_images": int(x0.shape[0]),
            "n_trajectories": n_trajectories, "n_inference_steps": n_inference_steps, "scheduler": scheduler,
            "grid": list(res[0].statistics.grid), "seed": seed,
            "images": None if images is None else str(images)}
    return write_results(out, "images", summaries, meta, "timestep")
