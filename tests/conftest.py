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



# The `build()` factory of a file-defined model for `layerwise diffeo --model FILE.py:build` (3-channel 12x12
# images, 5 classes); tests append their own factories to this source.
DIFFEO_MODEL_CODE = '''
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 10 * 10, 5))
'''


def tiny_clip_folder(folder, layers: int = 2):
    """Save a tiny random Hugging Face CLIP (width 16, ``layers`` blocks per tower, 16x16 images, a
    character-level tokenizer) into the new folder ``folder`` and return it (transformers imported lazily)."""
    import json
    import string

    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,'-{}":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    small = {"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2,
             "num_hidden_layers": layers}
    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "max_position_embeddings": 32, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1, **small},
        vision_config={"image_size": 16, "patch_size": 8, **small}, projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
