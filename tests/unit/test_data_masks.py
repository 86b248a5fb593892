"""I2V masks: kept frames per type, type frequencies, latent compression, condition noise."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from megatron_video.data.i2v_masks import (
    MASK_TYPES,
    I2VMaskConfig,
    I2VMasker,
    add_condition_noise,
    add_inference_condition_noise,
    compress_mask,
    inference_condition,
    kept_frames,
    mask_video,
    normalize_ratios,
    sample_mask_type,
)
from megatron_video.errors import ConfigError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kept_list(mask_type: str, t: int = 9, g=None, **ratios) -> list[int]:
    return kept_frames(mask_type, t, g or gen(), **ratios).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------
# Kept frames and the masked video


def test_fixed_mask_types():
    assert kept_list("t2iv") == []
    assert kept_list("i2v") == [0]
    assert kept_list("transition") == [0, 8]
    assert kept_list("clear") == list(range(9))


def test_continuation_keeps_a_prefix_of_uniform_length():
    g = gen(1)
    counts = Counter()
    draws = 5000
    for _ in range(draws):
        kept = kept_list("continuation", 8, g, min_clear_ratio=0.25, max_clear_ratio=0.75)
        assert kept == list(range(len(kept)))
        counts[len(kept)] += 1
    # k uniform on [floor(8 * 0.25), ceil(8 * 0.75)] = [2, 6]; 5 sigma of a binomial(5000, 0.2) share is 0.028.
    assert sorted(counts) == [2, 3, 4, 5, 6]
    for k in counts:
        assert abs(counts[k] / draws - 0.2) < 0.03


def test_random_temporal_count_bounds_and_spread():
    g = gen(2)
    sizes, hits = Counter(), torch.zeros(9)
    for _ in range(3000):
        kept = kept_frames("random_temporal", 9, g, min_clear_ratio=0.5, max_clear_ratio=0.5)
        sizes[int(kept.sum())] += 1
        hits += kept
    assert set(sizes) == {4, 5}  # floor(4.5), ceil(4.5)
    # Every frame is equally likely to be kept: 4.5 / 9 = 0.5 per frame.
    assert torch.allclose(hits / 3000, torch.full((9,), 0.5), atol=0.04)


def test_mask_video_blackens_generated_frames():
    video = torch.rand(3, 5, 4, 6) * 2 - 1
    kept = torch.tensor([True, False, False, True, False])
    masked, mask = mask_video(video, kept)
    assert masked.shape == video.shape and mask.shape == (1, 5, 4, 6)
    assert torch.equal(masked[:, kept], video[:, kept])
    assert torch.all(masked[:, ~kept] == -1.0)
    assert torch.equal(mask[0, :, 0, 0], torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]))
    assert torch.all(mask == mask[:, :, :1, :1])


def test_masker_is_deterministic_given_generator():
    masker = I2VMasker(I2VMaskConfig())
    video = torch.rand(3, 9, 8, 8) * 2 - 1
    a = [masker(video, gen(7)) for _ in range(2)]
    assert a[0].mask_type == a[1].mask_type and torch.equal(a[0].mask_1THW, a[1].mask_1THW)
    g1, g2 = gen(3), gen(3)
    seq1 = [masker(video, g1).mask_1THW for _ in range(20)]
    seq2 = [masker(video, g2).mask_1THW for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(seq1, seq2))


# ---------------------------------------------------------------------------------------------
# Frequencies


def test_video_type_frequencies_match_config():
    """Default weights 1/8/8/2/0/1 -> 5/40/40/10/0/5 %. 10000 draws: the largest binomial standard
    deviation is sqrt(0.24 / 10000) = 0.0049, so a 0.02 tolerance is 4 sigma."""
    cfg = I2VMaskConfig()
    expected = dict(t2iv=0.05, i2v=0.40, transition=0.40, continuation=0.10, clear=0.0, random_temporal=0.05)
    assert normalize_ratios(cfg.video_mask_ratios) == pytest.approx(expected)
    g, draws = gen(11), 10000
    counts = Counter(sample_mask_type(cfg.video_mask_ratios, g) for _ in range(draws))
    assert counts["clear"] == 0
    for name, p in expected.items():
        assert abs(counts[name] / draws - p) < 0.02, (name, counts[name] / draws, p)


def test_masker_end_to_end_frequencies():
    """Through I2VMasker on a tiny clip, with its kept frames checked; 2000 draws, tolerance 0.05
    (4.5 sigma at p = 0.4)."""
    masker = I2VMasker(I2VMaskConfig())
    video, g, draws = torch.zeros(1, 5, 1, 1), gen(12), 2000
    counts = Counter()
    for _ in range(draws):
        cond = masker(video, g)
        counts[cond.mask_type] += 1
        kept = (cond.mask_1THW[0, :, 0, 0] == 0).nonzero().flatten().tolist()
        if cond.mask_type in ("t2iv", "i2v", "transition"):
            assert kept == {"t2iv": [], "i2v": [0], "transition": [0, 4]}[cond.mask_type]
    for name, p in dict(
        t2iv=0.05, i2v=0.40, transition=0.40, continuation=0.10, random_temporal=0.05
    ).items():
        assert abs(counts[name] / draws - p) < 0.05, (name, counts[name] / draws)


def test_all_zero_weights_are_uniform_and_images_use_t2iv_or_clear():
    assert normalize_ratios(dict.fromkeys(MASK_TYPES, 0.0)) == pytest.approx(dict.fromkeys(MASK_TYPES, 1 / 6))
    masker = I2VMasker(I2VMaskConfig(image_mask_ratios={"t2iv": 0.0, "clear": 0.0}))
    g, draws = gen(5), 2000
    counts = Counter(masker(torch.zeros(3, 1, 2, 2), g).mask_type for _ in range(draws))
    assert set(counts) == {"t2iv", "clear"} and abs(counts["clear"] / draws - 0.5) < 0.05  # 4.5 sigma
    with pytest.raises(ValueError, match="not allowed for 1 frame"):
        masker(torch.zeros(3, 1, 2, 2), g, mask_type="i2v")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(video_mask_ratios={"i2v": 1.0, "outpaint": 1.0}), "mask types \\['outpaint'\\]"),
        (dict(image_mask_ratios={"i2v": 1.0}), "image_mask_ratios has mask types \\['i2v'\\]"),
        (dict(video_mask_ratios={"i2v": -1.0}), "must be >= 0"),
        (dict(min_clear_ratio=0.6, max_clear_ratio=0.4), "exceeds"),
        (dict(max_clear_ratio=1.5), "must be in \\[0, 1\\]"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        I2VMaskConfig(**kwargs).validate()


# ---------------------------------------------------------------------------------------------
# Compression to the latent grid


def reference_compress(mask, s_t, s):
    """Hand-written: pad frame 0 to s_t copies when T = 1 mod s_t; bilinear (align_corners=False)
    downsampling by an even factor s averages the 2x2 pixels at s*i + s/2 - 1 and s*i + s/2."""
    b, _, t, h, w = mask.shape
    frames = list(range(t))
    if t % s_t == 1:
        frames = [0] * s_t + frames[1:]
    t_lat = len(frames) // s_t
    out = torch.zeros(b, s_t, t_lat, h // s, w // s, dtype=torch.float64)
    for n in range(b):
        for i in range(t_lat):
            for j in range(s_t):
                f = frames[i * s_t + j]
                for y in range(h // s):
                    for x in range(w // s):
                        ys, xs = (s * y + s // 2 - 1, s * y + s // 2), (s * x + s // 2 - 1, s * x + s // 2)
                        out[n, j, i, y, x] = sum(float(mask[n, 0, f, yy, xx]) for yy in ys for xx in xs) / 4
    return out


@pytest.mark.parametrize(
    "s_t, t, t_lat",
    [(4, 9, 3), (4, 8, 2), (4, 1, 1), (8, 17, 3), (8, 16, 2), (8, 1, 1)],
)
def test_compress_mask_matches_reference(s_t, t, t_lat):
    g = gen(t)
    mask = torch.rand(2, 1, t, 16, 24, generator=g, dtype=torch.float64)
    out = compress_mask(mask, s_t, 8, 8)
    assert out.shape == (2, s_t, t_lat, 2, 3)  # s_t channels: 4 for a 4x VAE, 8 for an 8x VAE
    torch.testing.assert_close(out, reference_compress(mask, s_t, 8), rtol=1e-12, atol=1e-12)


def test_compress_i2v_mask_values():
    """An i2v mask on 9 frames with stride 4: latent step 0 is frame 0 four times (all kept)."""
    masked, mask = mask_video(torch.zeros(3, 9, 16, 16), kept_frames("i2v", 9))
    out = compress_mask(mask[None], 4)
    assert out.shape == (1, 4, 3, 2, 2)
    assert torch.all(out[:, :, 0] == 0) and torch.all(out[:, :, 1:] == 1)
    out8 = compress_mask(mask[None], 8)
    assert out8.shape == (1, 8, 2, 2, 2)  # frame 0 x 8, then frames 1..8
    assert torch.all(out8[:, :, 0] == 0) and torch.all(out8[:, :, 1] == 1)
    _, mask17 = mask_video(torch.zeros(3, 17, 16, 16), kept_frames("transition", 17))
    out17 = compress_mask(mask17[None], 8)
    assert out17[0, :, 0, 0, 0].tolist() == [0.0] * 8  # frame 0 repeated
    assert out17[0, :, 2, 0, 0].tolist() == [1.0] * 7 + [0.0]  # frames 9..16, last kept


def test_compress_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="T = 1 or 0"):
        compress_mask(torch.zeros(1, 1, 7, 8, 8), 4)
    with pytest.raises(ValueError, match="not divisible"):
        compress_mask(torch.zeros(1, 1, 5, 12, 8), 4)


# ---------------------------------------------------------------------------------------------
# Condition noise


def _batch(b=64, t=5):
    video = torch.rand(b, 3, t, 4, 4, generator=gen(21)) * 2 - 1
    kept = torch.zeros(b, t, dtype=torch.bool)
    kept[:, 0] = True
    kept[: b // 2, -1] = True
    mask = (~kept).float().view(b, 1, t, 1, 1).expand(b, 1, t, 4, 4)
    masked = torch.where(kept.view(b, 1, t, 1, 1), video, torch.full_like(video, -1.0))
    return masked, mask, kept


def test_condition_noise_touches_only_kept_frames():
    masked, mask, kept = _batch()
    noisy = add_condition_noise(masked, mask, gen(1), log_mean=-3.0, log_std=0.5, clear_ratio=0.0)
    delta = noisy - masked
    gen_frames = ~kept.view(64, 1, 5, 1, 1).expand_as(delta)
    assert torch.all(delta[gen_frames] == 0)  # frames to generate stay exactly -1
    assert torch.all(noisy[gen_frames] == -1.0)
    assert torch.all(delta[:, :, 0].flatten(1).abs().amax(1) > 0)  # every sample got noise


def test_condition_noise_scale_and_clear_ratio():
    masked, mask, _ = _batch(b=400)
    # log_std = 0: sigma_c = exp(-3) exactly; noise std on frame 0 is sigma_c (48 values per sample).
    noisy = add_condition_noise(masked, mask, gen(2), log_mean=-3.0, log_std=0.0, clear_ratio=0.0)
    std = (noisy - masked)[:, :, 0].std()
    assert abs(std / math.exp(-3.0) - 1) < 0.03
    # clear_ratio 0.25: about a quarter of the samples are left untouched (5 sigma = 0.11 at 400).
    noisy = add_condition_noise(masked, mask, gen(3), clear_ratio=0.25)
    untouched = ((noisy - masked)[:, :, 0].flatten(1).abs().amax(1) == 0).float().mean()
    assert abs(untouched - 0.25) < 0.11
    assert torch.equal(add_condition_noise(masked, mask, gen(4), clear_ratio=1.0), masked)
    # Deterministic given the generator.
    torch.testing.assert_close(
        add_condition_noise(masked, mask, gen(5)), add_condition_noise(masked, mask, gen(5))
    )
    # The masker applies the configured noise only when asked to.
    assert I2VMasker(I2VMaskConfig()).add_noise(masked, mask, gen(6)) is masked
    noisy = I2VMasker(I2VMaskConfig(condition_noise=True, noise_clear_ratio=0.0)).add_noise(
        masked, mask, gen(6)
    )
    torch.testing.assert_close(noisy, add_condition_noise(masked, mask, gen(6), clear_ratio=0.0))


def test_inference_condition_and_noise():
    frames = torch.rand(2, 3, 4, 4) * 2 - 1
    cond = inference_condition(frames, 9)
    assert cond.mask_type == "transition"
    assert torch.equal(cond.masked_video_CTHW[:, 0], frames[0]) and torch.equal(
        cond.masked_video_CTHW[:, 8], frames[1]
    )
    assert torch.all(cond.masked_video_CTHW[:, 1:8] == -1)
    assert cond.mask_1THW[0, :, 0, 0].tolist() == [0.0] + [1.0] * 7 + [0.0]
    assert inference_condition(frames[:1], 9).mask_type == "i2v"
    assert inference_condition(torch.rand(3, 3, 4, 4), 9).mask_type == "continuation"
    odd = inference_condition(frames, 9, indices=[2, -3])
    assert odd.mask_type == "random_temporal" and (
        odd.mask_1THW[0, :, 0, 0] == 0
    ).nonzero().flatten().tolist() == [2, 6]
    with pytest.raises(ValueError, match="distinct frames"):
        inference_condition(frames, 9, indices=[0, 9])

    masked, mask = cond.masked_video_CTHW[None], cond.mask_1THW[None]
    assert add_inference_condition_noise(masked, mask, 0.0) is masked
    noisy = add_inference_condition_noise(masked, mask, 0.5, gen(6))
    delta = noisy - masked
    assert torch.all(delta[:, :, 1:8] == 0)
    assert 0.3 < delta[:, :, [0, 8]].std() < 0.7  # sigma_c = 0.5 * exp(N(0, 0.01)), 96 values
    with pytest.raises(ValueError, match="strength"):
        add_inference_condition_noise(masked, mask, 1.5)
