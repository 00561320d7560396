"""Real-model adapters on tiny models built from config (no downloads): plumbing, shapes, exact limits."""

from __future__ import annotations

import types

import pytest
import torch

from layerwise.diffusion import (
    MaskedLMDenoiser,
    TokenMasking,
    denoise_from,
    hf_patch_encoder,
    image_forward_backward,
    load_unet_and_scheduler,
    passages_from_text,
    text_forward_backward,
)

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "big", "small", "red", "ran", "and", "saw", "it"]


# --------------------------------------------------------------------------------------------- text
def tiny_bert(tmp_path=None):
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config).eval()
    if tmp_path is None:
        return model, vocab
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    return model, vocab


def test_token_masking_limits_and_protection():
    x0 = torch.arange(10).repeat(200, 1)  # (200, 10); ids 0 and 1 protected
    proc = TokenMasking(mask_id=99, protected_ids=(0, 1))
    assert torch.equal(proc.corrupt(x0, 0.0, 0), x0)
    full = proc.corrupt(x0, 1.0, 0)
    assert (full[:, 2:] == 99).all() and torch.equal(full[:, :2], x0[:, :2])
    half = proc.corrupt(x0, 0.3, 1)
    assert (half[:, 2:] == 99).double().mean().item() == pytest.approx(0.3, abs=0.03)  # 1600 draws
    with pytest.raises(ValueError, match="level"):
        proc.corrupt(x0, 1.5, 0)


