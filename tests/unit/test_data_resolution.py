"""Resolution rules (reference 6.3) against hand-computed cases; transforms produce the planned sizes."""

from __future__ import annotations

import pytest
import torch

from megatron_video.data.config import DataConfig
from megatron_video.data.resolution import (
    ASPECT_OUT_OF_RANGE,
    BELOW_STRIDE,
    TOO_SMALL,
    aspect_crop_box,
    center_crop_resize,
    closest_ratio,
    max_area_size,
    plan_resolution,
    size_for_ratio,
    stride_crop_box,
    to_model_input,
)


def minmax(**overrides) -> DataConfig:
    base = dict(
        force_resolution=False,
        max_hxw=236544,
        min_hxw=102400,
        hw_stride=32,
        min_h_div_w_ratio=0.5,
        max_h_div_w_ratio=2.0,
    )
    return DataConfig(**{**base, **overrides})


def test_force_5_ratio_reference_examples():
    # A = 384^2: 1:1 -> 384x384, 9:16 -> 288x512
    assert size_for_ratio(1, 1, 384**2, 16) == (384, 384)
    assert size_for_ratio(9, 16, 384**2, 16) == (288, 512)
    c = minmax(max_hxw=384**2, min_hxw=None, hw_stride=16, force_5_ratio=True)
    assert plan_resolution(384, 384, c) == (384, 384)
    assert plan_resolution(720, 1280, c) == (288, 512)
    assert plan_resolution(1080, 1920, c) == (288, 512)


def test_force_5_ratio_hand_computed():
    assert closest_ratio(500, 700) == (3, 4)  # 0.714 is nearest 0.75
    assert closest_ratio(1000, 1000) == (1, 1)
    assert closest_ratio(400, 1000) == (9, 16)
    assert closest_ratio(1000, 600) == (16, 9)
    c = minmax(max_hxw=384**2, min_hxw=None, hw_stride=16, force_5_ratio=True)
    # k = floor(sqrt(147456 / (12 * 256))) = 6 -> 288x384; cover-resize 500x700 -> 288x403; crop 3:4 -> 288x384
    assert max_area_size(500, 700, 384**2, True, 16) == (288, 403)
    assert stride_crop_box(288, 403, 16, True) == (0, 9, 288, 384)
    assert plan_resolution(500, 700, c) == (288, 384)
    # smaller than the bound: A = 200 x 200, k = floor(sqrt(40000 / 256)) = 12 -> 192x192
    assert plan_resolution(200, 200, c) == (192, 192)


def test_min_max_tokens_hand_computed():
    c = minmax()
    # sqrt(236544 / 921600) = 0.50662: 720x1280 -> 364x648 -> stride 32 -> 352x640
    assert max_area_size(720, 1280, 236544) == (364, 648)
    assert stride_crop_box(364, 648, 32) == (6, 4, 352, 640)
    assert plan_resolution(720, 1280, c) == (352, 640)
    # under the bound: only the stride crop
    assert plan_resolution(330, 400, c) == (320, 384)
    # 300 x 340 = 102000 < min_hxw
    assert plan_resolution(300, 340, c) == TOO_SMALL
    assert plan_resolution(10, 40, minmax(min_hxw=None, min_h_div_w_ratio=0.1)) == BELOW_STRIDE
    assert plan_resolution(200, 700, c) == ASPECT_OUT_OF_RANGE  # 0.29 < 0.5
    assert plan_resolution(700, 300, c) == ASPECT_OUT_OF_RANGE  # 2.33 > 2


def test_force_resolution_rules():
    c = DataConfig()  # released: 576x1024, aspect [0.42, 1.0], min_hxw 576 x 1024
    assert plan_resolution(720, 1280, c) == (576, 1024)
    assert plan_resolution(1080, 1080, c) == (576, 1024)  # aspect 1.0 is inside; needs 589824 x 1.78 pixels
    assert plan_resolution(1000, 900, c) == ASPECT_OUT_OF_RANGE
    assert plan_resolution(400, 1000, c) == ASPECT_OUT_OF_RANGE
    # 480x640: aspect 0.75, needs ceil(589824 x 0.75 / 0.5625) = 786432 pixels, has 307200
    assert plan_resolution(480, 640, c) == TOO_SMALL
    assert plan_resolution(480, 640, DataConfig(min_hxw=None)) == (576, 1024)


def test_aspect_crop_box_matches_reference_comments():
    # hxw 720x1280, target 320x640 -> 640x1280; target 480x640 -> 720x960
    assert aspect_crop_box(720, 1280, 320, 640) == (40, 0, 640, 1280)
    assert aspect_crop_box(720, 1280, 480, 640) == (0, 160, 720, 960)
    assert aspect_crop_box(1080, 1920, 720, 1280) == (0, 0, 1080, 1920)


