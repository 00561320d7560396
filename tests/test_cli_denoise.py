"""`layerwise rhm denoise` end to end, and the library function and file format behind it."""

from __future__ import annotations

import pytest
import torch

from layerwise.cli import main
from layerwise.hierarchy import RHM, belief_propagation, make_noise_process
from layerwise.hierarchy.datafile import load_dataset
from layerwise.hierarchy.denoising import denoise, load_denoised, save_denoised


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.pt"
    assert main(["rhm", "sample", "--v", "6", "--n-c", "4", "--m", "2", "--L", "3", "--n", "40",
                 "--out", str(path)]) == 0
    return path


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize("process", ["eps", "uniform", "mask"])
def test_cli_denoise_writes_exact_posterior(data_file, tmp_path, suffix, process, capsys):
    out = tmp_path / f"out{suffix}"
    assert main(["rhm", "denoise", str(data_file), "--process", process, "--level", "0.5", "--seed", "3",
                 "--out", str(out)]) == 0
    assert "class kept" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    rhm, clean = load_dataset(data_file)
    got = load_denoised(out)
    assert got["process"] == process and got["level"] == 0.5 and got["seed"] == 3
    assert torch.equal(got["clean_tokens"], clean.tokens)
    # The posterior samples reload as a consistent RHM data set (tokens == rules applied to choices).
    rhm2, post = load_dataset(out)
    assert all(torch.equal(a, b) for a, b in zip(rhm2.rules, rhm.rules, strict=True))
    assert post.tokens.shape == clean.tokens.shape
    # Marginals are exactly BP on the evidence of the stored noisy tokens.
    proc = make_noise_process(process, rhm.v)
    noisy = got["noisy"]
    evidence = proc.leaf_evidence(clean.tokens if process == "eps" else noisy, 0.5)
    want = belief_propagation(rhm, evidence)
    for lev, marg in enumerate(want.marginals):
        torch.testing.assert_close(got[f"marginals_{lev}"], marg, atol=1e-12, rtol=0)
    torch.testing.assert_close(got["log_partition"], want.log_partition)
    # Posterior samples have positive posterior probability at every level.
    for lev, symbols in enumerate(post.tree):
        p = got[f"marginals_{lev}"].gather(2, symbols.unsqueeze(-1))
        assert (p > 0).all()
    if process == "mask":
        seen = noisy != rhm.v
        assert torch.equal(post.tokens[seen], noisy[seen])


def test_cli_is_seeded_and_noise_zero_returns_the_data(data_file, tmp_path):
    a, b, c = (tmp_path / f"{k}.npz" for k in "abc")
    for path, seed in ((a, 1), (b, 1), (c, 2)):
        main(["rhm", "denoise", str(data_file), "--process", "uniform", "--level", "0.6", "--seed", str(seed),
              "--out", str(path)])
    ra, rb, rc = load_denoised(a), load_denoised(b), load_denoised(c)
    assert torch.equal(ra["tokens"], rb["tokens"]) and torch.equal(ra["noisy"], rb["noisy"])
    assert not torch.equal(ra["noisy"], rc["noisy"])
    zero = tmp_path / "zero.pt"
    main(["rhm", "denoise", str(data_file), "--process", "mask", "--level", "0", "--out", str(zero)])
    got = load_denoised(zero)
    assert torch.equal(got["tokens"], got["clean_tokens"]) and torch.equal(got["labels"], got["clean_labels"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--process", "eps", "--level", "1.5"], "level must be"),
        (["--process", "eps", "--level", "0.2", "--batch-size", "0"], "batch_size must be"),
    ],
)
def test_cli_bad_values(data_file, tmp_path, capsys, args, message):
    assert main(["rhm", "denoise", str(data_file), *args, "--out", str(tmp_path / "o.pt")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_cli_bad_paths(data_file, tmp_path, capsys):
    assert main(["rhm", "denoise", str(data_file), "--process", "eps", "--level", "0.2",
                 "--out", str(tmp_path / "o.txt")]) == 2
    assert "out must end in one of" in capsys.readouterr().err
    assert main(["rhm", "denoise", str(tmp_path / "missing.pt"), "--process", "eps", "--level", "0.2",
                 "--out", str(tmp_path / "o.pt")]) == 2
    assert main(["rhm", "denoise", str(data_file), "--process", "gauss", "--level", "0.2",
                 "--out", str(tmp_path / "o.pt")]) == 2
    assert "unknown noise process 'gauss'; valid names: eps, mask, uniform" in capsys.readouterr().err


def test_denoise_batches_agree_with_one_batch(tmp_path):
    rhm = RHM(5, 3, 2, 2, 3, seed=0)
    data = rhm.sample(23, seed=1)
    one = denoise(rhm, data, "eps", 0.6, seed=0)
    many = denoise(rhm, data, "eps", 0.6, seed=0, batch_size=5)
    for a, b in zip(one.marginals, many.marginals, strict=True):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)
    assert len(many.posterior) == 23
    rebuilt = rhm.from_choices(many.posterior.labels, many.posterior.choices)
    assert torch.equal(rebuilt.tokens, many.posterior.tokens)
    summary = one.summary()
    assert 0 <= summary["class_kept"] <= 1 and summary["n"] == 23
    path = save_denoised(tmp_path / "x.pt", rhm, one)
    assert load_denoised(path)["marginals_3"].shape == (23, 8, 5)


def test_denoise_validation():
    rhm = RHM(5, 3, 2, 2, 2, seed=0)
    data = rhm.sample(4, seed=1)
    with pytest.raises(ValueError, match="valid names"):
        denoise(rhm, data, "gauss", 0.1)
    with pytest.raises(ValueError, match="does not match"):
        denoise(rhm, data, make_noise_process("eps", 4), 0.1)
    with pytest.raises(TypeError, match="data must be an RHMSample"):
        denoise(rhm, data.tokens, "eps", 0.1)
