"""The 8-task protocol runner (``layerwise eight-task``) and the FusionBench readers, end to end on a tiny
random CLIP, tiny "fine-tunes" saved as CLIPVisionModel folders named like FusionBench's, and generated image
folders. Every reported number is recomputed here by a reference written in the test (CLIP's towers called
directly, the edits applied by hand, the linearization by torch.func.jvp)."""

from __future__ import annotations

import json
import re
import string

import numpy as np
import pytest
import torch
import yaml

from layerwise.cli import main
from layerwise.errors import CheckpointError, ConfigError, InputDataError
from layerwise.tangent.eight_task import load_eight_task_config, parse_eight_task_config, run_eight_task
from layerwise.tangent.fusionbench import find_finetuned, read_clip_vision, split_folder_name

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
TASKS = {"colors": ["red", "green", "blue"], "shades": ["dark", "light"]}
TEMPLATES = ["a photo of a {}."]
GRID = [0.0, 0.5, 1.0]


def _tiny_clip(folder):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,'-{}":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    small = {"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2, "num_hidden_layers": 2}
    cfg = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "max_position_embeddings": 32,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
            **small,
        },
        vision_config={"image_size": 16, "patch_size": 8, **small},
        projection_dim=8,
    )
    torch.manual_seed(0)
    clip = transformers.CLIPModel(cfg)
    clip.save_pretrained(folder)
    tok.save_pretrained(folder)
    # eager attention: forward-mode differentiation (the reference linearization) needs it
    return transformers.CLIPModel.from_pretrained(folder, attn_implementation="eager").eval(), tok


def _images(root, classes, n, seed):
    g = torch.Generator().manual_seed(seed)
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(n):
            base = torch.zeros(3, 16, 16)
            base[i % 3] = 0.3 + 0.2 * i
            img = (base + 0.5 * torch.rand(3, 16, 16, generator=g)).clamp(0, 1)
            arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{j}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eight")
    clip, tok = _tiny_clip(root / "clip")
    vision0 = {
        k: v.clone() for k, v in clip.vision_model.state_dict().items()
    }  # names without "vision_model."
    ft_root = root / "fusionbench"
    ft_root.mkdir()
    finetuned = {}
    for s, task in enumerate(TASKS):
        vm = transformers.CLIPVisionModel(clip.config.vision_config)
        g = torch.Generator().manual_seed(10 + s)
        state = {
            k: v + 0.4 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in vision0.items()
        }
        getattr(vm, "vision_model", vm).load_state_dict(state)  # (transformers 5: no .vision_model)
        if s == 0:
            vm.save_pretrained(ft_root / f"tinyclip_{task}")
        else:  # the layout FusionBench published with older transformers: vision_model.* names
            from safetensors.torch import save_file

            folder = ft_root / f"tinyclip_{task}"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
            save_file(
                {f"vision_model.{k}": v.contiguous() for k, v in state.items()},
                str(folder / "model.safetensors"),
            )
        finetuned[task] = {f"vision_model.{k}": v for k, v in state.items() if v.is_floating_point()}
        for split, n, seed in (("test", 4, 100 + s), ("val", 3, 200 + s)):
            _images(root / "images" / task / split, TASKS[task], n, seed)
    (root / "elsewhere" / "othermodel_colors").mkdir(parents=True)
    return {"root": root, "clip": clip, "tok": tok, "finetuned": finetuned}


# -- the reference ---------------------------------------------------------------------------------------
def _load(folder):
    return torch.stack(
        [
            (
                torch.tensor(np.asarray(Image.open(p).convert("RGB")), dtype=torch.float32).permute(2, 0, 1)
                / 255
                - MEAN
            )
            / STD
            for p in folder
        ]
    )


def _split(world, task, split):
    base = world["root"] / "images" / task / split
    xs, ys = [], []
    for i, c in enumerate(TASKS[task]):
        files = sorted((base / c).iterdir())
        xs.append(_load(files))
        ys += [i] * len(files)
    return torch.cat(xs), torch.tensor(ys)


