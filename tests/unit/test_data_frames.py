"""Frame-index rules (reference 6.2) against hand-computed cases."""

from __future__ import annotations

import random

import numpy as np
import pytest

from megatron_video.data.config import DataConfig, SampleGeometry, snap_num_frames, valid_num_frames
from megatron_video.data.frames import (
    FPS_TOO_LOW,
    TOO_LONG,
    TOO_SHORT,
    TOO_SHORT_FOR_VAE,
    FramePlan,
    frame_interval,
    plan_video_frames,
    resample_indices,
    speed_up,
    temporal_crop_start,
)


def cfg(**overrides) -> DataConfig:
    base = dict(num_frames=33, min_num_frames=29, train_fps=24.0)
    return DataConfig(**{**base, **overrides})


STRIDE_8 = SampleGeometry(vae_stride_t=8, context_parallel=1)


def test_snap_stride_8_gives_33_41_49_57():
    assert [snap_num_frames(x, 8) for x in (28, 32, 33, 40, 41, 48, 49, 56, 57, 64, 65)] == [
        None,
        None,
        33,
        33,
        41,
        41,
        49,
        49,
        57,
        57,
        65,
    ]
    assert valid_num_frames(8, 1, 29, 105) == [33, 41, 49, 57, 65, 73, 81, 89, 97, 105]


def test_snap_stride_8_cp_4_gives_57_89():
    assert valid_num_frames(8, 4, 29, 105) == [57, 89]
    assert snap_num_frames(56, 8, 4) is None  # 25 would fit stride and CP but is below the minimum 29
    assert snap_num_frames(57, 8, 4) == 57
    assert snap_num_frames(88, 8, 4) == 57
    assert snap_num_frames(100, 8, 4) == 89
    assert snap_num_frames(121, 8, 4) == 121  # the released 121 frames = 16 latents, 4 per CP rank


def test_snap_matches_reference_tables():
    # The tables in the reference's find_closest_y comment.
    assert valid_num_frames(8, 2, 29, 105) == [41, 57, 73, 89, 105]
    assert valid_num_frames(8, 8, 29, 105) == [57]
    assert valid_num_frames(4, 8, 29, 130) == [29, 61, 93, 125]
    assert valid_num_frames(4, 4, 29, 80) == [29, 45, 61, 77]
    for stride, cp in ((8, 1), (8, 2), (8, 4), (4, 4), (4, 8)):
        allowed = set(valid_num_frames(stride, cp, 29, 300))
        for x in range(300):
            y = snap_num_frames(x, stride, cp)
            below = [v for v in allowed if v <= x]
            assert y == (max(below) if below else None)