def test_center_crop_resize_takes_the_centre():
    video = torch.zeros(2, 3, 8, 16)
    video[..., :, 4:12] = 1.0  # the centre square is white, the sides black
    out = center_crop_resize(video, (4, 4), "bilinear")
    assert out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out, torch.ones_like(out))


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(min_hxw=None, max_height=64, max_width=96, interpolation="bilinear"),
        minmax(max_hxw=96 * 96, min_hxw=None, hw_stride=16, min_h_div_w_ratio=0.2, max_h_div_w_ratio=5),
        minmax(
            max_hxw=96 * 96,
            min_hxw=None,
            hw_stride=16,
            force_5_ratio=True,
            min_h_div_w_ratio=0.2,
            max_h_div_w_ratio=5,
        ),
    ],
    ids=["force", "minmax", "five_ratio"],
)
def test_transform_gives_planned_size(cfg):
    torch.manual_seed(0)
    for h, w in [(50, 90), (72, 128), (128, 72), (97, 101), (200, 333), (64, 96), (30, 140)]:
        target = plan_resolution(h, w, cfg)
        if not isinstance(target, tuple):
            continue
        frames = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
        out = to_model_input(frames, target, cfg)
        assert out.shape == (2, 3, *target) and out.dtype == torch.float32
        assert out.min() >= -1 and out.max() <= 1


def test_to_model_input_range_and_mismatch():
    cfg = minmax(max_hxw=64 * 64, min_hxw=None, hw_stride=16)
    frames = torch.tensor([0, 255], dtype=torch.uint8).repeat(1, 3, 32, 8)  # 1x3x32x16, no resize needed
    out = to_model_input(frames, (32, 16), cfg)
    assert out.unique().tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="does not match the file"):
        to_model_input(frames, (48, 16), cfg)


def test_random_crop_places_the_aspect_crop_by_the_rng():
    import numpy as np

    cfg = DataConfig(force_resolution=True, max_height=4, max_width=4, min_hxw=None, random_crop=True)
    # 4 x 12 frame whose columns are numbered: every 4 x 4 crop shows 4 consecutive column numbers.
    frames = torch.arange(12, dtype=torch.uint8).mul(20).expand(1, 3, 4, 12).contiguous()
    lefts = set()
    for seed in range(40):
        out = to_model_input(frames, (4, 4), cfg, np.random.default_rng(seed))
        cols = ((out[0, 0, 0] + 1) / 2 * 255 / 20).round().long().tolist()
        assert cols == list(range(cols[0], cols[0] + 4))
        lefts.add(cols[0])
        again = to_model_input(frames, (4, 4), cfg, np.random.default_rng(seed))
        assert torch.equal(out, again)  # the same draw for the same seed (exact resume)
    assert lefts == set(range(9))  # every position 0..8 occurs
    # Without an rng, or with random_crop off, the crop is centred (columns 4..7).
    for c, rng in (
        (cfg, None),
        (DataConfig(**{**cfg.__dict__, "random_crop": False}), np.random.default_rng(0)),
    ):
        cols = ((to_model_input(frames, (4, 4), c, rng)[0, 0, 0] + 1) / 2 * 255 / 20).round().long().tolist()
        assert cols == [4, 5, 6, 7]


def test_crop_short_side_cuts_the_sample_out_of_resized_frames():
    import numpy as np

    from megatron_video.data.config import SampleGeometry
    from megatron_video.errors import ConfigError

    base = dict(force_resolution=True, max_height=4, max_width=4, min_hxw=None, crop_short_side=6)
    geometry = SampleGeometry(vae_stride_t=1, vae_stride_hw=1)
    frames = torch.arange(9 * 18, dtype=torch.float32).reshape(1, 1, 9, 18).expand(1, 3, 9, 18)
    frames = (frames % 256).to(torch.uint8)
    # The reference: resize the 9 x 18 frame to a short side of 6 (6 x 12), then cut 4 x 4 out of it.
    cfg = DataConfig(**base, interpolation="bilinear")
    resized = center_crop_resize(frames.float() / 255, (6, 12), "bilinear")
    want = resized[..., 1:5, 4:8].clamp(0, 1) * 2 - 1
    assert torch.allclose(to_model_input(frames, (4, 4), cfg), want, atol=1e-6)
    rcfg = DataConfig(**base, interpolation="bilinear", random_crop=True)
    boxes = set()
    for seed in range(300):
        out = to_model_input(frames, (4, 4), rcfg, np.random.default_rng(seed))
        hits = [
            (t, x)
            for t in range(3)
            for x in range(9)
            if torch.allclose(out, resized[..., t : t + 4, x : x + 4].clamp(0, 1) * 2 - 1, atol=1e-6)
        ]
        assert len(hits) == 1
        boxes.add(hits[0])
    assert boxes == {(t, x) for t in range(3) for x in range(9)}
    with pytest.raises(ConfigError, match="smaller than the 4x4 sample"):
        DataConfig(**{**base, "crop_short_side": 3}).validate(geometry)
    with pytest.raises(ConfigError, match="force_resolution=true"):
        DataConfig(**{**base, "force_resolution": False, "max_hxw": 64}).validate(geometry)