@torch.no_grad()
def _text(world, task):
    clip, tok = world["clip"], world["tok"]
    rows = []
    for c in TASKS[task]:
        b = tok([t.format(c) for t in TEMPLATES], padding=True, return_tensors="pt")
        e = clip.text_projection(clip.text_model(**b).pooler_output)
        rows.append(torch.nn.functional.normalize(e, dim=-1).mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def _features(world, params, x):
    """Image features of the CLIP image tower with vision weights ``params`` (CLIPModel names)."""
    clip = world["clip"]
    out = torch.func.functional_call(
        clip.vision_model, {k.removeprefix("vision_model."): v for k, v in params.items()}, (x,)
    )
    return clip.visual_projection(out.pooler_output)


def _acc(world, params, task, split, linear_at=None):
    x, y = _split(world, task, split)
    with torch.no_grad():
        if linear_at is None:
            z = _features(world, params, x)
        else:  # f(theta0) + J (params - theta0), by forward-mode differentiation
            theta0 = linear_at
            tangent = {k: params[k] - theta0[k] for k in theta0}
            z, dz = torch.func.jvp(lambda p: _features(world, p, x), (theta0,), (tangent,))
            z = z + dz
    logits = torch.nn.functional.normalize(z, dim=-1) @ _text(world, task).T
    return float((logits.argmax(-1) == y).double().mean())


def _theta0(world):
    return {
        f"vision_model.{k}": v.detach().clone()
        for k, v in world["clip"].vision_model.state_dict().items()
        if v.is_floating_point()
    }


def _edit(theta0, deltas, coef):
    return {k: v + sum(c * d[k] for c, d in zip(coef, deltas, strict=True)) for k, v in theta0.items()}


def _config(world, **extra):
    root = world["root"]
    cfg = {
        "pretrained": "clip",
        "finetuned_root": "fusionbench",
        "tasks": [
            {"name": t, "data": f"images/{t}/test", "val": f"images/{t}/val", "templates": TEMPLATES}
            for t in TASKS
        ],
        "grids": {"addition": GRID, "negation": GRID, "tangent": GRID, "lines_beta": [0.2, 1.0]},
        "batch_size": 5,
    }
    cfg.update(extra)
    path = root / f"cfg_{len(list(root.glob('cfg_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- readers ---------------------------------------------------------------------------------------------
def test_fusionbench_readers(world):
    root = world["root"]
    assert split_folder_name("clip-vit-base-patch32_stanford-cars") == (
        "clip-vit-base-patch32",
        "stanford-cars",
    )
    found = find_finetuned(root / "fusionbench")
    assert found == {t: root / "fusionbench" / f"tinyclip_{t}" for t in TASKS}
    assert find_finetuned(root / "fusionbench", "tinyclip") == found
    with pytest.raises(InputDataError, match="no 'other_<task>'"):
        find_finetuned(root / "fusionbench", "other")
    for task in TASKS:  # both key layouts (with and without the vision_model. prefix)
        tensors = read_clip_vision(found[task])
        for k, v in world["finetuned"][task].items():
            assert torch.equal(tensors[k], v), k
    # a whole CLIPModel folder gives its image tower under the same names
    whole = read_clip_vision(root / "clip")
    assert set(whole) >= set(_theta0(world))
    with pytest.raises(CheckpointError, match="config.json"):
        read_clip_vision(root / "images")


# -- the runner ------------------------------------------------------------------------------------------
def test_runner_matches_the_reference(world, tmp_path):
    cfg = load_eight_task_config(_config(world))
    res = run_eight_task(cfg, tmp_path / "out", log=lambda s: None)
    theta0 = _theta0(world)
    names = list(TASKS)
    taus = [{k: world["finetuned"][t][k] - theta0[k] for k in theta0} for t in names]
    assert res["selected_on"] == "val"
    for t in names:
        assert res["zeroshot"][t] == _acc(world, theta0, t, "test")
        assert res["finetuned"][t] == _acc(world, world["finetuned"][t], t, "test")
    ft_val = {t: _acc(world, world["finetuned"][t], t, "val") for t in names}

    # addition: each grid point's score is the mean normalized val accuracy; the best one is reported on test
    add = res["methods"]["addition"]
    scores = [
        sum(_acc(world, _edit(theta0, taus, [a, a]), t, "val") / ft_val[t] for t in names) / 2 for a in GRID
    ]
    assert add["search"]["scores"] == pytest.approx(scores)
    best = GRID[max(range(len(GRID)), key=lambda i: (scores[i], -i))]
    assert add["coefficient"] == best
    for t in names:
        acc = _acc(world, _edit(theta0, taus, [best, best]), t, "test")
        assert add["accuracy"][t] == acc
        assert add["normalized"][t] == pytest.approx(acc / res["finetuned"][t])

    # negation: the control is the other task; alpha minimizes the target with the control >= 95% zero-shot
    for i, t in enumerate(names):
        other = names[1 - i]
        zs_other = _acc(world, theta0, other, "val")
        evals = []
        for a in GRID:
            coef = [-a if j == i else 0.0 for j in range(2)]
            evals.append(
                (
                    _acc(world, _edit(theta0, taus, coef), t, "val"),
                    _acc(world, _edit(theta0, taus, coef), other, "val"),
                )
            )
        ok = [j for j, (_, c) in enumerate(evals) if c >= 0.95 * zs_other - 1e-12] or list(range(len(GRID)))
        j = max(ok, key=lambda j: (-evals[j][0], -j))
        neg = res["methods"]["negation"][t]
        assert neg["coefficient"] == GRID[j]
        coef = [-GRID[j] if k == i else 0.0 for k in range(2)]
        assert neg["target_accuracy"] == _acc(world, _edit(theta0, taus, coef), t, "test")
        assert neg["control_accuracy"] == _acc(world, _edit(theta0, taus, coef), other, "test")

    # tangent (post-hoc): accuracies of f0 + J (theta - theta0), normalized by the linearized individual ones
    tan = res["methods"]["tangent"]
    assert tan["mode"].startswith("post-hoc")
    a = tan["coefficient"]
    for i, t in enumerate(names):
        indiv = _acc(
            world,
            _edit(theta0, taus, [1.0 if j == i else 0.0 for j in range(2)]),
            t,
            "test",
            linear_at=theta0,
        )
        assert tan["individual"][t] == indiv
        acc = _acc(world, _edit(theta0, taus, [a, a]), t, "test", linear_at=theta0)
        assert tan["accuracy"][t] == acc

    # LiNeS: layer l of L = 2 scaled by 1/T + beta * l / (L - 1), every other tensor by 1/T
    lines = res["methods"]["lines"]
    assert lines["alpha"] == 0.5 and lines["beta"] in (0.2, 1.0)

    def lines_edit(beta):
        out = {}
        for k, v in theta0.items():
            m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)
            s = 0.5 + (beta * int(m.group(1)) if m else 0.0)
            out[k] = v + s * (taus[0][k] + taus[1][k])
        return out

    for t in names:
        assert lines["accuracy"][t] == _acc(world, lines_edit(lines["beta"]), t, "test")
    scores = [sum(_acc(world, lines_edit(b), t, "val") / ft_val[t] for t in names) / 2 for b in (0.2, 1.0)]
    assert lines["search"]["scores"] == pytest.approx(scores)

    # files
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["methods"]["addition"]["coefficient"] == best
    assert (out / "accuracy.png").stat().st_size > 1000
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].startswith("method,task,coefficient,accuracy,normalized")
    assert len(csv) == 1 + 2 * 2 + 4 * 2  # zero-shot, fine-tuned, then 4 methods x 2 tasks


