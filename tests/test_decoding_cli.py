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


def _no_hub(monkeypatch):
    """Make every transformers/hub loading entry point fail: the code under test must not reach them."""
    import huggingface_hub
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError(f"transformers/hub was asked to load {args!r}")

    for name in ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModelForMaskedLM",
                 "AutoProcessor", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", boom)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)


@pytest.mark.parametrize("missing", ["path/to/mlm", "./ckpt", "../nowhere/x", "~/no-such-model-dir-xyz"])
def test_missing_local_folder_says_folder_not_found_without_the_hub(tmp_path, monkeypatch, capsys, missing):
    from layerwise.decoding._hf import model_source
    from layerwise.diffusion.text import MaskedLMDenoiser
    from layerwise.errors import InputDataError

    monkeypatch.chdir(tmp_path)
    _no_hub(monkeypatch)
    code = main(["m3id", "generate", "--model", missing, "--prompt", "x", "--unconditional-prompt", "y"])
    err = capsys.readouterr().err
    assert code == 2 and "folder not found" in err and len(err.strip().splitlines()) == 1
    assert "repo" not in err.lower() and "Traceback" not in err
    for load in (lambda: load_for_m3id(missing), lambda: load_for_m3id(missing, vision=False),
                 lambda: MaskedLMDenoiser.from_pretrained(missing),
                 lambda: MaskedLMDenoiser.from_pretrained(str(tmp_path), tokenizer=missing)):
        with pytest.raises(InputDataError, match="folder not found"):
            load()
    # a pathlib.Path is always local; an existing file is not a folder; a name that can only be a hub id
    # (absent locally) is passed on unchanged, and an existing folder is accepted
    with pytest.raises(InputDataError, match="folder not found"):
        model_source(tmp_path / "gpt2")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputDataError, match="not a folder"):
        model_source("weights.bin")
    assert model_source("gpt2") == "gpt2" and model_source("owner/name-1.5") == "owner/name-1.5"
    assert model_source(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("limit, kind", [(3000, "warning"), (1000, "error")])
def test_decompression_bomb_image_is_one_line(tmp_path, monkeypatch, capsys, limit, kind):
    """64 x 64 = 4096 pixels: over MAX_IMAGE_PIXELS (Pillow warns) or over twice it (Pillow raises)."""
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "small.png")
    _no_hub(monkeypatch)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    from layerwise.decoding._hf import read_rgb_image

    assert read_rgb_image(tmp_path / "small.png").size == (8, 8)  # under the limit: read as usual
    code = main(["m3id", "generate", "--model", str(tmp_path), "--image", str(tmp_path / "big.png"),
                 "--prompt", "<image> x"])
    err = capsys.readouterr().err
    assert code == 2 and "decompression bomb" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty.png").write_bytes(b"")
    code = main(["m3id", "generate", "--model", str(tmp_path), "--image", str(tmp_path / "empty.png"),
                 "--prompt", "<image> x"])
    assert code == 2 and "cannot read image" in capsys.readouterr().err
