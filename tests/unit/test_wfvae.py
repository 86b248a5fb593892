"""WF-VAE: Haar transforms, exact causal-cache chunking, causality, shapes, adapter round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from megatron_video.errors import CheckpointMismatch, ConfigError
from megatron_video.models.wfvae import state_dict_adapter as adapter
from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.model import (
    HAAR_3D_COEFF,
    WFVAE,
    HaarWavelet2D,
    HaarWavelet3D,
    InverseHaarWavelet2D,
    InverseHaarWavelet3D,
    TemporalCache,
    auto_chunk_sizes,
    decode_spatial_tiles,
)
from megatron_video.testing.vae import random_video, tiny_wfvae

ATOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """Small convs run far faster on one thread (no OpenMP barriers on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vaes():
    return {8: tiny_wfvae(seed=1), 4: tiny_wfvae(seed=2, temporal_compression=4)}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- Haar transforms


@pytest.mark.parametrize("frames", [1, 3, 9])
def test_haar_3d_inverse_of_forward(frames):
    x = torch.randn(2, 3, frames, 8, 12)
    exact = 1 / math.sqrt(8)
    fwd, inv = HaarWavelet3D(exact), InverseHaarWavelet3D(exact)
    coeffs = fwd(x)
    assert coeffs.shape == (2, 24, (frames + 1) // 2, 4, 6)
    assert _max_diff(inv(coeffs), x) <= 1e-6
    # The released coefficient 0.3536 is not 1/sqrt(8): the round trip scales by 8 * 0.3536^2.
    released = InverseHaarWavelet3D()(HaarWavelet3D()(x))
    assert _max_diff(released, x * 8 * HAAR_3D_COEFF**2) <= 1e-6


def test_haar_2d_inverse_of_forward():
    x = torch.randn(2, 3, 5, 8, 12)
    coeffs = HaarWavelet2D()(x)
    assert coeffs.shape == (2, 12, 5, 4, 6)
    assert _max_diff(InverseHaarWavelet2D()(coeffs), x) <= 1e-6


def test_haar_subbands_are_band_major():
    # A constant video has energy only in the low band; channel = subband * C + c.
    x = torch.ones(1, 3, 5, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1, 1)
    coeffs = HaarWavelet3D()(x)
    torch.testing.assert_close(coeffs[:, :3, :, 0, 0], 8 * HAAR_3D_COEFF * x[:, :, :3, 0, 0])
    assert coeffs[:, 3:].abs().max() <= 1e-6
    # A video whose frame 1 alone differs: the first coefficient frame only sees frame 0.
    y = torch.zeros(1, 1, 3, 2, 2)
    y[:, :, 1] = 1
    c = HaarWavelet3D()(y)
    assert c[:, :, 0].abs().max() <= 1e-6 and c[:, 4, 1].item() == pytest.approx(4 * HAAR_3D_COEFF)


# ---------------------------------------------------------------- chunking equals the full pass


# 4x8x8 at 5 and 13 frames (2 and 4 latents): main's chunked decode crashes or corrupts the last frames.
CHUNK_CASES = [(8, t) for t in (1, 9, 17, 33)] + [(4, t) for t in (1, 5, 9, 13, 17)]


@pytest.mark.parametrize("stride,frames", CHUNK_CASES)
def test_chunked_encode_equals_full(vaes, stride, frames):
    vae = vaes[stride]
    video = random_video(1, frames, 16, 16, seed=frames)
    with torch.no_grad():
        full = vae.encode(video, chunked=False).moments
        for chunk in (stride, 2 * stride, 3 * stride, None):
            chunked = vae.encode(video, chunked=True, chunk_frames=chunk).moments
            assert _max_diff(chunked, full) <= ATOL, f"chunk {chunk}"


@pytest.mark.parametrize("stride,frames", CHUNK_CASES)
def test_chunked_decode_equals_full(vaes, stride, frames):
    vae = vaes[stride]
    t_lat = 1 + (frames - 1) // stride
    z = torch.randn(1, vae.latent_channels, t_lat, 2, 2, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        full = vae.decode(z, chunked=False)
        assert full.shape == (1, 3, frames, 16, 16)
        for chunk in (1, 2, 3, None):
            assert _max_diff(vae.decode(z, chunked=True, chunk_latents=chunk), full) <= ATOL, f"chunk {chunk}"


@pytest.mark.parametrize("stride", [8, 4])
@pytest.mark.parametrize("splits", [[3, 5], [2, 3, 5], [4, 5], [1, 4, 5]])
def test_any_latent_split_decodes_exactly(vaes, stride, splits):
    """Chunk boundaries anywhere, including a first chunk of several latents: the chunk-0
    look-ahead case of the v1.3 code (trilinear upsampling of its last frame needs the next one)."""
    vae = vaes[stride]
    z = torch.randn(1, vae.latent_channels, 5, 2, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = vae.decoder(z)
        cache, parts, start = TemporalCache(), [], 0
        for end in splits:
            cache.last = end == splits[-1]
            parts.append(vae.decoder(z[:, :, start:end], cache))
            start = end
    assert _max_diff(torch.cat(parts, dim=2), full) <= ATOL


def test_groupnorm_variant_runs_and_chunking_is_only_approximate():
    vae = tiny_wfvae(seed=3, norm_type="groupnorm", base_channels=32, encoder_energy_flow_hidden_size=32,
                     decoder_energy_flow_hidden_size=32)  # fmt: skip
    video = random_video(1, 17, 16, 16)
    with torch.no_grad():
        full = vae.encode(video, chunked=False).moments
        chunked = vae.encode(video, chunked=True, chunk_frames=8).moments
    assert full.shape == chunked.shape == (1, 16, 3, 2, 2)
    assert torch.isfinite(full).all()


def test_auto_chunk_sizes_follow_v1_5():
    assert auto_chunk_sizes(17, 8) == (8, 2)
    assert auto_chunk_sizes(33, 8) == (8, 2)
    assert auto_chunk_sizes(121, 8) == (8, 4)  # 16 latents: 15 % 2 == 1 doubles the decoder chunk
    assert auto_chunk_sizes(17, 4) == (4, 2)
    assert auto_chunk_sizes(1, 8) == (8, 2)


# ---------------------------------------------------------------- causality and shapes


@pytest.mark.parametrize("stride", [8, 4])
def test_latents_do_not_depend_on_later_frames(vaes, stride):
    vae = vaes[stride]
    frames = 1 + 3 * stride
    video = random_video(1, frames, 16, 16, seed=5)
    changed = video.clone()
    changed[:, :, 1:] = random_video(1, frames - 1, 16, 16, seed=6)
    later = video.clone()
    later[:, :, 1 + stride :] = 0.0
    with torch.no_grad():
        base = vae.encode(video, chunked=False).moments
        assert _max_diff(vae.encode(changed, chunked=False).moments[:, :, :1], base[:, :, :1]) <= 1e-6
        # Latent k sees pixel frames up to 1 + k * stride only.
        assert _max_diff(vae.encode(later, chunked=False).moments[:, :, :2], base[:, :, :2]) <= 1e-6
        assert _max_diff(vae.encode(later, chunked=False).moments, base) > 1e-3


def test_shapes_follow_the_reference_example_scaled_down(vaes):
    """Reference (v1.5, 121x576x1024): Haar3D 61x288x512 (24), l1 31x144x256 (24), l2 16x72x128 (24),
    down1 31x144x256 (C0), down2 16x72x128 (2C0), mid 4C0, latent 32x16x72x128. Here 25x32x48."""
    vae = vaes[8]
    c0 = vae.cfg.base_channels
    enc = vae.encoder
    seen = {}
    hooks = [
        getattr(enc, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o.shape[1:])
        )
        for name in ("wavelet_transform_in", "wavelet_transform_l1", "wavelet_transform_l2")
    ]
    hooks += [enc.down1[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("down1", o.shape[1:]))]
    hooks += [enc.down2[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("down2", o.shape[1:]))]
    hooks += [enc.mid[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o.shape[1:]))]
    with torch.no_grad():
        posterior = vae.encode(random_video(1, 25, 32, 48), chunked=False)
    for h in hooks:
        h.remove()
    assert seen["wavelet_transform_in"] == (24, 13, 16, 24)
    assert seen["wavelet_transform_l1"] == (24, 7, 8, 12)
    assert seen["wavelet_transform_l2"] == (24, 4, 4, 6)
    assert seen["down1"] == (c0, 7, 8, 12)
    assert seen["down2"] == (2 * c0, 4, 4, 6)
    assert seen["mid"] == (4 * c0, 4, 4, 6)
    assert posterior.mean.shape == (1, 8, 4, 4, 6)
    with torch.no_grad():
        assert vae.decode(posterior.mean, chunked=False).shape == (1, 3, 25, 32, 48)
    assert vae.latent_num_frames(121) == 16 and vaes[4].latent_num_frames(93) == 24


def test_properties_and_frame_count_errors(vaes):
    vae8, vae4 = vaes[8], vaes[4]
    assert (vae8.temporal_stride, vae8.spatial_stride, vae8.latent_channels) == (8, 8, 8)
    assert vae4.temporal_stride == 4
    assert vae8.valid_num_frames(1) and vae8.valid_num_frames(17) and not vae8.valid_num_frames(16)
    with pytest.raises(
        ValueError, match=r"1 \+ k \* 8 frames \(1, 9, 17, 25, 33, \.\.\.\); got 20.*17 and 25"
    ):
        vae8.encode(torch.zeros(1, 3, 20, 16, 16))
    with pytest.raises(ValueError, match=r"1, 5, 9, 13, 17"):
        vae4.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae8.encode(torch.zeros(1, 3, 9, 12, 16))
    with pytest.raises(ValueError, match="multiple of the temporal stride 8"):
        vae8.encode(torch.zeros(1, 3, 17, 16, 16), chunked=True, chunk_frames=4)


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="shift has 3 values but latent_dim=8"):
        WFVAEConfig.from_flavor("tiny", shift=[0.0] * 3).validate()
    with pytest.raises(ConfigError, match="not multiples of 32"):
        WFVAEConfig.from_flavor("tiny", norm_type="groupnorm").validate()
    with pytest.raises(ConfigError, match="temporal_compression=2"):
        WFVAEConfig.from_flavor("tiny", temporal_compression=2).validate()
    with pytest.raises(ConfigError, match="unknown WF-VAE flavor"):
        WFVAEConfig.from_flavor("huge")
    for name in ("wfvae_4x8x8_d8", "wfvae_8x8x8_d32"):
        WFVAEConfig.from_flavor(name).validate()
    assert len(WFVAEConfig.from_flavor("wfvae_8x8x8_d32").shift) == 32


# ---------------------------------------------------------------- posterior and latents


def test_posterior_and_latent_normalisation():
    vae = tiny_wfvae(seed=4, shift=[0.1 * i for i in range(8)], scale=[1.0 + 0.1 * i for i in range(8)])
    video = random_video(2, 9, 16, 16)
    with torch.no_grad():
        post = vae.encode(video)
        lat = vae.encode_latents(video, sample=False)
        shift, scale = vae.shift, vae.scale
        torch.testing.assert_close(lat, (post.mean - shift) * scale, rtol=0, atol=0)
        torch.testing.assert_close(vae.decode_latents(lat), vae.decode(lat / scale + shift), rtol=0, atol=0)
        a = vae.encode_latents(video, generator=torch.Generator().manual_seed(0))
        b = vae.encode_latents(video, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and not torch.equal(a, lat)
    moments = torch.randn(2, 4, 3, 2, 2) * 30
    p = type(post)(moments)
    assert p.logvar.max() <= 20 and p.logvar.min() >= -30
    manual = 0.5 * (p.mean**2 + p.logvar.exp() - 1 - p.logvar).flatten(1).sum(1)
    torch.testing.assert_close(p.kl(), manual)


def test_spatial_tile_blending_is_exact_for_a_local_decoder():
    z = torch.randn(1, 2, 3, 10, 14)

    def local(x):  # pointwise in space: blending must reproduce it exactly
        return torch.repeat_interleave(torch.repeat_interleave(x.tanh(), 8, dim=-1), 8, dim=-2)

    for tile, overlap in ((4, 0.25), (6, 0.5), (16, 0.25)):
        torch.testing.assert_close(decode_spatial_tiles(local, z, tile, overlap, 8), local(z))


def test_tiled_decode_shapes_and_single_tile_is_exact(vaes):
    vae = vaes[8]
    z = torch.randn(1, 8, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = vae.decode(z)
        tiled = vae.decode(z, tile_size=4, tile_overlap=0.5)  # approximate by design
        single = vae.decode(z, tile_size=6)
    assert tiled.shape == full.shape == (1, 3, 9, 48, 48) and torch.isfinite(tiled).all()
    assert torch.equal(single, full)


# ---------------------------------------------------------------- checkpoint adapter


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stride", [8, 4])
def test_adapter_round_trips_are_exact(vaes, stride, tmp_path):
    vae = vaes[stride]
    cfg, state = vae.cfg, vae.state_dict()
    released = adapter.to_open_sora_plan(state, cfg)
    assert "encoder.wavelet_transform_in.gh_v_conv.conv.weight" in released
    assert "decoder.inverse_wavelet_transform_out.hh_v" in released
    if stride == 4:
        assert (
            "encoder.wavelet_transform_l1.aa" in released
            and "decoder.inverse_wavelet_transform_l1.dd" in released
        )
    assert not any(k.endswith(".kernels") for k in released)
    assert _same(adapter.from_open_sora_plan(released, cfg), state)
    assert _same(adapter.to_open_sora_plan(adapter.from_open_sora_plan(released, cfg), cfg), released)

    adapter.save_open_sora_plan_folder(tmp_path / "folder", state, cfg)
    loaded_cfg, loaded = adapter.load_open_sora_plan(tmp_path / "folder")
    assert dataclasses.replace(loaded_cfg, flavor=cfg.flavor) == cfg and _same(loaded, state)

    ema = {k: v if k.endswith(".kernels") else v + 1 for k, v in state.items()}  # Haar filters are fixed
    adapter.save_open_sora_plan_checkpoint(tmp_path / "w.ckpt", state, cfg, ema_state=ema)
    raw = torch.load(tmp_path / "w.ckpt", weights_only=True)
    assert set(raw) == {"state_dict", "ema_state_dict"}
    assert all(k.startswith("module.") for k in raw["ema_state_dict"])
    # As released, the EMA holds trainable parameters only: no Haar filters (loading restores them).
    assert not any("wavelet" in k for k in raw["ema_state_dict"])
    assert any("wavelet" in k for k in raw["state_dict"]["gen_model"])
    assert _same(adapter.load_open_sora_plan(tmp_path / "w.ckpt", cfg)[1], ema)
    assert _same(adapter.load_open_sora_plan(tmp_path / "w.ckpt", cfg, prefer_ema=False)[1], state)


def test_adapter_accepts_v1_3_1_names_and_absent_haar(vaes):
    vae = vaes[4]
    cfg, state = vae.cfg, vae.state_dict()
    released = adapter.to_open_sora_plan(state, cfg)
    old = {k.replace("wavelet_transform_l", "wavelet_tranform_l"): v for k, v in released.items()}
    old = {k: v for k, v in old.items() if "wavelet_transform_in" not in k and "transform_out" not in k}
    assert _same(adapter.from_open_sora_plan(old, cfg), state)


def test_adapter_names_every_bad_key(vaes):
    vae = vaes[8]
    released = adapter.to_open_sora_plan(vae.state_dict(), vae.cfg)
    released.pop("decoder.conv_out.weight")
    released.pop("encoder.wavelet_transform_l2.hh_conv.conv.weight")
    released["decoder.extra.weight"] = torch.zeros(1)
    released["encoder.conv_out.conv.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatch) as err:
        adapter.from_open_sora_plan(released, vae.cfg)
    text = str(err.value)
    for name in (
        "decoder.conv_out.weight",
        "encoder.wavelet_transform_l2.hh_conv.conv.weight",
        "decoder.extra.weight",
        "shape: encoder.conv_out.conv.bias",
    ):
        assert name in text


def test_released_config_translation():
    released = {
        "_class_name": "WFVAEModel",
        "base_channels": 128,
        "connect_res_layer_num": 1,
        "decoder_energy_flow_hidden_size": 128,
        "encoder_energy_flow_hidden_size": 64,
        "latent_dim": 8,
        "norm_type": "layernorm",
        "t_interpolation": "nearest",
        "l1_dowmsample_block": "Downsample",
        "l1_upsample_block": "Upsample",
        "scale": [0.5] * 8,
        "shift": [0.1] * 8,
    }
    cfg = adapter.config_from_open_sora_plan(released)
    assert cfg.temporal_compression == 4 and cfg.scale == [0.5] * 8
    back = adapter.config_from_open_sora_plan(adapter.config_to_open_sora_plan(cfg))
    assert back == cfg
    with pytest.raises(ConfigError, match="match neither"):
        adapter.config_from_open_sora_plan({**released, "l1_upsample_block": "Spatial2xTime2x3DUpsample"})
    with pytest.raises(ConfigError, match="does not know"):
        adapter.config_from_open_sora_plan({**released, "mystery": 1})


def test_chunked_model_matches_in_forward_and_backward():
    vae = tiny_wfvae(seed=9)
    video = random_video(1, 17, 16, 16, seed=2)
    grads = []
    for chunked in (False, True):
        vae.zero_grad()
        post = vae.encode(video, chunked=chunked)
        rec = vae.decode(post.mean, chunked=chunked)
        (rec.square().mean() + post.kl().mean() * 1e-3).backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    assert _max_diff(grads[0], grads[1]) <= 1e-4 * grads[0].abs().max().item()


def test_model_builds_released_geometries_on_meta():
    for name, n_params in (("wfvae_8x8x8_d32", None), ("wfvae_4x8x8_d8", None)):
        with torch.device("meta"):
            vae = WFVAE(WFVAEConfig.from_flavor(name))
        total = sum(p.numel() for p in vae.parameters())
        assert total > 1e7, (name, total, n_params)


class NotATensor:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_folder_with_bin_weights_and_unsafe_pickles(vaes, tmp_path):
    vae = vaes[8]
    cfg, state = vae.cfg, vae.state_dict()
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(adapter.config_to_open_sora_plan(cfg)))
    torch.save(adapter.to_open_sora_plan(state, cfg), folder / "diffusion_pytorch_model.bin")
    assert _same(adapter.load_open_sora_plan(folder)[1], state)

    torch.save({"state_dict": {"gen_model": {}}, "sampler_state": NotATensor()}, tmp_path / "unsafe.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        adapter.load_open_sora_plan(tmp_path / "unsafe.ckpt", cfg)
    with pytest.raises(ConfigError, match="carries no config"):
        adapter.load_open_sora_plan(tmp_path / "unsafe.ckpt")
