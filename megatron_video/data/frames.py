"""Which frames of a clip become a sample: the frame-index rules of Open-Sora-Plan (reference 6.2).

For a clip of `n` frames at `fps` starting at frame `start` (its `cut`), in this order:

1. too long: skip when n > too_long_factor x num_frames x fps / train_fps x speed_factor;
2. resample: interval = 1 if |fps - train_fps| < 0.1 else fps / train_fps, indices =
   int(arange(start, start + n, interval)); with `drop_low_fps` a clip with interval < 1 is skipped (v1.5);
3. short: when fewer than num_frames indices remain, skip with probability drop_short_ratio;
4. speed-up: when longer than num_frames and speed_factor > 1, keep int(len / s) indices spread
   uniformly (linspace), s = min(speed_factor, len / num_frames);
5. temporal crop: when longer than num_frames, a random window of num_frames with begin in
   [0, max(0, len - num_frames - 1)] (the reference's range: the last possible begin is never drawn);
6. snap: truncate to the largest y <= len with (y - 1) % vae_stride_t == 0, ((y - 1) / vae_stride_t + 1)
   % context_parallel == 0 and y >= min_num_frames (`find_closest_y`); skip when none exists.

Deviation from the reference, on purpose: it applies the speed-up only at load time, so the
length fixed at build time can disagree with the loaded one; here step 4 runs at build time too
(`plan_video_frames`), and the loaded window is drawn from the same candidates (`FramePlan.draw`).
All randomness comes from the generator passed in (`random.Random` or `numpy.random.Generator`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from megatron_video.data.config import DataConfig, SampleGeometry, snap_num_frames

Rng = random.Random | np.random.Generator
"""Either kind of seeded generator; every random choice of the data pipeline takes one."""


@dataclass(frozen=True)
class Skipped:
    """A sample left out at build time, and why (a short key used in the summary counts)."""

    reason: str


TOO_LONG = Skipped("too_long")
FPS_TOO_LOW = Skipped("fps_too_low")
TOO_SHORT = Skipped("too_short")
"""Shorter than num_frames and drawn for dropping (drop_short_ratio)."""
TOO_SHORT_FOR_VAE = Skipped("too_short_for_vae")
"""No length >= min_num_frames the VAE stride and CP size accept fits in the clip."""


def rand_int(rng: Rng, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both ends included)."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    return rng.randint(low, high)


def rand_float(rng: Rng) -> float:
    """Uniform float in [0, 1)."""
    return float(rng.random())


def frame_interval(fps: float, train_fps: float) -> float:
    """Source frames per training frame: 1 when fps is within 0.1 of train_fps, else fps / train_fps."""
    return 1.0 if abs(fps - train_fps) < 0.1 else fps / train_fps


def resample_indices(start: int, num_frames: int, interval: float) -> np.ndarray:
    """Frame indices int(start + k x interval) inside [start, start + num_frames), int64."""
    indices = np.arange(start, start + num_frames, interval).astype(np.int64)
    return indices[indices < start + num_frames]


def speed_up(indices: np.ndarray, speed_factor: float, num_frames: int) -> np.ndarray:
    """Uniformly subsample indices longer than num_frames by min(speed_factor, len / num_frames).

    The result keeps at least num_frames indices (the float division is guarded against rounding).
    """
    n = len(indices)
    if speed_factor <= 1 or n <= num_frames:
        return indices
    factor = min(speed_factor, n / num_frames)
    count = max(num_frames, math.floor(n / factor + 1e-9))
    return indices[np.linspace(0, n - 1, count, dtype=np.int64)]


def temporal_crop_start(total: int, size: int, rng: Rng) -> int:
    """Begin of a random window of `size` in `total` frames: uniform in [0, max(0, total - size - 1)]."""
    return rand_int(rng, 0, max(0, total - size - 1))


@dataclass(frozen=True)
class FramePlan:
    """The frames a video sample will have: candidate source indices and the sample length.

    candidates: source frame indices after resampling and speed-up (absolute, `cut` included);
    window: the temporal-crop size (min(len(candidates), num_frames));
    length: frames in the sample, <= window, a length the VAE and CP accept.
    """

    candidates: np.ndarray
    window: int
    length: int

    def draw(self, rng: Rng) -> list[int]:
        """The sample's source frame indices: a random window (step 5), truncated to `length`."""
        begin = temporal_crop_start(len(self.candidates), self.window, rng)
        return self.candidates[begin : begin + self.length].tolist()

    def first(self) -> list[int]:
        """The indices of the window that starts at the first candidate (no randomness)."""
        return self.candidates[: self.length].tolist()


def plan_video_frames(
    clip_frames: int, fps: float | None, start: int, cfg: DataConfig, geometry: SampleGeometry, rng: Rng
) -> FramePlan | Skipped:
    """Steps 1-6 for a clip of `clip_frames` frames starting at source frame `start`.

    `fps` None means unknown and uses `cfg.default_fps`. Draws from `rng` only for a short clip
    (step 3), so a dataset built twice with the same seed plans the same samples.
    """
    fps = cfg.default_fps if fps is None else fps
    target = cfg.num_frames
    if clip_frames > cfg.too_long_factor * (target * fps / cfg.train_fps * cfg.speed_factor):
        return TOO_LONG
    interval = frame_interval(fps, cfg.train_fps)
    if interval < 1.0 and cfg.drop_low_fps:
        return FPS_TOO_LOW
    indices = resample_indices(start, clip_frames, interval)
    if len(indices) < target and rand_float(rng) < cfg.drop_short_ratio:
        return TOO_SHORT
    indices = speed_up(indices, cfg.speed_factor, target)
    window = min(len(indices), target)
    length = snap_num_frames(window, geometry.vae_stride_t, geometry.context_parallel, cfg.min_num_frames)
    if length is None:
        return TOO_SHORT_FOR_VAE
    return FramePlan(candidates=indices, window=window, length=length)
