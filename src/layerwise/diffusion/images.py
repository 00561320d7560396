"""Forward-backward experiments with an image diffusion model (``diffusers`` UNet2DModel + DDPM/DDIM).

Sclocchi, Favero, Levi, Wyart, "Probing the latent hierarchical structure of data via diffusion models",
ICLR 2025 (images: an unconditional diffusion model; tokens = a vision encoder's patch embeddings on a
k x k grid; change ``Delta_i = ||e_i(x0) - e_i(x̂0)|| / sqrt(D)``; C(r) binned by grid distance).

Protocol at diffusion step ``t``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (DDPM forward,
Ho et al. 2020, eq. 4, ``scheduler.add_noise``), then the reverse chain of the scheduler from ``t`` down
to 0 (``scheduler.step`` with the UNet's noise prediction). ``t`` is snapped down to the nearest step of
the inference schedule (``n_inference_steps`` evenly spaced steps), so that the chain starts on it.

``diffusers`` is an optional dependency (extra ``diffusion``); it is imported only to load checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._device import resolve_device
from .._validation import check_int, make_generator
from ..errors import MissingExtraError, ParameterError, ParameterTypeError
from ..hierarchy.forward_backward import level_seeds
from ..hierarchy.observables import ChangeStatistics, embedding_changes

__all__ = [
    "ImageLevelResult",
    "denoise_from",
    "image_forward_backward",
    "hf_patch_encoder",
    "load_unet_and_scheduler",
]

Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ImageLevelResult:
    """Forward-backward at one diffusion step.

    Attributes
    ----------
    timestep : the step the chain started from (after snapping to the inference schedule).
    statistics : :class:`ChangeStatistics` of the patch changes on the (k, k) grid.
    x_hat : (N, T, C, H, W) reconstructions, or None when not kept.
    """

    timestep: int
    statistics: ChangeStatistics
    x_hat: torch.Tensor | None = None

    def summary(self, r_max: float | None = None) -> dict[str, Any]:
        """Key numbers as plain Python values (mean change, chi, xi, C(r))."""
        return {"timestep": self.timestep, **self.statistics.summary(r_max=r_max)}


def _scheduler_copy(scheduler: Any, n_inference_steps: int) -> Any:
    # ``set_timesteps`` mutates the scheduler; work on a copy so the caller's object is untouched.
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(n_inference_steps)
    return sched


def _start_steps(scheduler: Any, timestep: int) -> torch.Tensor:
    steps = scheduler.timesteps  # descending
    steps = steps[steps <= timestep]
    if steps.numel() == 0:
        raise ParameterError(
            f"timestep must be >= the smallest inference step {int(scheduler.timesteps.min())}, "
            f"got {timestep}"
        )
    return steps


@torch.no_grad()
def denoise_from(
    unet: Any,
    scheduler: Any,
    x0: torch.Tensor,
    timestep: int,
    n_inference_steps: int = 50,
    generator: torch.Generator | int | None = 0,
) -> tuple[torch.Tensor, int]:
    """Noise ``x0`` to diffusion step ``timestep`` and run the reverse chain back to a clean image.

    Parameters
    ----------
    unet : a noise-prediction model called as ``unet(x, t).sample`` (``diffusers.UNet2DModel``).
    scheduler : a ``diffusers`` scheduler with ``set_timesteps``, ``add_noise`` and ``step``
        (``DDPMScheduler``, ``DDIMScheduler``, ...); it is copied, not modified.
    x0 : (N, C, H, W) images in the model's range (usually [-1, 1]).
    timestep : forward step in ``[0, num_train_timesteps)``; snapped down to the inference schedule.
    n_inference_steps : steps of the inference schedule.
    generator : CPU generator or seed for the forward noise and the scheduler's draws.

    Returns
    -------
    (x̂0 of shape (N, C, H, W) on the CPU, the step actually used).
    """
    n_train = int(scheduler.config.num_train_timesteps)
    timestep = check_int("timestep", timestep, low=0, high=n_train - 1)
    n_inference_steps = check_int("n_inference_steps", n_inference_steps, low=1, high=n_train)
    gen = make_generator(generator)
    sched = _scheduler_copy(scheduler, n_inference_steps)
    steps = _start_steps(sched, timestep)
    param = next(iter(unet.parameters()), None) if hasattr(unet, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
    x = sched.add_noise(x0.float(), noise, steps[:1].long()).to(device, dtype)
    for t in steps:
        eps = unet(x, t.to(device)).sample
        # The scheduler's own noise (DDPM, DDIM with eta > 0) is drawn on the CPU from ``gen``.
        x = sched.step(eps, t, x, generator=gen).prev_sample
    return x.float().cpu(), int(steps[0])


@torch.no_grad()
def image_forward_backward(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    timesteps: Sequence[int],
    n_trajectories: int,
    encoder: Encoder,
    *,
    n_inference_steps: int = 50,
    batch_size: int = 16,
    seed: int | None = 0,
    keep_images: bool = False,
    progress: bool = False,
) -> list[ImageLevelResult]:
    """Forward-backward from ``images`` at every step of ``timesteps``; changes in patch-embedding space.

    Parameters
    ----------
    unet, scheduler : the diffusion model (see :func:`denoise_from`).
    images : (N, C, H, W) starting images ``x0`` in the model's range.
    timesteps : forward steps to start the reverse chain from.
    n_trajectories : reverse chains per image and step (>= 2, for correlations).
    encoder : a callable ``images (B, C, H, W) -> (B, k, k, D)`` patch embeddings (e.g.
        :func:`hf_patch_encoder`); it receives images in the model's range.
    n_inference_steps : steps of the inference schedule.
    batch_size : images per UNet call (trajectories of one image are batched together).
    seed : seed of all the randomness (each step gets its own generator, derived from seed and step).
    keep_images : also return the reconstructions (N, T, C, H, W).
    progress : show a tqdm bar.

    Returns
    -------
    list of :class:`ImageLevelResult`, one per timestep.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        got = getattr(images, "shape", type(images).__name__)
        raise ParameterError(f"images must be a non-empty (N, C, H, W) tensor, got {got}")
    n_traj = check_int("n_trajectories", n_trajectories, low=2)
    batch_size = check_int("batch_size", batch_size, low=1)
    timesteps = [check_int("timesteps entry", t, low=0) for t in timesteps]
    if not timesteps:
        raise ParameterError("timesteps must hold at least one step, got none")
    if not callable(encoder):
        raise ParameterTypeError(
            f"encoder must be callable (images -> (B, k, k, D)), got {type(encoder).__name__}"
        )
    from tqdm.auto import tqdm

    seeds = level_seeds(seed, timesteps)  # a function of (seed, step): independent of the other steps
    e0 = _encode(encoder, images, batch_size)  # (N, k, k, D)
    per_x0 = max(1, batch_size // n_traj)
    results = []
    for t, sd in tqdm(list(zip(timesteps, seeds, strict=True)), desc="forward-backward", unit="step",
                      disable=not progress):
        gen = make_generator(sd)
        stats = ChangeStatistics(tuple(e0.shape[1:3]))
        kept, used = [], t
        for start in range(0, images.shape[0], per_x0):
            x0 = images[start : start + per_x0]
            b = x0.shape[0]
            rep = x0.repeat_interleave(n_traj, dim=0)  # (b * T, C, H, W)
            x_hat, used = denoise_from(unet, scheduler, rep, t, n_inference_steps, gen)
            e_hat = _encode(encoder, x_hat, batch_size).reshape(b, n_traj, *e0.shape[1:])  # (b, T, k, k, D)
            stats.update(embedding_changes(e0[start : start + b], e_hat))  # (b, T, k, k)
            if keep_images:
                kept.append(x_hat.reshape(b, n_traj, *x_hat.shape[1:]))
        results.append(ImageLevelResult(used, stats, torch.cat(kept) if keep_images else None))
    return results


def _encode(encoder: Encoder, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            e = encoder(images[start : start + batch_size])
            if not isinstance(e, torch.Tensor) or e.dim() != 4 or e.shape[1] != e.shape[2]:
                raise ParameterError(f"encoder must return (B, k, k, D) patch embeddings, "
                                     f"got {getattr(e, 'shape', type(e).__name__)}")
            out.append(e.float().cpu())
    return torch.cat(out)


def hf_patch_encoder(
    model: Any,
    image_size: int | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    input_range: tuple[float, float] = (-1.0, 1.0),
) -> Encoder:
    """Wrap a Hugging Face ViT-style vision model (ViT, DINOv2, CLIP vision, ...) as a patch encoder.

    Images in ``input_range`` are mapped to [0, 1], resized to ``image_size`` (default: the model config's),
    normalized with ``mean``/``std``, encoded (with interpolated position embeddings when ``image_size``
    differs from the config's); the prefix tokens (CLS, registers) are dropped from ``last_hidden_state``
    and the ``k * k`` patch tokens reshaped to (B, k, k, D), ``k = image_size // patch_size``.
    """
    config = model.config
    size = int(image_size or config.image_size)
    patch = int(config.patch_size)
    k = size // patch
    lo, hi = input_range
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def encode(images: torch.Tensor) -> torch.Tensor:
        param = next(iter(model.parameters()))
        x = (images.float() - lo) / (hi - lo)  # [0, 1]
        if x.shape[-2:] != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = ((x - mean_t) / std_t).to(param.device, param.dtype)
        # Another resolution than the encoder was trained at: interpolate its position embeddings.
        extra = {"interpolate_pos_encoding": True} if size != int(config.image_size) else {}
        hidden = model(pixel_values=x, **extra).last_hidden_state  # (B, n_prefix + k*k, D)
        patches = hidden[:, hidden.shape[1] - k * k :]  # (B, k*k, D): drop CLS / register tokens
        return patches.reshape(patches.shape[0], k, k, patches.shape[-1])  # (B, k, k, D)

    return encode


def load_unet_and_scheduler(
    path: str, scheduler: str = "ddim", device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """Load a ``UNet2DModel`` and a DDPM or DDIM scheduler from a diffusers pipeline folder (or hub id).

    The folder holds ``unet/`` and ``scheduler/`` subfolders (as ``DDPMPipeline.save_pretrained`` writes);
    the scheduler's config is reused with the chosen class. Needs the ``diffusion`` extra. ``device`` is
    checked by :func:`layerwise._device.resolve_device` before anything is loaded.
    """
    device = resolve_device(device)
    try:
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingExtraError("loading a diffusion model needs diffusers: "
                                "pip install 'layerwise[diffusion]'") from err
    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if scheduler not in classes:
        raise ParameterError(f"scheduler must be one of {sorted(classes)}, got {scheduler!r}")
    unet = UNet2DModel.from_pretrained(path, subfolder="unet").to(device).eval()
    sched = classes[scheduler].from_pretrained(path, subfolder="scheduler")
    return unet, sched
