"""``device=`` / ``--device`` for merges and LoRA extraction: validated on every machine; the CUDA tests
(marked, skipped without a GPU) compare a GPU merge with the CPU's and check where the method ran."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from layerwise.cli import main
from layerwise.editing import execute_plan, merge_models, plan_merge
from layerwise.editing.extract_lora import extract_lora
from layerwise.errors import ParameterError


def _models(seed=0, t=3):
    g = torch.Generator().manual_seed(seed)
    base = {f"layers.{i}.w": torch.randn(64, 48, generator=g) for i in range(3)}
    base["embed.weight"] = torch.randn(100, 48, generator=g)
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(t)]
    return base, fts


CASES = [
    ("task_arithmetic", {}, {}),
    ("ties", {"density": 0.3}, {}),
    ("ties", {"density": 0.3, "topk": "global"}, {}),
    ("dare", {"drop_rate": 0.5}, {}),
    ("model_stock", {}, {}),
    ("task_arithmetic", {}, {"lines": "auto"}),
]


def _run(method, params, extra, device, **kw):
    from layerwise.editing import LinesSpec

    base, fts = _models()
    lines = LinesSpec(beta=0.5) if extra.get("lines") else None
    plan = plan_merge(method, fts, base, params=params, lines=lines, device=device, **kw)
    seen = []
    fn = plan.method.fn

    def recording(deltas, **kwargs):
        seen.append({deltas.device.type} | {v.device.type for v in kwargs.values() if torch.is_tensor(v)})
        return fn(deltas, **kwargs)

    plan.method = dataclasses.replace(plan.method, fn=recording)
    return execute_plan(plan).tensors, seen


def test_device_is_validated_and_recorded():
    base, fts = _models()
    assert plan_merge("task_arithmetic", fts, base, device="cpu").device == torch.device("cpu")
    assert plan_merge("task_arithmetic", fts, base).device == torch.device("cpu")
    auto = plan_merge("task_arithmetic", fts, base, device="auto").device
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ParameterError, match="device"):
        plan_merge("task_arithmetic", fts, base, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="device"):
            merge_models("task_arithmetic", fts, base, device="cuda")
        with pytest.raises(ParameterError, match="device"):
            extract_lora(
                {"layers.0.w.weight": torch.zeros(2, 2)},
                {"layers.0.w.weight": torch.ones(2, 2)},
                rank=1,
                device="cuda",
            )


@pytest.mark.parametrize("method,params,extra", CASES[:2])
def test_cpu_device_runs_the_method_on_cpu_and_matches_the_default(method, params, extra):
    ref, _ = _run(method, params, extra, None)
    got, seen = _run(method, params, extra, "cpu")
    assert seen and all(s == {"cpu"} for s in seen)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0)


def test_cli_device_option(tmp_path):
    from layerwise.editing import save_checkpoint

    base, fts = _models(t=2)
    save_checkpoint(base, tmp_path / "base")
    for i, ft in enumerate(fts):
        save_checkpoint(ft, tmp_path / f"ft{i}")
    cfg = {"method": "task_arithmetic", "base_model": "base", "models": ["ft0", "ft1"]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    args = ["merge", str(tmp_path / "m.yml"), "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "bad"), "--device", "nonsense"]) == 2
    assert not (tmp_path / "bad").exists()
    assert main([*args, str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert (tmp_path / "cpu" / "model.safetensors").is_file()


def test_auto_is_resolved_then_checked_by_the_central_resolver():
    from layerwise.editing.merge.plan import merge_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert merge_device(" AUTO ").type == merge_device("auto").type == expected
    assert merge_device(None) == merge_device("CPU") == torch.device("cpu")
    with pytest.raises(ParameterError) as info:  # the same refusal as every other device option, plus auto
        merge_device("meta", name="--device")
    msg = str(info.value)
    assert msg.startswith("--device must be one of cpu, cuda") and "cannot hold real data" in msg
    assert "'auto'" in msg and "\n" not in msg


@pytest.mark.parametrize("command", ["merge", "extract-lora"])
def test_cli_refuses_meta_in_one_line_naming_the_flag(command, tmp_path, capsys):
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({"method": "task_arithmetic", "base_model": "b", "models": ["f"]}))
    lora = ["extract-lora", str(tmp_path / "b"), str(tmp_path / "f"), "--rank", "1"]
    argv = {"merge": ["merge", str(cfg)], "extract-lora": lora}[command]
    assert main([*argv, "--out", str(tmp_path / "o"), "--device", "meta"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device must be one of cpu, cuda" in err and "meta" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("method,params,extra", CASES)
def test_cuda_merge_matches_cpu(method, params, extra):
    ref, _ = _run(method, params, extra, "cpu")
    got, seen = _run(method, params, extra, "cuda")
    assert seen and all(s == {"cuda"} for s in seen)
    for k in ref:
        assert got[k].device.type == "cpu"
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_lora_extraction_matches_cpu():
    base, fts = _models()
    base = {k + ".weight" if k.startswith("layers") else k: v for k, v in base.items()}
    ft = {k + ".weight" if k.startswith("layers") else k: v for k, v in fts[0].items()}
    a = extract_lora(base, ft, rank=4, device="cpu")
    b = extract_lora(base, ft, rank=4, device="cuda")
    for ra, rb in zip(a.layers, b.layers, strict=True):
        assert rb["rel_error"] == pytest.approx(ra["rel_error"], rel=1e-4)
    for k in a.tensors:  # singular vectors are defined up to sign: compare the products
        if "lora_A" in k:
            kb = k.replace("lora_A", "lora_B")
            torch.testing.assert_close(
                b.tensors[kb] @ b.tensors[k], a.tensors[kb] @ a.tensors[k], atol=1e-4, rtol=0
            )


def test_cli_threads_option_is_applied_and_restored(tmp_path, monkeypatch):
    import layerwise.editing.merge as merge_pkg
    from layerwise.editing import save_checkpoint

    base, fts = _models(t=1)
    save_checkpoint(base, tmp_path / "base")
    save_checkpoint(fts[0], tmp_path / "ft0")
    (tmp_path / "m.yml").write_text(
        yaml.safe_dump({"method": "task_arithmetic", "base_model": "base", "models": ["ft0"]})
    )
    seen = []
    real = merge_pkg.execute_plan

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_pkg, "execute_plan", recording)
    before = torch.get_num_threads()
    args = ["merge", str(tmp_path / "m.yml"), "--no-progress", "--overwrite", "--out", str(tmp_path / "o")]
    assert main([*args, "--threads", "1"]) == 0
    assert main([*args, "--threads", "3"]) == 0
    assert seen == [1, 3] and torch.get_num_threads() == before
    assert main([*args, "--threads", "0"]) == 2


def test_write_behind_never_writes_a_reused_buffer(tmp_path, monkeypatch):
    """A method returning a view of the chunk buffer, a slow writer: the output is still right."""
    import time

    from layerwise.editing import load_state_dict
    from layerwise.editing.checkpoints import ShardedSafetensorsWriter

    base, fts = _models(t=2)
    plan = plan_merge("task_arithmetic", fts, base, chunk_elements=1000)
    plan.method = dataclasses.replace(plan.method, fn=lambda deltas, **kw: deltas[1])
    real = ShardedSafetensorsWriter.write

    def slow(self, name, tensor, start=0):
        time.sleep(0.002)  # the stream reads the next chunks into its buffers meanwhile
        return real(self, name, tensor, start)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", slow)
    execute_plan(plan, tmp_path / "o")
    got = load_state_dict(tmp_path / "o")
    for k in base:
        torch.testing.assert_close(got[k], fts[1][k], atol=1e-6, rtol=0)


def test_write_behind_raises_the_writers_error_and_leaves_nothing(tmp_path, monkeypatch):
    from layerwise.editing.checkpoints import ShardedSafetensorsWriter

    base, fts = _models(t=1)

    def broken(self, name, tensor, start=0):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", broken)
    with pytest.raises(OSError, match="No space"):
        merge_models("task_arithmetic", fts, base, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