def test_options_reach_the_run(world, tmp_path, capsys):
    # methods: only addition; no val folders: chosen on test; max_images caps the images per split
    path = _config(
        world,
        methods=["addition"],
        max_images=2,
        tasks=[{"name": t, "data": f"images/{t}/test"} for t in TASKS],
    )
    logs = []
    res = run_eight_task(load_eight_task_config(path), log=logs.append)
    assert set(res["methods"]) == {"addition"} and res["selected_on"] == "test"
    for t in TASKS:  # (12 and 8 images without the cap)
        assert f"task {t}: 2 test images, {len(TASKS[t])} classes" in logs
    assert any("chosen on the test images" in line for line in logs)
    # linearized fine-tunes given: tangent uses them (here: the same folders, so the individual accuracies of
    # the linearized model equal those of the post-hoc one above but the mode says so)
    path = _config(world, methods=["tangent"], linearized_root="fusionbench", grids={"tangent": [1.0]})
    res = run_eight_task(load_eight_task_config(path), log=lambda s: None)
    assert res["methods"]["tangent"]["mode"] == "linearized fine-tunes"
    assert res["methods"]["tangent"]["search"]["grid"] == [1.0]
    # a control task for negation
    path = _config(
        world,
        methods=["negation"],
        grids={"negation": [0.5]},
        control={"name": "ctrl", "data": "images/shades/val", "templates": TEMPLATES},
    )
    res = run_eight_task(load_eight_task_config(path), log=lambda s: None)
    neg = res["methods"]["negation"]["colors"]
    theta0 = _theta0(world)
    tau = {k: world["finetuned"]["colors"][k] - theta0[k] for k in theta0}
    edited = {k: theta0[k] - 0.5 * tau[k] for k in theta0}
    assert neg["control"] == "ctrl"
    assert neg["control_accuracy"] == _acc(world, edited, "shades", "val")
    # negation_keep reaches the search (a spy: on this tiny random world no threshold changes the choice)
    import layerwise.tangent.eight_task as et

    seen = []

    def spy(evaluate, control_pretrained, grid, *, keep):
        seen.append(keep)
        return real(evaluate, control_pretrained, grid, keep=keep)

    real = et.search_negation
    path = _config(world, methods=["negation"], negation_keep=0.7, grids={"negation": [0.5]})
    try:
        et.search_negation = spy
        run_eight_task(load_eight_task_config(path), log=lambda s: None)
    finally:
        et.search_negation = real
    assert seen == [0.7, 0.7]
    # the CLI: dry run, run, refusal to overwrite
    path = _config(world, methods=["addition"], grids={"addition": [0.0, 1.0]})
    out = tmp_path / "cli"
    assert main(["eight-task", str(path), "--out", str(out), "--dry-run"]) == 0
    assert not out.exists()
    assert main(["eight-task", str(path), "--out", str(out), "--dry-run", "--device", "meta"]) == 2
    assert "--device" in capsys.readouterr().err
    assert main(["eight-task", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "addition" in printed and "colors" in printed
    assert json.loads((out / "results.json").read_text())["methods"]["addition"]["search"]["grid"] == [
        0.0,
        1.0,
    ]
    assert main(["eight-task", str(path), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": ["merging"]}, "methods"),
        ({"grids": {"addition": []}}, "grids.addition"),
        ({"grids": {"alpha": [1]}}, "grids"),
        ({"finetuned_root": "elsewhere"}, "found models []"),
        ({"finetuned_root": None}, "no fine-tuned model"),
        ({"tasks": [{"name": "colors"}]}, "tasks[0].data"),
        ({"tasks": [{"name": "colors", "data": "x", "colour": 1}]}, "unknown key"),
        ({"tasks": [{"name": "colors", "data": "x", "templates": ["no slot"]}]}, "templates"),
        ({"negation_keep": 2}, "negation_keep"),
        ({"negation_keep": 0}, "negation_keep"),
        ({"device": "meta"}, "device"),
        ({"extra": 1}, "unknown key"),
    ],
)
def test_config_errors_name_the_key(world, change, message):
    raw = yaml.safe_load(_config(world).read_text())
    raw.update(change)
    with pytest.raises((ConfigError, ValueError, InputDataError)) as err:
        parse_eight_task_config(raw, world["root"])
    assert message in str(err.value) and "\n" not in str(err.value)
