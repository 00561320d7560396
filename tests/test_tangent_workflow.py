"""``layerwise finetune``: the toy path and the real-model path on a tiny random CLIP (built from a config,
with a tiny BPE tokenizer), end to end through ``layerwise merge`` and the linearized evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import tiny_clip_folder
from layerwise.cli import main
from layerwise.editing import load_state_dict
from layerwise.errors import ConfigError
from layerwise.tangent.linearize import LinearizedModel
from layerwise.tangent.workflow import load_finetune_job, parse_finetune_job

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(path, obj):
    path.write_text(yaml.safe_dump(obj))
    return path


def test_toy_job_then_merge_then_linearized_evaluation(tmp_path, capsys):
    cfg = _write(
        tmp_path / "job.yaml",
        {
            "model": {"kind": "toy_cnn", "pretrain_steps": 3},
            "tasks": [{"name": "rot90"}, {"name": "checker"}],
            "finetune": {
                "modes": ["nonlinear", "linearized"],
                "steps": 3,
                "batch_size": 8,
                "lr": 1e-2,
                "warmup_steps": 1,
            },
        },
    )
    out = tmp_path / "out"
    assert main(["finetune", str(cfg), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "finetune.json").read_text())
    assert set(summary["tasks"]) == {"rot90", "checker"}
    assert 0 <= summary["tasks"]["rot90"]["linearized"]["val_accuracy"] <= 1
    for mode in ("nonlinear", "linearized"):
        for task in ("rot90", "checker"):
            assert (out / mode / task / "model.safetensors").is_file()
    # merge the linearized fine-tunes and evaluate the merge in the tangent space:
    # f_lin(theta0 + 0.3 (tau1 + tau2)) = f0 + 0.3 J tau1 + 0.3 J tau2
    merged = tmp_path / "merged"
    assert main(["merge", str(out / "merge_linearized.yaml"), "--out", str(merged), "--no-progress"]) == 0
    from layerwise.tangent.toy_models import build_encoder

    enc = build_encoder("cnn")
    theta0 = load_state_dict(out / "pretrained")
    enc.load_state_dict(theta0)
    x = torch.rand(4, 1, 16, 16)
    lin_merged = LinearizedModel.from_checkpoints(build_encoder("cnn"), out / "pretrained", merged)
    parts = [
        LinearizedModel.from_checkpoints(build_encoder("cnn"), out / "pretrained", out / "linearized" / t)
        for t in ("rot90", "checker")
    ]
    with torch.no_grad():
        f0 = enc(x)
        expected = f0 + 0.3 * (parts[0](x) - f0) + 0.3 * (parts[1](x) - f0)
        torch.testing.assert_close(lin_merged(x), expected, rtol=1e-4, atol=1e-5)
    # an existing output folder is refused without --overwrite
    assert main(["finetune", str(cfg), "--out", str(out), "--no-progress", "--dry-run"]) == 2
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"model": {"kind": "toy_vit"}, "tasks": [{"name": "rot90"}], "extra": 1}, "config"),
        ({"model": {"kind": "resnet"}, "tasks": [{"name": "rot90"}]}, "model.kind"),
        ({"model": {"kind": "toy_vit"}, "tasks": [{"name": "imagenet"}]}, r"tasks\[0\].name"),
        ({"model": {"kind": "toy_vit"}, "tasks": []}, "tasks"),
        (
            {"model": {"kind": "toy_vit"}, "tasks": [{"name": "rot90"}], "finetune": {"modes": ["both"]}},
            "finetune.modes",
        ),
        ({"model": {"kind": "toy_vit"}, "tasks": [{"name": "rot90"}], "finetune": {"steps": 0}}, "finetune"),
        ({"model": {"kind": "toy_vit"}, "tasks": [{"name": "rot90"}], "finetune": {"lrate": 1}}, "finetune"),
        ({"model": {"kind": "hf_clip", "path": "x"}, "tasks": [{"name": "a"}]}, r"tasks\[0\].train"),
        ({"model": {"kind": "hf_clip"}, "tasks": [{"name": "a"}]}, "model.path"),
        (
            {"model": {"kind": "toy_vit", "pretrain_steps": -1}, "tasks": [{"name": "rot90"}]},
            "model.pretrain_steps",
        ),
        ({"model": {"kind": "toy_vit"}, "tasks": [{"name": "rot90"}, {"name": "rot90"}]}, "unique"),
        ({"model": {"kind": "toy_vit", "device": "cuda"}, "tasks": [{"name": "rot90"}]}, "model.device"),
        ({"model": {"kind": "toy_vit", "device": "gpu0"}, "tasks": [{"name": "rot90"}]}, "model.device"),
    ],
)
def test_config_errors_name_the_key(raw, key, tmp_path):
    if raw["model"].get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=key):
        parse_finetune_job(raw, tmp_path)


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    cfg = _write(tmp_path / "bad.yaml", {"model": {"kind": "toy_vit"}, "tasks": [{"name": "nope"}]})
    assert main(["finetune", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "tasks[0].name" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_dry_run_trains_and_writes_nothing(tmp_path, capsys):
    cfg = _write(
        tmp_path / "job.yaml",
        {"model": {"kind": "toy_vit"}, "tasks": [{"name": "rot90"}], "finetune": {"steps": 7}},
    )
    assert main(["finetune", str(cfg), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "'steps': 7" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


# -- the real-model path on a tiny random CLIP ------------------------------------------------------------
def _images(root, classes, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            PIL.fromarray(arr).save(root / c / f"{i}.png")


def test_tiny_clip_end_to_end(tmp_path):
    from layerwise.tangent.clip import ClipImageEncoder, ImageFolder, load_clip, zeroshot_head

    clip_dir = tiny_clip_folder(tmp_path / "clip")
    for task, classes in (("cars", ["red car", "blue car"]), ("pets", ["cat", "dog"])):
        _images(tmp_path / task / "train", classes)
        _images(tmp_path / task / "val", classes, seed=1)
    cfg = _write(
        tmp_path / "job.yaml",
        {
            "model": {"kind": "hf_clip", "path": "clip", "local_files_only": True},
            "tasks": [
                {"name": "cars", "train": "cars/train", "val": "cars/val"},
                {"name": "pets", "train": "pets/train", "val": "pets/val", "templates": ["a {} pet."]},
            ],
            "finetune": {
                "modes": ["nonlinear", "linearized"],
                "steps": 2,
                "batch_size": 4,
                "lr": 1e-3,
                "warmup_steps": 1,
            },
        },
    )
    job = load_finetune_job(cfg)
    assert job.tasks[0].train == tmp_path / "cars" / "train"
    out = tmp_path / "out"
    assert main(["finetune", str(cfg), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["tasks"]["pets"]["classes"] == ["cat", "dog"]
    clip, tok = load_clip(clip_dir, local_files_only=True)
    enc = ClipImageEncoder(clip)
    theta0 = load_state_dict(out / "pretrained")
    assert set(theta0) == set(enc.state_dict()) and any(".layers.1." in k for k in theta0)
    ft = load_state_dict(out / "nonlinear" / "cars")
    assert any(not torch.equal(ft[k], theta0[k]) for k in theta0 if k.startswith("vision_model.encoder"))
    # the zero-shot head is CLIP's own text embedding of the prompts
    head = zeroshot_head(clip, tok, ["cat", "dog"], ["a {} pet."])
    with torch.no_grad():
        ref = clip.get_text_features(**tok(["a cat pet.", "a dog pet."], padding=True, return_tensors="pt"))
        ref = getattr(ref, "pooler_output", ref)
    torch.testing.assert_close(head.prototypes, torch.nn.functional.normalize(ref, dim=-1))
    stored = load_state_dict(out / "heads" / "pets")
    torch.testing.assert_close(stored["prototypes"], head.prototypes)
    # the image encoder is CLIP's image tower, and linearizing it is exact at theta0
    ds = ImageFolder(tmp_path / "pets" / "val", 16, ["cat", "dog"])
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=x)
        img = getattr(img, "pooler_output", img)
        torch.testing.assert_close(enc(x), img)
        torch.testing.assert_close(LinearizedModel(enc)(x), enc(x), rtol=1e-5, atol=1e-6)
    # LiNeS finds the vision tower's blocks in the fine-tuned checkpoint, and merge accepts them
    merged = tmp_path / "merged"
    assert main(["merge", str(out / "merge_linearized.yaml"), "--out", str(merged), "--no-progress"]) == 0
    back = LinearizedModel.from_checkpoints(
        ClipImageEncoder(load_clip(clip_dir, local_files_only=True)[0]), out / "pretrained", merged
    )
    with torch.no_grad():
        assert back(x).shape == enc(x).shape


def test_image_folder_errors(tmp_path):
    from layerwise.errors import InputDataError
    from layerwise.tangent.clip import ImageFolder

    _images(tmp_path / "d", ["a", "b"], n=1)
    with pytest.raises(InputDataError, match="missing"):
        ImageFolder(tmp_path / "d", 8, ["a", "c"])
    with pytest.raises(InputDataError, match="not found"):
        ImageFolder(tmp_path / "nope", 8)
    (tmp_path / "d" / "a" / "0.png").write_bytes(b"not an image")
    with pytest.raises(InputDataError, match="unreadable"):
        ImageFolder(tmp_path / "d", 8)[0]
