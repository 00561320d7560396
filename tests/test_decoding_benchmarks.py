"""POPE / CHAIR runners and their CLI (`layerwise m3id pope|chair`) end to end on a tiny Llava folder."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from layerwise.cli import main  # noqa: E402
from layerwise.decoding import chair, extract_objects, m3id_generate, parse_yes_no, pope_metrics  # noqa: E402
from layerwise.decoding.benchmarks import DECODERS, run_chair, run_pope  # noqa: E402
from layerwise.decoding.toy_vlm import (  # noqa: E402
    SceneSpec,
    build_processor,
    build_toy_llava,
    render_scene,
    sample_scenes,
)
from layerwise.decoding.vcd import vcd_generate  # noqa: E402

SPEC = SceneSpec()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = build_toy_llava(SPEC, hidden=32, seed=11)
    with __import__("torch").no_grad():
        model.lm_head.weight.mul_(6.0)  # decisive answers: methods visibly differ
    proc = build_processor(SPEC)
    model.save_pretrained(root / "model")
    proc.save_pretrained(root / "model")
    scenes = sample_scenes(SPEC, 4, seed=3)
    (root / "images").mkdir()
    images, annotations = {}, {}
    for i, s in enumerate(scenes):
        image_id = f"im{i}"
        img = Image.fromarray(render_scene(SPEC, s, seed=i))
        img.save(root / "images" / f"{image_id}.png")
        images[image_id] = img
        annotations[image_id] = list(s.objects)
    questions = [{"image_id": f"im{i}", "object": obj, "label": lab}
                 for i in (2, 0, 3) for obj, lab in (("cup", True), ("bus", "no"))]
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "annotations.json").write_text(json.dumps(annotations))
    (root / "ids.txt").write_text("im3\nim1\n")
    return root, model, proc, images, questions, annotations


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_pope_cli_rows_match_the_decoder_called_directly(world, capsys):
    root, model, proc, images, questions, _ = world
    out = root / "pope_m3id.csv"
    args = ["m3id", "pope", "--model", str(root / "model"), "--images", str(root / "images"), "--questions",
            str(root / "questions.json"), "--method", "m3id", "--set", "lambda_=1", "--set", "alpha=1.0",
            "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    rows = _csv(out)
    prompts = [f"<image> is there a {q['object']} ?" for q in questions]
    imgs = [images[q["image_id"]] for q in questions]
    want = m3id_generate(model, proc, imgs, prompts, lambda_=1.0, alpha=1.0, max_new_tokens=4, path="batched")
    assert [r["answer"] for r in rows] == want
    assert [r["image_id"] for r in rows] == [q["image_id"] for q in questions]  # the given order
    labels = [q["label"] is True or q["label"] == "yes" for q in questions]
    assert [r["label"] == "True" for r in rows] == labels
    for r, lab in zip(rows, labels, strict=True):
        parsed = parse_yes_no(r["answer"])
        assert r["correct"] == str(parsed is not None and parsed == lab)
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert summary["accuracy"] == pytest.approx(pope_metrics(want, labels)["accuracy"])
    assert summary["options"] == {"lambda_": 1, "alpha": 1.0} and summary["seed"] == 3
    greedy = root / "pope_greedy.csv"
    assert main([*args[:8], "--out", str(greedy)]) == 0
    assert [r["answer"] for r in _csv(greedy)] != want  # --method and --set reach the decoder
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never replaces a file silently
    assert main([*args, "--overwrite"]) == 0 and _csv(out) == rows  # same seed, same rows


def test_chair_cli_with_vcd_fixed_ids_and_seed(world, capsys):
    root, model, proc, images, _, annotations = world
    base = ["m3id", "chair", "--model", str(root / "model"), "--images", str(root / "images"),
            "--annotations", str(root / "annotations.json"), "--ids", str(root / "ids.txt"),
            "--method", "vcd", "--set", "alpha=3", "--max-new-tokens", "6"]
    assert main([*base, "--seed", "0", "--out", str(root / "c0.csv")]) == 0
    rows = _csv(root / "c0.csv")
    assert [r["image_id"] for r in rows] == ["im3", "im1"]
    want = vcd_generate(model, proc, [images["im3"], images["im1"]], ["<image> describe :"] * 2, alpha=3.0,
                        noise_seed=0, max_new_tokens=6)
    assert [r["caption"] for r in rows] == want
    synonyms = {o: [] for objs in annotations.values() for o in objs}
    for r in rows:
        found = extract_objects(r["caption"], synonyms)
        assert r["mentioned"].split() == sorted(found)
        assert r["hallucinated"].split() == sorted(found - set(annotations[r["image_id"]]))
    summary = json.loads((root / "c0.json").read_text())["summary"]
    ref = chair(want, [annotations["im3"], annotations["im1"]], synonyms)
    assert summary["chair_i"] == pytest.approx(ref["chair_i"])
    assert summary["cover"] == pytest.approx(ref["cover"])
    # the seed draws VCD's noised images: another seed is another run
    other = vcd_generate(model, proc, [images["im3"], images["im1"]], ["<image> describe :"] * 2, alpha=3.0,
                         noise_seed=1, max_new_tokens=6)
    assert main([*base, "--seed", "1", "--out", str(root / "c1.csv")]) == 0
    assert [r["caption"] for r in _csv(root / "c1.csv")] == other


def test_python_runners_and_bad_input(world, capsys):
    root, model, proc, images, questions, annotations = world
    assert set(DECODERS) >= {"greedy", "m3id", "vcd"}
    rows, summary = run_pope(model, proc, images, questions, batch_size=2)
    rows_one, _ = run_pope(model, proc, images, questions, batch_size=16)
    assert [r["answer"] for r in rows] == [r["answer"] for r in rows_one]  # batching does not change greedy
    synonyms = {o: [o + "s"] for o in SPEC.objects}
    crow, _ = run_chair(model, proc, images, annotations, ["im0"], synonyms, max_new_tokens=3)
    assert len(crow) == 1
    with pytest.raises(ValueError, match="decoding method"):
        run_pope(model, proc, images, questions, method="beam")
    with pytest.raises(ValueError, match="label"):
        run_pope(model, proc, images, [{"image_id": "im0", "object": "cup", "label": "maybe"}])
    with pytest.raises(ValueError, match="no image"):
        run_pope(model, proc, images, [{"image_id": "zz", "object": "cup", "label": True}])
    with pytest.raises(ValueError, match="annotations"):
        run_chair(model, proc, images, annotations, ["zz"], {})
    common = ["--model", str(root / "model"), "--images", str(root / "images")]
    for extra, message in (
        (["--questions", str(root / "nope.json"), "--out", str(root / "x.csv")], "does not exist"),
        (["--questions", str(root / "questions.json"), "--method", "beam", "--out", str(root / "x.csv")],
         "decoding method"),
        (["--questions", str(root / "questions.json"), "--set", "oops", "--out", str(root / "x.csv")],
         "KEY=VALUE"),
    ):
        assert main(["m3id", "pope", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    (root / "bad.json").write_text("{not json")
    assert main(["m3id", "pope", *common, "--questions", str(root / "bad.json"), "--out",
                 str(root / "y.csv")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (root / "x.csv").exists() and not (root / "y.csv").exists()


@pytest.mark.parametrize("action", ["pope", "chair", "generate"])
def test_bad_device_is_one_line_before_any_work(world, tmp_path, capsys, action):
    """``--device meta`` goes through the central resolver: one line naming --device, exit 2, no file, and it
    is refused before the model folder is even looked at (a missing folder would otherwise be the error)."""
    root = world[0]
    out = tmp_path / "o.csv"
    if action == "generate":
        argv = ["m3id", "generate", "--model", str(tmp_path / "missing"), "--prompt", "x",
                "--unconditional-prompt", "y"]
    else:
        data = (["--questions", str(root / "questions.json")] if action == "pope"
                else ["--annotations", str(root / "annotations.json")])
        argv = ["m3id", action, "--model", str(tmp_path / "missing"), "--images", str(root / "images"), *data,
                "--out", str(out)]
    assert main([*argv, "--device", "meta"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device" in err and "meta" in err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert main(argv) == 2  # the same command on cpu fails later, at the missing model folder
    assert "not found" in capsys.readouterr().err


def test_load_for_m3id_validates_device_before_loading(world):
    from layerwise.decoding.loading import load_for_m3id
    from layerwise.errors import ParameterError

    with pytest.raises(ParameterError, match="device.*meta"):
        load_for_m3id(str(world[0] / "model"), device="meta")
    model, _ = load_for_m3id(str(world[0] / "model"), device="cpu")
    assert model.device.type == "cpu"