def test_frame_interval_and_resampling():
    assert frame_interval(24.05, 24) == 1.0  # within 0.1: no resampling
    assert frame_interval(30, 24) == 1.25
    assert frame_interval(12, 24) == 0.5
    # int(0, 1.25, 2.5, 3.75, 5, 6.25, 7.5, 8.75)
    assert resample_indices(0, 10, 1.25).tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert resample_indices(100, 10, 1.25).tolist() == [100, 101, 102, 103, 105, 106, 107, 108]
    assert resample_indices(0, 4, 0.5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_too_long_threshold():
    # 5 x 33 x 30 / 24 x 1 = 206.25 frames at 30 fps
    rng = random.Random(0)
    assert plan_video_frames(207, 30.0, 0, cfg(), STRIDE_8, rng) == TOO_LONG
    assert isinstance(plan_video_frames(206, 30.0, 0, cfg(), STRIDE_8, rng), FramePlan)
    # speed_factor 2 doubles the limit
    assert isinstance(plan_video_frames(400, 30.0, 0, cfg(speed_factor=2.0), STRIDE_8, rng), FramePlan)


def test_low_fps_dropped_as_v15_or_kept_as_v13():
    rng = random.Random(0)
    assert plan_video_frames(60, 20.0, 0, cfg(), STRIDE_8, rng) == FPS_TOO_LOW
    plan = plan_video_frames(60, 12.0, 0, cfg(drop_low_fps=False), STRIDE_8, rng)
    assert plan.candidates[:6].tolist() == [0, 0, 1, 1, 2, 2]  # frames repeat at interval 0.5
    assert plan.length == 33


def test_fps_resampling_plan_and_window():
    plan = plan_video_frames(60, 30.0, 0, cfg(), STRIDE_8, random.Random(0))
    assert len(plan.candidates) == 48  # arange(0, 60, 1.25)
    assert (plan.window, plan.length) == (33, 33)
    assert plan.candidates[:5].tolist() == [0, 1, 2, 3, 5]


def test_missing_fps_uses_default():
    plan = plan_video_frames(60, None, 0, cfg(default_fps=30.0), STRIDE_8, random.Random(0))
    assert len(plan.candidates) == 48


def test_drop_short_ratio():
    rng = random.Random(0)
    assert plan_video_frames(40, 24.0, 0, cfg(num_frames=49), STRIDE_8, rng) == TOO_SHORT
    plan = plan_video_frames(40, 24.0, 0, cfg(num_frames=49, drop_short_ratio=0.0), STRIDE_8, rng)
    assert (plan.window, plan.length) == (40, 33)  # dynamic duration: snapped down
    assert plan_video_frames(20, 24.0, 0, cfg(drop_short_ratio=0.0), STRIDE_8, rng) == TOO_SHORT_FOR_VAE
    # a ratio in between drops about that share, deterministically for a seeded generator
    outcomes = [
        plan_video_frames(40, 24.0, 0, cfg(num_frames=49, drop_short_ratio=0.3), STRIDE_8, random.Random(s))
        for s in range(400)
    ]
    dropped = sum(o == TOO_SHORT for o in outcomes)
    assert 80 < dropped < 160
    again = [
        plan_video_frames(40, 24.0, 0, cfg(num_frames=49, drop_short_ratio=0.3), STRIDE_8, random.Random(s))
        for s in range(400)
    ]
    assert [o == TOO_SHORT for o in outcomes] == [o == TOO_SHORT for o in again]


def test_speed_factor():
    idx = np.arange(100)
    fast = speed_up(idx, 2.0, 33)
    assert len(fast) == 50  # min(2, 100 / 33) = 2
    assert fast[:4].tolist() == [0, 2, 4, 6] and fast[-1] == 99
    assert len(speed_up(idx, 4.0, 33)) == 33  # capped at len / num_frames; never below num_frames
    assert len(speed_up(np.arange(40), 4.0, 33)) == 33
    assert speed_up(np.arange(30), 4.0, 33).tolist() == list(range(30))  # shorter than target: unchanged
    plan = plan_video_frames(100, 24.0, 0, cfg(speed_factor=2.0), STRIDE_8, random.Random(0))
    assert len(plan.candidates) == 50 and plan.length == 33


def test_temporal_crop_range_and_cut_offset():
    starts = {temporal_crop_start(48, 33, random.Random(s)) for s in range(500)}
    assert starts == set(range(15))  # [0, 48 - 33 - 1]: the last possible start is never drawn
    assert temporal_crop_start(33, 33, random.Random(0)) == 0
    assert temporal_crop_start(20, 33, np.random.default_rng(0)) == 0
    plan = plan_video_frames(60, 24.0, 100, cfg(), STRIDE_8, random.Random(0))
    drawn = plan.draw(np.random.default_rng(3))
    assert len(drawn) == 33 and drawn == list(range(drawn[0], drawn[0] + 33))
    assert 100 <= drawn[0] <= 100 + 60 - 33 - 1
    assert plan.first() == list(range(100, 133))


def test_draw_is_deterministic_per_generator():
    plan = plan_video_frames(120, 24.0, 0, cfg(), STRIDE_8, random.Random(0))
    a = plan.draw(np.random.default_rng([1, 2, 3]))
    b = plan.draw(np.random.default_rng([1, 2, 3]))
    c = [plan.draw(np.random.default_rng([1, 2, s]))[0] for s in range(50)]
    assert a == b and len(set(c)) > 5


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_planned_lengths_always_fit_vae_and_cp(cp):
    c, geometry = (
        cfg(num_frames=121, drop_short_ratio=0.0),
        SampleGeometry(vae_stride_t=8, context_parallel=cp),
    )
    rng = np.random.default_rng(0)
    for n in range(1, 400, 7):
        for fps in (12.0, 24.0, 25.0, 30.0, 60.0):
            plan = plan_video_frames(n, fps, 0, c, geometry, rng)
            if isinstance(plan, FramePlan):
                assert (plan.length - 1) % 8 == 0 and ((plan.length - 1) // 8 + 1) % cp == 0
                assert 29 <= plan.length <= min(121, len(plan.candidates))
