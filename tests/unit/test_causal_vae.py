"""CausalVideoVAE v1.2: released layout, shapes, latent scaling, frame counts, adapter round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_video.errors import CheckpointMismatch, ConfigError
from megatron_video.models.causal_vae import state_dict_adapter as adapter
from megatron_video.models.causal_vae.config import CausalVAEConfig
from megatron_video.models.causal_vae.model import CausalVAE
from megatron_video.testing.vae import random_video, tiny_causal_vae


@pytest.fixture(autouse=True)
def one_thread():
    """Small convs run far faster on one thread (no OpenMP barriers on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae():
    return tiny_causal_vae(seed=1, hidden_size_mult=[1, 2, 2, 2])


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_released_layout_and_size():
    cfg = CausalVAEConfig.from_flavor("causal_vae_4x8x8_d4")
    assert (cfg.temporal_stride, cfg.spatial_stride, cfg.latent_channels) == (4, 8, 4)
    shapes = adapter.expected_shapes(cfg)
    for key, shape in {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.1.downsample.conv.conv.weight": (256, 256, 3, 3, 3),
        "encoder.down.2.block.0.conv1.conv.weight": (512, 256, 3, 3, 3),
        "encoder.down.2.downsample.conv.conv.weight": (512, 512, 3, 3, 3),
        "encoder.mid.attn_1.q.conv.weight": (512, 512, 1, 1, 1),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.conv.weight": (8, 512, 3, 3, 3),
        "quant_conv.conv.weight": (8, 8, 1, 1, 1),
        "post_quant_conv.conv.weight": (4, 4, 1, 1, 1),
        "decoder.conv_in.conv.weight": (512, 4, 3, 3, 3),
        "decoder.up.3.block.2.conv2.conv.weight": (512, 512, 3, 3, 3),
        "decoder.up.3.upsample.conv.conv.weight": (512, 512, 3, 3, 3),
        "decoder.up.2.upsample.conv.conv.weight": (512, 512, 3, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.conv.weight": (256, 512, 1, 1, 1),
        "decoder.up.1.upsample.conv.conv.weight": (256, 256, 1, 3, 3),
        "decoder.up.0.block.2.norm2.weight": (128,),
        "decoder.conv_out.conv.weight": (3, 128, 3, 3, 3),
    }.items():
        assert shapes[key] == shape, key
    assert not any(k.startswith("decoder.up.0.upsample") or "attn." in k for k in shapes)


def test_shapes_and_latent_scaling(vae):
    video = random_video(2, 9, 16, 24)
    with torch.no_grad():
        post = vae.encode(video)
        assert post.mean.shape == (2, 4, 3, 2, 3)
        assert vae.decode(post.mean).shape == (2, 3, 9, 16, 24)
        lat = vae.encode_latents(video, sample=False)
        torch.testing.assert_close(lat, post.mean * 0.18215, rtol=0, atol=0)
        torch.testing.assert_close(vae.decode_latents(lat), vae.decode(lat / 0.18215), rtol=0, atol=0)
        image = vae.encode(video[:, :, :1])
        assert image.mean.shape == (2, 4, 1, 2, 3) and vae.decode(image.mean).shape == (2, 3, 1, 16, 24)
        rec, posterior = vae(video, sample=True, generator=torch.Generator().manual_seed(0))
        assert rec.shape == video.shape and posterior.kl().shape == (2,)


def test_frame_count_and_size_errors(vae):
    assert vae.valid_num_frames(17) and not vae.valid_num_frames(16)
    with pytest.raises(ValueError, match=r"1 \+ k \* 4 frames \(1, 5, 9, 13, 17, \.\.\.\); got 7.*5 and 9"):
        vae.encode(torch.zeros(1, 3, 7, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 16, 20))
    with pytest.raises(ValueError, match=r"latents \[B, 4"):
        vae.decode(torch.zeros(1, 8, 2, 2, 2))


def test_single_tile_decode_is_exact(vae):
    z = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tile_size=3), vae.decode(z))
        assert vae.decode(z, tile_size=2, tile_overlap=0.5).shape == (1, 3, 5, 24, 24)


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="multiples of 32"):
        CausalVAEConfig.from_flavor("tiny", hidden_size=16).validate()
    with pytest.raises(ConfigError, match="mirror"):
        CausalVAEConfig.from_flavor(
            "tiny", decoder_spatial_upsample=["", "", "", "SpatialUpsample2x"]
        ).validate()
    with pytest.raises(ConfigError, match="unsupported entries"):
        CausalVAEConfig.from_flavor("tiny", encoder_resnet_blocks=["ResnetBlock1D"] * 4).validate()


def test_adapter_round_trips_are_exact(vae, tmp_path):
    cfg, state = vae.cfg, vae.state_dict()
    released = adapter.to_open_sora_plan(state, cfg)
    assert _same(adapter.from_open_sora_plan(released, cfg), state)
    adapter.save_open_sora_plan_folder(tmp_path / "folder", state, cfg)
    loaded_cfg, loaded = adapter.load_open_sora_plan(tmp_path / "folder")
    assert dataclasses.replace(loaded_cfg, flavor=cfg.flavor) == cfg and _same(loaded, state)
    ema = {k: v * 2 for k, v in state.items()}
    adapter.save_open_sora_plan_checkpoint(tmp_path / "v.ckpt", state, cfg, ema_state=ema)
    assert _same(adapter.load_open_sora_plan(tmp_path / "v.ckpt", cfg)[1], ema)
    assert _same(adapter.load_open_sora_plan(tmp_path / "v.ckpt", cfg, prefer_ema=False)[1], state)
    model = CausalVAE(cfg)
    model.load_state_dict(loaded)
    assert _same(model.state_dict(), state)


def test_adapter_names_every_bad_key(vae):
    released = adapter.to_open_sora_plan(vae.state_dict(), vae.cfg)
    released.pop("quant_conv.conv.weight")
    released["loss.logvar"] = torch.zeros(())
    released["decoder.conv_in.conv.bias"] = torch.zeros(2)
    with pytest.raises(CheckpointMismatch) as err:
        adapter.from_open_sora_plan(released, vae.cfg)
    for name in (
        "missing: quant_conv.conv.weight",
        "unexpected: loss.logvar",
        "shape: decoder.conv_in.conv.bias",
    ):
        assert name in str(err.value)


def test_released_config_translation():
    released = {
        "_class_name": "CausalVAEModel",
        "attn_resolutions": [],
        "decoder_attention": "AttnBlock3DFix",
        "encoder_attention": "AttnBlock3DFix",
        "encoder_conv_in": "Conv2d",
        "encoder_temporal_downsample": ["", "", "", ""],
        "decoder_temporal_upsample": ["", "", "", ""],
        "hidden_size": 128,
        "loss_type": "opensora.models.ae.videobase.losses.LPIPSWithDiscriminator3D",
        "z_channels": 4,
    }
    assert adapter.config_from_open_sora_plan(released) == dataclasses.replace(
        CausalVAEConfig(), flavor="custom"
    )
    back = adapter.config_from_open_sora_plan(adapter.config_to_open_sora_plan(CausalVAEConfig()))
    assert dataclasses.replace(back, flavor="causal_vae_4x8x8_d4") == CausalVAEConfig()
    with pytest.raises(ConfigError, match="AttnBlock3D'"):
        adapter.config_from_open_sora_plan({**released, "encoder_attention": "AttnBlock3D"})
    with pytest.raises(ConfigError, match="encoder_temporal_downsample"):
        adapter.config_from_open_sora_plan(
            {**released, "encoder_temporal_downsample": ["", "TimeDownsample2x", "", ""]}
        )
