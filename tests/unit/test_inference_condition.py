"""The I2V inputs of sampling: condition frames -> masked-video latents and compressed mask."""

from __future__ import annotations

import pytest
import torch

from megatron_video.inference.pipeline import encode_condition
from megatron_video.testing.vae import tiny_wfvae


def _frames(k: int, size=(16, 16), seed=0) -> torch.Tensor:
    return torch.rand(k, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_masks_for_i2v_transition_and_continuation():
    vae = tiny_wfvae().eval()
    for k, kept in [(1, [0]), (2, [0, 8]), (3, [0, 1, 2])]:
        out = encode_condition(vae, [_frames(k)], num_frames=9, size=(16, 16))
        mask = out["inpaint_mask_BMTHW"]
        assert mask.shape == (1, vae.temporal_stride, 2, 16 // vae.spatial_stride, 16 // vae.spatial_stride)
        # Pixel frame f sits at latent step (f + stride - 1) // stride, channel (f + stride - 1) % stride.
        for f in range(9):
            t, m = divmod(f + vae.temporal_stride - 1, vae.temporal_stride)
            expected = 0.0 if f in kept else 1.0
            assert torch.all(mask[0, m, t] == expected), (k, f)


def test_wrong_size_is_named():
    with pytest.raises(ValueError, match=r"sampled at \(32, 32\)"):
        encode_condition(tiny_wfvae().eval(), [_frames(1)], num_frames=9, size=(32, 32))


def test_condition_noise_is_seeded_per_prompt():
    vae = tiny_wfvae().eval()
    clean = encode_condition(vae, [_frames(1)], 9)["masked_latents_BCTHW"]
    a = encode_condition(vae, [_frames(1)], 9, noise_strength=0.1, seeds=[5])["masked_latents_BCTHW"]
    b = encode_condition(vae, [_frames(1)], 9, noise_strength=0.1, seeds=[5])["masked_latents_BCTHW"]
    c = encode_condition(vae, [_frames(1)], 9, noise_strength=0.1, seeds=[6])["masked_latents_BCTHW"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - clean).abs().max() > 1e-3
