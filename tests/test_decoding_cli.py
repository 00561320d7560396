"""``layerwise m3id generate`` on a tiny Llava saved to a folder, against the in-memory Python API."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from layerwise.cli import main  # noqa: E402
from layerwise.decoding import m3id_generate  # noqa: E402
from layerwise.decoding.loading import load_for_m3id  # noqa: E402
from layerwise.decoding.toy_vlm import (  # noqa: E402
    SceneSpec,
    build_processor,
    build_toy_llava,
    render_scene,
    sample_scenes,
)

SPEC = SceneSpec()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_generate_matches_python_api(tmp_path, capsys):
    model = build_toy_llava(SPEC, hidden=32, seed=5)
    proc = build_processor(SPEC)
    folder = tmp_path / "toy-llava"
    model.save_pretrained(folder)  # safetensors
    proc.save_pretrained(folder)
    assert any(p.suffix == ".safetensors" for p in folder.iterdir())
    images = [
        Image.fromarray(render_scene(SPEC, s, seed=i)) for i, s in enumerate(sample_scenes(SPEC, 2, seed=0))
    ]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    prompts = ["<image> describe :", "<image> is there a cup ?"]
    argv = [
        "m3id",
        "generate",
        "--model",
        str(folder),
        "--lambda",
        "1.0",
        "--alpha",
        "1.0",
        "--max-new-tokens",
        "5",
    ]
    for path, prompt in zip(paths, prompts, strict=True):
        argv += ["--image", str(path), "--prompt", prompt]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    loaded, loaded_proc = load_for_m3id(str(folder))
    want = m3id_generate(
        model, proc, images, prompts, lambda_=1.0, alpha=1.0, max_new_tokens=5, path="batched"
    )
    assert printed == want
    again = m3id_generate(loaded, loaded_proc, images, prompts, lambda_=1.0, alpha=1.0, max_new_tokens=5)
    assert again == want


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    code = main(
        [
            "m3id",
            "generate",
            "--model",
            str(tmp_path),
            "--image",
            "a.png",
            "--image",
            "b.png",
            "--prompt",
            "<image> x",
        ]
    )
    assert code == 2
    assert "--image must be given once per --prompt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype"):
        load_for_m3id(str(tmp_path), dtype="int8")
