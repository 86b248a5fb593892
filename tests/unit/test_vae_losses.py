"""VAE training losses: KL, hinge, adaptive GAN weight, wavelet taps, G/D schedule, LPIPS loading,
the combined generator loss, and the VAE training config's validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from megatron_video.errors import ConfigError
from megatron_video.models.wfvae.model import DiagonalGaussian, HaarWavelet3D
from megatron_video.testing.vae import random_video, tiny_wfvae
from megatron_video.training import vae_losses
from megatron_video.training.vae_losses import (
    LPIPS,
    NLayerDiscriminator3D,
    VAELoss,
    VAELossConfig,
    WaveletTaps,
    adaptive_generator_weight,
    gan_phase,
    hinge_d_loss,
    kl_loss,
    load_lpips,
    vanilla_d_loss,
    wavelet_loss,
)

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Small convs run far faster on one thread (no OpenMP barriers on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- KL, hinge, adaptive weight


def test_kl_is_summed_per_sample_and_averaged_over_the_batch():
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(2, 2, 1, 1, 1)
    logvar = torch.tensor([0.0, math.log(4.0), -1.0, 1.0]).reshape(2, 2, 1, 1, 1)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))  # [B=2, 2Z=4, 1, 1, 1]
    per_element = [
        0.5 * (m**2 + math.exp(lv) - 1 - lv)
        for m, lv in zip([0.5, -1.0, 2.0, 0.0], [0.0, math.log(4.0), -1.0, 1.0], strict=True)
    ]
    expected = (sum(per_element[:2]) + sum(per_element[2:])) / 2
    assert kl_loss(posterior).item() == pytest.approx(expected, rel=1e-6)
    # N(0, 1) posteriors cost nothing; the sum runs over every latent element.
    zero = DiagonalGaussian(torch.zeros(3, 8, 2, 4, 4))
    assert kl_loss(zero).item() == 0.0
    unit_shift = DiagonalGaussian(torch.cat([torch.ones(3, 4, 2, 4, 4), torch.zeros(3, 4, 2, 4, 4)], 1))
    assert kl_loss(unit_shift).item() == pytest.approx(0.5 * 4 * 2 * 4 * 4)


def test_hinge_and_vanilla_discriminator_losses():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])
    fake = torch.tensor([-2.0, 0.5, 1.0, -1.0])
    # real: ReLU(1 - x) = [0, 0.5, 2, 0] -> 0.625; fake: ReLU(1 + x) = [0, 1.5, 2, 0] -> 0.875
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 0.875))
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = 0.5 * (sum(sp(-r) for r in real.tolist()) / 4 + sum(sp(f) for f in fake.tolist()) / 4)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # A discriminator that separates by more than the margin has zero hinge loss.
    assert hinge_d_loss(torch.full((3,), 1.5), torch.full((3,), -1.5)).item() == 0.0


def test_adaptive_weight_matches_a_hand_computation():
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    a = torch.tensor([[3.0, 0.0], [4.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    nll = (w * a).sum()  # d/dw = a, norm 5
    g = (w.pow(2) * b).sum()  # d/dw = 2 w b = [[2, -4], [2, -6]], norm sqrt(60)
    expected = 5.0 / (math.sqrt(60.0) + 1e-4) * 0.5
    got = adaptive_generator_weight(nll, g, w, disc_weight=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert not got.requires_grad
    # The ratio is clamped to [0, 1e4] before disc_weight scales it.
    flat = (w * 1e-9).sum()
    assert adaptive_generator_weight(nll, flat, w, disc_weight=0.5).item() == pytest.approx(0.5e4)
    # The graph survives for the backward that follows.
    (nll + g).backward()
    torch.testing.assert_close(w.grad, a + 2 * w.detach() * b)


def test_gan_schedule_alternates_after_disc_start():
    phases = [gan_phase(step, 4) for step in range(10)]
    assert phases == ["generator"] * 5 + ["discriminator", "generator"] * 2 + ["discriminator"]
    assert all(gan_phase(step, None) == "generator" for step in range(10))
    loss = VAELoss(VAELossConfig(disc_start=4, disc_factor=0.7))
    assert [loss.disc_factor(s) for s in (0, 3, 4, 9)] == [0.0, 0.0, 0.7, 0.7]
    assert VAELoss(VAELossConfig(disc_start=None)).disc_factor(100) == 0.0


# ---------------------------------------------------------------- wavelet taps


@pytest.fixture(scope="module")
def vae():
    return tiny_wfvae(seed=3).train()


def test_wavelet_taps_read_the_encoder_and_decoder_bands(vae):
    taps = WaveletTaps(vae)
    seen = {}
    hooks = [
        vae.decoder.connect_l2[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("l2", o)),
        vae.decoder.connect_l1[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("l1", o)),
        vae.decoder.inverse_wavelet_transform_l2.register_forward_hook(
            lambda m, i, o: seen.__setitem__("l2_pixels", o)
        ),
    ]
    video = random_video(2, 9, 32, 32, seed=4)
    with taps.recording():
        vae.decode(vae.encode(video, chunked=False).mean, chunked=False)
    for h in hooks:
        h.remove()
    taps.remove()
    enc_l1, dec_l1, enc_l2, dec_l2 = taps.coefficients()
    # Encoder: the 3D Haar of the low band of the input's 3D Haar, and again of its low band.
    expected_l1 = HaarWavelet3D()(HaarWavelet3D()(video)[:, :3])
    torch.testing.assert_close(enc_l1, expected_l1)
    torch.testing.assert_close(enc_l2, HaarWavelet3D()(expected_l1[:, :3]))
    # Decoder: the predicted bands; level 1's low band carries the level-2 reconstruction.
    torch.testing.assert_close(dec_l2, seen["l2"])
    torch.testing.assert_close(dec_l1[:, 3:], seen["l1"][:, 3:])
    torch.testing.assert_close(dec_l1[:, :3], seen["l1"][:, :3] + seen["l2_pixels"])
    assert enc_l1.shape == dec_l1.shape == (2, 24, 3, 8, 8)
    assert enc_l2.shape == dec_l2.shape == (2, 24, 2, 4, 4)
    expected = (enc_l1 - dec_l1).abs().sum() / 2 + (enc_l2 - dec_l2).abs().sum() / 2
    torch.testing.assert_close(wavelet_loss(enc_l1, dec_l1, enc_l2, dec_l2), expected)


def test_wavelet_taps_join_chunks_and_record_only_inside_the_block(vae):
    taps = WaveletTaps(vae)
    video = random_video(1, 17, 16, 16, seed=5)
    with torch.no_grad():
        with taps.recording():
            z = vae.encode(video, chunked=False).mean
            vae.decode(z, chunked=False)
        whole = taps.coefficients()
        with taps.recording():
            vae.decode(vae.encode(video, chunked=True, chunk_frames=8).mean, chunked=True, chunk_latents=1)
        chunked = taps.coefficients()
        vae.encode(video)  # outside the block: not recorded
    taps.remove()
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert chunked[0].shape[2] == whole[0].shape[2] == 5
    with pytest.raises(RuntimeError, match="recording"), taps.recording():
        taps.coefficients()


def test_wavelet_taps_fail_clearly_when_module_names_change(vae, monkeypatch):
    monkeypatch.setitem(vae_losses.WAVELET_TAPS, "enc_l1", ("encoder.wavelet_l1", "output"))
    with pytest.raises(ValueError, match="WAVELET_TAPS"):
        WaveletTaps(vae)


# ---------------------------------------------------------------- discriminator


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_discriminator_patch_logits_and_released_names(norm):
    d = NLayerDiscriminator3D(3, ndf=8, n_layers=3, norm=norm)
    out = d(torch.randn(1, 3, 9, 32, 32))  # batch of one works with either norm
    assert out.shape == (1, 1, 3, 4, 4)
    assert d(torch.randn(2, 3, 1, 32, 32)).shape == (2, 1, 1, 4, 4)  # images
    names = [n for n, _ in d.named_parameters()]
    assert names[:2] == ["main.0.weight", "main.0.bias"] and names[-1] == "main.11.bias"
    assert d.main[2].bias is None  # convs before a norm have no bias
    widths = [m.out_channels for m in d.modules() if isinstance(m, nn.Conv3d)]
    assert widths == [8, 16, 32, 64, 1]
    assert abs(d.main[0].weight.std().item() - 0.02) < 0.005


def test_sync_batch_norm_needs_cuda():
    cfg = VAELossConfig()
    cfg.discriminator.norm = "sync_batch"
    with pytest.raises(ConfigError, match="sync_batch needs CUDA"):
        cfg.validate("cpu")
    cfg.validate("cuda")


# ---------------------------------------------------------------- LPIPS


def test_lpips_builds_torchvision_layouts_and_loads_local_weights(tmp_path):
    vgg_keys = {k.split(".")[0] for k in LPIPS("vgg").features.state_dict()}
    assert vgg_keys == {str(i) for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
    alex = LPIPS("alex")
    assert {k.split(".")[0] for k in alex.features.state_dict()} == {"0", "3", "6", "8", "10"}

    gen = torch.Generator().manual_seed(0)
    backbone = {
        f"features.{k}": torch.randn(v.shape, generator=gen) * 0.05
        for k, v in alex.features.state_dict().items()
    }
    backbone["classifier.1.weight"] = torch.zeros(2, 2)  # the rest of a torchvision file is ignored
    path = tmp_path / "alexnet.pth"
    torch.save(backbone, path)
    heads = tmp_path / "alex_heads.pth"
    torch.save(
        {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))},
        heads,
    )
    lpips = load_lpips("alex", path, heads)
    torch.testing.assert_close(lpips.features[3].weight, backbone["features.3.weight"])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 64, 64)).clamp(-1, 1).requires_grad_()
    assert lpips(x, x).abs().max().item() < 1e-6
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and not any(p.requires_grad for p in lpips.parameters())

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_lpips("alex", tmp_path / "missing.pth", heads)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="not a torchvision alex state dict"):
        load_lpips("alex", tmp_path / "bad.pth", heads)
    with pytest.raises(ConfigError, match="lpips_backbone"):
        VAELossConfig(perceptual_weight=1.0).validate()


# ---------------------------------------------------------------- combined losses


def test_generator_loss_adds_every_term_with_its_weight(vae):
    torch.manual_seed(0)
    d = NLayerDiscriminator3D(3, ndf=8, n_layers=2, norm="group")
    cfg = VAELossConfig(disc_start=2, kl_weight=1e-6, wavelet_weight=0.1, disc_weight=0.5)
    loss_fn = VAELoss(cfg)
    taps = WaveletTaps(vae)
    video = random_video(2, 9, 16, 16, seed=6)
    with taps.recording():
        posterior = vae.encode(video, chunked=False)
        recon = vae.decode(posterior.mean, chunked=False)
    wl_coeffs = taps.coefficients()
    taps.remove()
    last = vae.decoder.conv_out.weight
    # Before disc_start: no GAN term, and the discriminator is not needed.
    early, early_terms = loss_fn.generator_loss(video, recon, posterior, 1, wavelet_coeffs=wl_coeffs)
    total, terms = loss_fn.generator_loss(video, recon, posterior, 2, last, d, wl_coeffs)

    nll = (recon - video).abs().sum() / (2 * 9)
    kl = kl_loss(posterior)
    wl = wavelet_loss(*wl_coeffs)
    g = -d(recon).mean()
    (gn,) = torch.autograd.grad(nll, last, retain_graph=True)
    (gg,) = torch.autograd.grad(g, last, retain_graph=True)
    d_weight = min(gn.norm().item() / (gg.norm().item() + 1e-4), 1e4) * 0.5
    torch.testing.assert_close(early, nll + 1e-6 * kl + 0.1 * wl)
    torch.testing.assert_close(total, nll + 1e-6 * kl + 0.1 * wl + d_weight * g)
    assert "g_loss" not in early_terms and terms["d_weight"].item() == pytest.approx(d_weight, rel=1e-5)
    assert terms["l1"].item() == pytest.approx((recon - video).abs().mean().item(), rel=1e-6)
    # The discriminator step: hinge on detached inputs, scaled by disc_factor from disc_start on.
    d_loss, d_terms = loss_fn.discriminator_loss(video, recon, 3, d)
    torch.testing.assert_close(d_loss, hinge_d_loss(d(video), d(recon)))
    assert loss_fn.discriminator_loss(video, recon, 1, d)[0].item() == 0.0
    d_loss.backward()
    assert all(p.grad is not None for p in d.parameters())
    assert all(p.grad is None for p in vae.parameters())


# ---------------------------------------------------------------- VAE training config


def _config(*overrides):
    from megatron_video.config.vae_training import load_vae_train_config

    return load_vae_train_config(ROOT / "examples" / "tiny" / "vae.yaml", list(overrides))


def test_demo_config_loads_with_derived_data_strides():
    cfg = _config("optim.lr=3e-4", "loss.discriminator.ndf=8")
    assert cfg.model.build_config().flavor == "tiny"
    g = cfg.sample_geometry
    assert (g.vae_stride_t, g.vae_stride_hw, cfg.data.num_frames) == (8, 8, 9)
    assert cfg.optim.lr == 3e-4 and cfg.loss.discriminator.ndf == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "did you mean 'lr'"),
        ("model.overrides={latent_dims: 4}", "model.overrides"),
        ("model.flavor=huge", "unknown WF-VAE flavor"),
        ("data.num_frames=10", "data.num_frames=10"),
        ("runtime.dtype=fp16", "fp16"),
        ("loss.discriminator.norm=sync_batch", "sync_batch"),
        ("ema_decay=1.0", "ema_decay"),
        ("loss.disc_start=-1", "disc_start"),
        ("model.init_from=/nonexistent/vae", "init_from"),
    ],
)
def test_config_errors_name_the_field(override, message):
    if "sync_batch" in override and torch.cuda.is_available():
        pytest.skip("sync_batch is valid with CUDA")
    with pytest.raises(ConfigError, match=message):
        _config(override, "runtime.device=cpu")
