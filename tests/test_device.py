"""The one device option: ``layerwise._device.resolve_device`` refuses each kind of bad device in one line
naming the parameter, and every ``--device`` / ``device=`` of the library and the CLI goes through it
(``meta`` is refused before any work or output). CUDA tests are marked ``cuda`` and run where a GPU is."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import yaml

from layerwise._device import DEVICE_HELP, add_device_argument, resolve_device
from layerwise.cli import main
from layerwise.errors import ConfigError, ParameterError


# ----------------------------------------------------------------------------------- resolve_device
@pytest.mark.parametrize("device", ["cpu", "CPU", " cpu ", "cpu:0", torch.device("cpu")])
def test_cpu_is_accepted(device):
    out = resolve_device(device)
    assert isinstance(out, torch.device) and out.type == "cpu"
    assert torch.zeros(2, device=out).sum().item() == 0.0


def test_none_gives_the_default_which_is_checked_too():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(None, default=torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ParameterError, match="meta"):
        resolve_device(None, default="meta")


def _refusal(device, match, **kw):
    with pytest.raises(ParameterError, match=match) as info:
        resolve_device(device, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(kw.get("name", "device") + " must be one of cpu, cuda")
    return msg


@pytest.mark.parametrize("device", ["", "gpu", "cuda:x", "cuda:0:1", "cuda:-1", "cpu cuda", "0"])
def test_malformed_names_are_refused(device):
    _refusal(device, "not a device name")


@pytest.mark.parametrize("device", [0, 1.5, True, ["cpu"], b"cpu"])
def test_values_that_are_not_names_are_refused(device):
    _refusal(device, f"type {type(device).__name__} is not a device name")


@pytest.mark.parametrize("device", ["meta", torch.device("meta"), "lazy"])
def test_devices_without_data_are_refused(device):
    _refusal(device, "cannot hold real data")


@pytest.mark.parametrize("device", ["xla", "hpu", "ipu", "vulkan"])
def test_other_device_types_are_refused(device):
    _refusal(device, "layerwise does not run on")


def test_cpu_index_other_than_zero_is_refused():
    _refusal("cpu:1", "one CPU device")


def test_cuda_refused_where_not_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "CUDA:1"):
        msg = _refusal(device, "CUDA is not available on this machine")
        assert torch.__version__ in msg


def test_cuda_index_out_of_range_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    msg = _refusal("cuda:2", "CUDA index 2 is out of range")
    assert "2 CUDA device(s), cuda:0 to cuda:1" in msg
    _refusal("cuda:7", "CUDA index 7 is out of range")


def test_mps_refused_where_not_available(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    _refusal("mps", "MPS .* is not available")


def test_a_device_that_fails_to_allocate_is_refused(monkeypatch):
    # CUDA reported available but the allocation fails (a broken driver): refused, not a traceback later
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    real_empty = torch.empty

    def empty(*args, device=None, **kw):
        if torch.device(device).type == "cuda":
            raise RuntimeError("CUDA driver initialization failed\nsecond line")
        return real_empty(*args, device=device, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    msg = _refusal("cuda:0", "cannot allocate on it")
    assert "driver initialization failed" in msg and "second line" not in msg


def test_the_message_names_the_parameter():
    _refusal("meta", "meta", name="--device")
    _refusal("meta", "meta", name="model.device")


# ----------------------------------------------------------------------------------- the argparse flag
def test_add_device_argument_gives_the_same_flag_everywhere():
    p = argparse.ArgumentParser()
    action = add_device_argument(p, help="where BP runs")
    assert action.help == f"where BP runs; {DEVICE_HELP}" and action.default == "cpu"
    assert p.parse_args([]).device == "cpu" and p.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    q = argparse.ArgumentParser()
    assert add_device_argument(q, default=None).help == DEVICE_HELP and q.parse_args([]).device is None


def _device_actions():
    from layerwise.cli import build_parser

    todo, found = [("layerwise", build_parser())], {}
    while todo:
        name, parser = todo.pop()
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo.extend((f"{name} {k}", v) for k, v in a.choices.items())
            elif "--device" in a.option_strings:
                found[name] = a
    return found


def test_every_device_flag_has_the_standard_text():
    found = _device_actions()
    expected = {"layerwise kernels gram", "layerwise kernels curve", "layerwise diffeo stability",
                "layerwise rhm denoise", "layerwise finetune", "layerwise diffusion text",
                "layerwise diffusion images", "layerwise m3id generate", "layerwise m3id pope",
                "layerwise m3id chair", "layerwise reproduce", "layerwise diffeo experiment"}
    assert expected <= set(found), sorted(expected - set(found))
    for name in expected:
        assert found[name].help.endswith(DEVICE_HELP), (name, found[name].help)


# ----------------------------------------------------------------------------------- every entry point
def _one_line_device_error(capsys, argv, flag="--device"):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{flag} must be one of cpu, cuda" in err and "cannot hold real data" in err, err


CURVE = """
input: {type: hypercube, shape: [4]}
teachers: {t: {type: local, s: 2, sigma: 2.0}}
students: {s: {type: local, s: 2, sigma: 2.0}}
P: [4, 8]
n_test: 8
seeds: [0]
"""


def test_kernels_gram_and_curve_refuse_meta(tmp_path, capsys):
    np.save(tmp_path / "X.npy", np.random.default_rng(0).standard_normal((5, 4)))
    out = tmp_path / "K.npy"
    _one_line_device_error(capsys, ["kernels", "gram", "--kind", "full", "--data", str(tmp_path / "X.npy"),
                                    "--out", str(out), "--device", "meta"])
    assert not out.exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CURVE)
    _one_line_device_error(capsys, ["kernels", "curve", str(cfg), "--out", str(tmp_path / "o"),
                                    "--device", "meta"])
    cfg.write_text(CURVE + "device: meta\n")  # the config's own key
    _one_line_device_error(capsys, ["kernels", "curve", str(cfg), "--out", str(tmp_path / "o")],
                           flag="config key 'device'")
    assert not (tmp_path / "o").exists()
    # the flag wins over the config key: cpu runs the config that says meta
    assert main(["kernels", "curve", str(cfg), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert (tmp_path / "o" / "curves.csv").exists()


def test_curve_config_device_is_a_config_error():
    from layerwise.kernels.config import parse_curve_config

    with pytest.raises(ConfigError, match="config key 'device' must be one of"):
        parse_curve_config({**yaml.safe_load(CURVE), "device": "cuda:x"})
    assert parse_curve_config({**yaml.safe_load(CURVE), "device": "CPU"})["device"] == torch.device("cpu")


def test_diffeo_stability_refuses_meta(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 4, 4), dtype=np.float32))
    _one_line_device_error(capsys, ["diffeo", "stability", "--model", "torch.nn:Identity", "--images",
                                    str(tmp_path / "x.npy"), "--out", str(tmp_path / "o"),
                                    "--device", "meta"])
    assert not (tmp_path / "o").exists()


def test_rhm_denoise_device_flag(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.pt"
    assert main(["rhm", "sample", "--v", "4", "--n-c", "2", "--m", "2", "--s", "2", "--L", "2",
                 "--n", "6", "--seed", "1", "--out", str(data)]) == 0
    capsys.readouterr()
    _one_line_device_error(capsys, ["rhm", "denoise", str(data), "--process", "eps", "--level", "0.2",
                                    "--out", str(tmp_path / "o.pt"), "--device", "meta"])
    assert not (tmp_path / "o.pt").exists()
    import layerwise.hierarchy.denoising as denoising

    seen, real = [], denoising.denoise

    def spy(*args, **kw):
        seen.append(kw.get("device"))
        return real(*args, **kw)

    monkeypatch.setattr(denoising, "denoise", spy)
    assert main(["rhm", "denoise", str(data), "--process", "eps", "--level", "0.2", "--out",
                 str(tmp_path / "o.pt"), "--device", "CPU"]) == 0
    assert seen == [torch.device("cpu")]  # the flag reaches BP


def test_finetune_device_flag_overrides_the_config(tmp_path, capsys):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"kind": "toy_cnn", "device": "meta"},
                                   "tasks": [{"name": "rot90"}]}))
    assert main(["finetune", str(cfg), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "model.device must be one of" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"model": {"kind": "toy_cnn"}, "tasks": [{"name": "rot90"}]}))
    _one_line_device_error(capsys, ["finetune", str(cfg), "--out", str(tmp_path / "o"), "--dry-run",
                                    "--device", "meta"])
    assert main(["finetune", str(cfg), "--out", str(tmp_path / "o"), "--dry-run", "--device", "CPU"]) == 0
    assert "device: cpu" in capsys.readouterr().out.splitlines()


def test_diffusion_commands_refuse_meta_before_loading(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some words " * 20)
    _one_line_device_error(capsys, ["diffusion", "text", "--model", str(tmp_path / "nomodel"), "--text",
                                    str(text), "--levels", "0.5", "--out", str(tmp_path / "o"),
                                    "--device", "meta"])
    _one_line_device_error(capsys, ["diffusion", "images", "--pipeline", str(tmp_path / "p"), "--encoder",
                                    str(tmp_path / "e"), "--timesteps", "10", "--out", str(tmp_path / "o"),
                                    "--device", "meta"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("action", ["generate", "pope", "chair"])
def test_m3id_commands_refuse_meta_before_loading(tmp_path, capsys, action):
    argv = ["m3id", action, "--model", str(tmp_path / "nomodel"), "--device", "meta"]
    if action == "generate":
        argv += ["--prompt", "x"]
    else:
        argv += ["--images", str(tmp_path), "--out", str(tmp_path / "o.csv")]
        argv += ["--questions" if action == "pope" else "--annotations", str(tmp_path / "q.json")]
    _one_line_device_error(capsys, argv)


class _Stop(ParameterError):
    pass


@pytest.mark.parametrize("command", ["m3id generate", "diffusion text"])
def test_the_flag_reaches_the_loader(tmp_path, capsys, monkeypatch, command):
    # " CPU " resolved by the command: the loader gets torch.device("cpu"), not the raw text or the default
    seen = []

    def spy(*args, **kw):
        seen.append(kw.get("device"))
        raise _Stop("stop here")

    if command == "m3id generate":
        pytest.importorskip("transformers")
        import layerwise.decoding.loading as loading

        monkeypatch.setattr(loading, "load_for_m3id", spy)
        (tmp_path / "model").mkdir()
        argv = ["m3id", "generate", "--model", str(tmp_path / "model"), "--prompt", "x"]
    else:
        import layerwise.diffusion.runner as runner

        monkeypatch.setattr(runner, "run_text", spy)
        argv = ["diffusion", "text", "--model", "m", "--text", "t.txt", "--levels", "0.5", "--out", "o"]
    assert main([*argv, "--device", " CPU "]) == 2
    assert "stop here" in capsys.readouterr().err
    assert len(seen) == 1 and isinstance(seen[0], torch.device) and seen[0] == torch.device("cpu")


def test_library_entry_points_refuse_meta():
    from layerwise.hierarchy import RHM
    from layerwise.hierarchy.denoising import denoise
    from layerwise.hierarchy.learning.train import train
    from layerwise.kernels import hypercube, laplace, learning_curve

    with pytest.raises(ParameterError, match="device must be one of"):
        learning_curve(laplace, laplace, [4], 4, [0], hypercube(3), device="meta")
    rhm = RHM(4, 2, 2, 2, 2, seed=0)
    data = rhm.sample(6, seed=0)
    with pytest.raises(ParameterError, match="device must be one of"):
        denoise(rhm, data, "eps", 0.2, seed=0, device="meta")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ParameterError, match="device must be one of"):
        train(model, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), device="meta")


# ----------------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
def test_cuda_devices_resolve_and_give_cpu_numbers():
    n = torch.cuda.device_count()
    assert resolve_device("cuda").type == "cuda" and resolve_device(f"cuda:{n - 1}").index == n - 1
    with pytest.raises(ParameterError, match=f"CUDA index {n} is out of range"):
        resolve_device(f"cuda:{n}")
    from layerwise.kernels import hypercube, laplace, learning_curve

    args = (laplace, laplace, [8, 16], 16, [0, 1], hypercube(4))
    cpu, gpu = learning_curve(*args), learning_curve(*args, device="cuda")
    torch.testing.assert_close(gpu.mse, cpu.mse, rtol=1e-9, atol=1e-12)  # float64 on both