class UniformLM(torch.nn.Module):
    """Context-free 'model': fixed logits; records how many masks each call sees."""

    def __init__(self, logits, mask_id):
        super().__init__()
        self.logits, self.mask_id, self.seen = logits, mask_id, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        self.seen.append((input_ids == self.mask_id).sum(1))
        return types.SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_mask_predict_fills_masks_only_and_follows_the_model(strategy):
    V, mask = 6, 5
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0, 0.0]))  # never produces 4 or the mask
    model = UniformLM(logits, mask)
    den = MaskedLMDenoiser(model, mask, n_steps=4, strategy=strategy, forbidden_ids=(4,), batch_size=1000)
    x0 = torch.randint(0, 4, (500, 16), generator=torch.Generator().manual_seed(0))
    x_t = TokenMasking(mask).corrupt(x0, 0.5, 1)
    x_hat = den.sample_x0(x_t, None, 0.5, torch.Generator().manual_seed(2))
    masked = x_t == mask
    assert not (x_hat == mask).any()
    assert torch.equal(x_hat[~masked], x0[~masked])
    freq = torch.bincount(x_hat[masked], minlength=V).double() / masked.sum()
    assert freq[4:].sum() == 0  # forbidden ids never produced
    if strategy == "ancestral":
        # Context-free model: revealed tokens are i.i.d. from the softmax (~4000 draws, se <= 0.008).
        # (Mask-predict keeps the most confident draws, so it is biased towards likely tokens by design.)
        ref = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0, 0.0], dtype=torch.float64)
        assert torch.allclose(freq, ref, atol=0.03)
    # Masked counts seen by the model at steps k = 0..3 fall linearly: n0 (K - k) / K (exactly for
    # mask-predict, in expectation for the ancestral sampler whose reveal step is uniform on the K steps).
    n0 = masked.sum().item()
    seen = torch.stack([s.sum() for s in model.seen]).double()
    if strategy == "confidence":  # each row keeps floor(n0_row (K - k) / K) masks after k steps
        rows = masked.sum(1)
        expected = torch.stack([((rows * (4 - k)) // 4).sum() for k in range(4)]).double()
        tol = 0.0
    else:
        expected = torch.tensor([n0 * (4 - k) / 4 for k in range(4)], dtype=torch.float64)
        tol = 0.04 * n0  # binomial se ~ 0.007 n0
    assert len(model.seen) == 4 and (seen - expected).abs().max() <= tol


def test_tiny_bert_forward_backward_text(tmp_path):
    _, vocab = tiny_bert(tmp_path)
    den = MaskedLMDenoiser.from_pretrained(str(tmp_path), n_steps=3, batch_size=8)
    assert den.mask_id == vocab.index("[MASK]")
    assert set(den.forbidden_ids) == {vocab.index(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    other = MaskedLMDenoiser.from_pretrained(str(tmp_path), tokenizer=str(tmp_path), mask_id=7)
    assert other.mask_id == 7 and 7 in other.forbidden_ids  # explicit mask id (MDLM-style checkpoints)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(7 * 41))
    ids = passages_from_text(den.tokenizer, text, length=24, n_passages=6)
    assert ids.shape == (6, 24)
    res = text_forward_backward(den, ids, [0.0, 0.5], 4, seed=3)
    zero, half = res.levels
    assert zero.change_probability == 0.0
    assert 0.0 < half.change_probability <= 0.5 + 0.1
    summary = half.summary(r_max=10)
    assert len(summary["C_r"]) == 24 and summary["chi_r_max"] == summary["chi_r_max"]  # not NaN
    again = text_forward_backward(den, ids, [0.5], 4, seed=3).levels[0]
    assert torch.equal(again.statistics.C, half.statistics.C)  # same seed, same result
    with pytest.raises(ValueError, match="length"):
        passages_from_text(den.tokenizer, "the cat", length=24)


# --------------------------------------------------------------------------------------------- images
class OracleUNet(torch.nn.Module):
    """The exact noise predictor when the data distribution is a single image c."""

    def __init__(self, c, alphas_cumprod):
        super().__init__()
        self.c, self.abar = c, alphas_cumprod

    def forward(self, x, t):
        a = self.abar[int(t)]
        return types.SimpleNamespace(sample=(x - a.sqrt() * self.c) / (1 - a).sqrt())


def patch_encoder(images):
    """(B, 3, 16, 16) -> (B, 4, 4, 48): raw 4x4 patches, flattened."""
    p = images.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, 3, 4, 4, 4, 4)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(images.shape[0], 4, 4, 48)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_oracle_denoiser_returns_the_single_training_image(kind):
    sched = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}[kind](num_train_timesteps=100)
    # Inside [-1, 1]: the schedulers clip their x0 predictions to that range by default.
    c = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 1.8 - 0.9
    unet = OracleUNet(c, sched.alphas_cumprod)
    x_hat, used = denoise_from(unet, sched, c.expand(3, -1, -1, -1), 77, n_inference_steps=10, generator=5)
    assert used == 70  # snapped down to the 10-step schedule 90, 80, ..., 0
    assert torch.allclose(x_hat, c.expand(3, -1, -1, -1), atol=1e-4)
    res = image_forward_backward(unet, sched, c, [30, 90], 3, patch_encoder, n_inference_steps=10, seed=6)
    assert [r.timestep for r in res] == [30, 90]
    assert all(r.statistics.change_probability < 1e-4 for r in res)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def test_tiny_unet_forward_backward_shapes_and_monotone_damage(tmp_path):
    unet, sched = tiny_unet(), diffusers.DDPMScheduler(num_train_timesteps=100)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    unet2, sched2 = load_unet_and_scheduler(str(tmp_path), scheduler="ddim")
    assert isinstance(sched2, diffusers.DDIMScheduler)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    res = image_forward_backward(unet2, sched2, images, [0, 95], 2, patch_encoder, n_inference_steps=5,
                                 seed=8, keep_images=True)
    assert res[0].x_hat.shape == (2, 2, 3, 16, 16)
    assert res[0].statistics.grid == (4, 4) and res[0].statistics.C.shape == (16, 16)
    # Barely noised images come back nearly intact; from the last step they are new images.
    assert res[0].statistics.change_probability < 0.2 * res[1].statistics.change_probability
    r, C_r = res[1].statistics.C_of_r()
    assert r[0] == 0 and r[1] == 1 and r[2] == pytest.approx(2**0.5)


def test_hf_patch_encoder_on_tiny_vit():
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16)
    vit = transformers.ViTModel(config).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = hf_patch_encoder(vit)(images)  # resized to 16 -> 4x4 patches
    assert out.shape == (3, 4, 4, 8)
    # The same computation by hand: [-1, 1] -> [0, 1], resize, ImageNet normalization, drop CLS, grid.
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(16, 16), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = vit(pixel_values=(x - mean) / std).last_hidden_state  # (3, 1 + 16, 8)
    torch.testing.assert_close(out.detach(), hidden[:, 1:].reshape(3, 4, 4, 8))
    out = hf_patch_encoder(vit, image_size=24)(torch.rand(3, 3, 32, 32) * 2 - 1)  # interpolated positions
    assert out.shape == (3, 6, 6, 8)


def test_adapter_arguments_are_checked():
    with pytest.raises(ValueError, match="strategy"):
        MaskedLMDenoiser(lambda **kw: None, 3, strategy="greedy")
    with pytest.raises(TypeError, match="model"):
        MaskedLMDenoiser("bert", 3)
    sched = diffusers.DDPMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="timestep"):
        denoise_from(tiny_unet(), sched, torch.zeros(1, 3, 16, 16), 100)
    with pytest.raises(ValueError, match="n_trajectories"):
        image_forward_backward(tiny_unet(), sched, torch.zeros(1, 3, 16, 16), [10], 1, patch_encoder)
    with pytest.raises(ValueError, match="scheduler"):
        load_unet_and_scheduler("nowhere", scheduler="euler")


# --------------------------------------------------------------------------------------------- CLI
def test_cli_text_and_images_on_saved_tiny_checkpoints(tmp_path):
    import json

    from layerwise.cli import main

    bert = tmp_path / "bert"
    bert.mkdir()
    tiny_bert(bert)
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(WORDS[(3 * i) % len(WORDS)] for i in range(200)))
    out = tmp_path / "text_out"
    assert main(["diffusion", "text", "--model", str(bert), "--text", str(text), "--levels", "0.2", "0.6",
                 "--n-passages", "3", "--length", "16", "--n-trajectories", "3", "--n-steps", "2",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [lv["level"] for lv in res["levels"]] == [0.2, 0.6] and res["n_passages"] == 3
    assert (out / "chi.png").exists() and (out / "C_of_r.png").exists() and (out / "results.csv").exists()

    pipe = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(num_train_timesteps=50)
                           ).save_pretrained(pipe)
    vit = tmp_path / "vit"
    vit_config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=16)
    transformers.ViTModel(vit_config).save_pretrained(vit)
    out = tmp_path / "img_out"
    args = ["diffusion", "images", "--pipeline", str(pipe), "--encoder", str(vit), "--timesteps", "10",
            "40", "--n-images", "2", "--n-trajectories", "2", "--n-inference-steps", "5",
            "--encoder-size", "24", "--out", str(out)]
    # No image processor saved with the encoder: refused (no silent ImageNet statistics) unless asked for.
    assert main(args) == 2 and not out.exists()
    assert main([*args, "--normalization", "imagenet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["grid"] == [3, 3]  # 24 px / 8 px patches
    assert res["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # With a processor saved, its statistics are used (--overwrite replaces the earlier output).
    processor = transformers.ViTImageProcessor(image_mean=[0.25, 0.5, 0.75], image_std=[0.5, 0.5, 0.5])
    processor.save_pretrained(vit)
    assert main(args) == 2  # out exists: refused without --overwrite
    assert main([*args, "--overwrite"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["mean"] == pytest.approx([0.25, 0.5, 0.75]) and res["normalization"] == "processor"
    assert [lv["timestep"] for lv in res["levels"]] == [10, 40]
    # Bad input: one readable error line and exit code 2, not a traceback.
    assert main(["diffusion", "text", "--model", str(bert), "--text", str(text), "--levels", "1.5",
                 "--n-passages", "1", "--length", "16", "--out", str(out)]) == 2


def test_load_images_folder_scales_to_model_range(tmp_path):
    from PIL import Image

    from layerwise.diffusion.runner import _load_images

    Image.new("RGB", (8, 8), (255, 0, 127)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "b.jpg")
    x = _load_images(tmp_path, 4, None)
    assert x.shape == (2, 3, 4, 4)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 127 / 127.5 - 1]), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="images"):
        (tmp_path / "empty").mkdir()
        _load_images(tmp_path / "empty", 4, None)
