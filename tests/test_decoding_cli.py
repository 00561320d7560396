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


def _toy_folder(tmp_path):
    model = build_toy_llava(SPEC, hidden=32, seed=5)
    model.generation_config.eos_token_id = None
    proc = build_processor(SPEC)
    folder = tmp_path / "toy-llava"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    scenes = sample_scenes(SPEC, 2, seed=0)
    images = [Image.fromarray(render_scene(SPEC, s, seed=i)) for i, s in enumerate(scenes)]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    return folder, images, paths


# Every M3ID flag of `m3id generate`, with a value other than its default, and the keyword it must reach.
ALL_FLAGS = {
    "--lambda": ("lambda_", 1.0),
    "--alpha": ("alpha", 0.9),
    "--t0": ("t0", 2.0),
    "--max-weight": ("max_weight", 3.0),
    "--plausibility": ("plausibility", 0.97),
    "--unconditional": ("unconditional", "mask"),
    "--path": ("path", "processor"),
}


def test_cli_passes_every_m3id_flag(tmp_path, monkeypatch, capsys):
    """Each flag reaches m3id_generate with its value (a CLI that dropped one would call with the default)."""
    import layerwise.decoding as decoding

    folder, _, paths = _toy_folder(tmp_path)
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return ["x"] * len(args[3])

    monkeypatch.setattr(decoding, "m3id_generate", spy)
    argv = ["m3id", "generate", "--model", str(folder), "--max-new-tokens", "4"]
    for flag, (_, value) in ALL_FLAGS.items():
        argv += [flag, str(value)]
    argv += ["--image", str(paths[0]), "--prompt", "<image> describe :"]
    assert main(argv) == 0
    for flag, (key, value) in ALL_FLAGS.items():
        assert seen[key] == value, flag
    assert seen["max_new_tokens"] == 4


def test_cli_all_flags_end_to_end_change_the_output(tmp_path, capsys):
    """With every flag set, the CLI prints what the API gives with the same settings (which differs from the
    output at the defaults); the spy test above checks that each flag reaches the API."""
    folder, images, paths = _toy_folder(tmp_path)
    prompts = ["<image> describe :", "<image> is there a cup ?"]
    argv = ["m3id", "generate", "--model", str(folder), "--max-new-tokens", "8"]
    for flag, (_, value) in ALL_FLAGS.items():
        argv += [flag, str(value)]
    for path, prompt in zip(paths, prompts, strict=True):
        argv += ["--image", str(path), "--prompt", prompt]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    model, proc = load_for_m3id(str(folder))
    model.generation_config.eos_token_id = None
    kw = {key: value for key, value in ALL_FLAGS.values()}
    assert printed == m3id_generate(model, proc, images, prompts, max_new_tokens=8, **kw)
    assert printed != m3id_generate(model, proc, images, prompts, max_new_tokens=8)
