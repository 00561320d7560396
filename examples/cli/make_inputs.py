"""Write the small input files of the README's command-line taste into this folder (offline, seeded).

    python examples/cli/make_inputs.py          # rewrites base/, ft_a/, ft_b/, X.npy, photo.png here

- ``base/``, ``ft_a/``, ``ft_b/``: three tiny "models" (safetensors folders, 2 residual blocks + a head,
  float32) for ``layerwise merge examples/cli/merge.yaml``;
- ``X.npy``: 64 inputs on a ring of d = 8 sites, shape (P, d) = (64, 8), float64, for ``layerwise kernels
  gram``;
- ``photo.png``: a 48 x 48 RGB picture (a disk and stripes) for ``layerwise diffeo sample``.

The YAML files beside it (``merge.yaml``, ``curve.yaml``, ``finetune_toy.yaml``) are written by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from layerwise.editing import save_checkpoint

HERE = Path(__file__).resolve().parent


def tiny_model(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict shaped like a 2-block residual network: ``blocks.{i}.w`` (4, 4) and ``head.w`` (2, 4)."""
    return {
        "blocks.0.w": torch.randn(4, 4, generator=generator),
        "blocks.1.w": torch.randn(4, 4, generator=generator),
        "head.w": torch.randn(2, 4, generator=generator),
    }


def main(folder: Path = HERE) -> None:
    gen = torch.Generator().manual_seed(0)
    base = tiny_model(gen)
    save_checkpoint(base, folder / "base")
    for name in ("ft_a", "ft_b"):
        step = tiny_model(gen)
        save_checkpoint({k: v + 0.1 * step[k] for k, v in base.items()}, folder / name)
    rng = np.random.default_rng(0)
    np.save(folder / "X.npy", rng.random((64, 8)))
    from PIL import Image

    yy, xx = np.mgrid[0:48, 0:48]
    red = ((yy - 20) ** 2 + (xx - 26) ** 2 < 12**2) * 220
    green = (np.sin(xx / 3.0) > 0) * 160
    blue = np.full((48, 48), 90)
    Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8)).save(folder / "photo.png")


if __name__ == "__main__":
    main()
