"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``cuda`` where no CUDA device is usable (they run when a GPU is there)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread (tiny models: as fast, and far faster when other jobs
    share the CPU cores); restores the previous setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_llava_world(seed: int = 0, n_images: int = 3):
    """A tiny random toy Llava (hidden 32, 2 layers) with fixed-length generation, its processor and
    ``n_images`` rendered scenes: the shared setup of the M3ID tests (transformers imported lazily)."""
    from PIL import Image

    from layerwise.decoding.toy_vlm import (
        SceneSpec,
        build_processor,
        build_toy_llava,
        render_scene,
        sample_scenes,
    )

    spec = SceneSpec()
    proc = build_processor(spec)
    model = build_toy_llava(spec, hidden=32, layers=2, vision_hidden=32, seed=seed)
    model.generation_config.eos_token_id = None  # fixed-length generation: every step is checked
    scenes = sample_scenes(spec, n_images, seed=0)
    images = [Image.fromarray(render_scene(spec, s, seed=i)) for i, s in enumerate(scenes)]
    return model, proc, images

