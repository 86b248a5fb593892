"""Settings of the video/image data pipeline: where the data is, which frames and sizes a sample gets,
and how samples are bucketed and loaded.

The defaults are the released Open-Sora-Plan v1.5 video stage (`examples/opensoraplan1.5/data.json`
of tag v1.5.0): 121 frames at 24 fps, force-resolution 576x1024, aspect h/w in [0.42, 1.0],
WF-VAE strides 8x8x8. Where v1.3 differs the field says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_video.data.frames import snap_num_frames, valid_num_frames
from megatron_video.errors import ConfigError


@dataclass
class DataConfig:
    """The data pipeline: annotation source, frame rules, resolution rules, bucketing and loading."""

    # ----- source -----------------------------------------------------------------------------
    data_list: str | None = None
    """Path of `data.txt`: one `<media root>,<annotation file>` per line. Relative paths on a line are
    read relative to the folder of `data.txt`. Required to build a dataset (not to validate)."""

    media: Literal["all", "videos", "images"] = "all"
    """Which entries a stage trains on: v1.5's image stages use images, its video stages videos only.
    Context-parallel stages need videos (an image has one latent frame, which cannot be split)."""

    check_files_exist: bool = True
    """Stat every media file while reading annotations and skip (count) the missing ones. Turn off for
    very large lists on slow file systems; a missing file then fails at load time and is replaced."""

    # ----- frames (reference section 6.2) -------------------------------------------------------
    num_frames: int = 121
    """Target pixel frames per video sample; longer clips are cropped in time to this length. Must be
    1 + a multiple of `vae_stride_t` whose latent length divides by `context_parallel` (1 = images)."""

    min_num_frames: int = 29
    """Shortest video a sample may have; shorter clips (after snapping) are skipped."""

    train_fps: float = 24.0
    """Frame rate the model trains at; clips are resampled by an index interval of fps / train_fps."""

    default_fps: float = 24.0
    """Frame rate assumed for an annotation entry that has no `fps` (the reference's default)."""

    drop_low_fps: bool = True
    """Skip clips whose fps is below `train_fps` (interval < 1), as v1.5 does. False keeps them, as
    v1.3 does: the fractional interval then repeats frames."""

    drop_short_ratio: float = 1.0
    """Probability of skipping a clip shorter than `num_frames`: 1.0 = fixed-length training, 0.0 =
    dynamic duration (short clips kept, snapped down to a length the VAE and CP accept)."""

    speed_factor: float = 1.0
    """Speed-up (>= 1): clips longer than `num_frames` are subsampled uniformly by up to this factor
    before the temporal crop, so a sample covers more seconds."""

    too_long_factor: float = 5.0
    """Skip a clip with more than this x num_frames x fps / train_fps x speed_factor frames: it would
    be cropped to too small a part of itself for this stage."""

    use_cut: bool = True
    """Honour an entry's `cut: [start, end]` (frames start at `start`); False starts every clip at 0."""

    use_crop: bool = True
    """Honour an entry's `crop: [x0, x1, y0, y1]` (pixels kept before any resize, e.g. subtitle
    removal); False uses the whole frame."""

    # ----- resolution (reference section 6.3) ---------------------------------------------------
    force_resolution: bool = True
    """Every sample becomes exactly `max_height` x `max_width` (centre crop to that aspect, then
    resize). False uses the Min-Max token strategy bounded by `max_hxw` / `min_hxw`."""

    max_height: int = 576
    """Sample height under `force_resolution`, in pixels."""

    max_width: int = 1024
    """Sample width under `force_resolution`, in pixels."""

    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    """Resize filter (antialiased): bicubic as in the v1.5 data config, bilinear as in v1.3."""

    max_hxw: int | None = 589824
    """Largest pixel area h x w of a sample (Min-Max strategy: larger sources are scaled down keeping
    their aspect). Required when `force_resolution` is false; 576 x 1024 in the release."""

    min_hxw: int | None = 589824
    """Smallest pixel area: smaller sources (and, under force resolution, sources too small for the
    crop their aspect needs) are skipped. None disables the check (v1.3 defaults to max_hxw / 4)."""

    hw_stride: int = 16
    """Min-Max strategy: sample height and width are centre-cropped to multiples of this (VAE spatial
    stride x patch size; 16 in v1.5, 32 in the v1.3 scripts)."""

    force_5_ratio: bool = False
    """Min-Max strategy: snap every sample to the nearest of 9:16, 3:4, 1:1, 4:3, 16:9 (v1.5 image
    stages), so far fewer buckets exist."""

    min_h_div_w_ratio: float = 0.42
    """Skip sources whose aspect h / w is below this (0.42 admits 9:21 letterbox, not wider)."""

    max_h_div_w_ratio: float = 1.0
    """Skip sources whose aspect h / w is above this (1.0 = no portrait sources, as released)."""

    # ----- model geometry the data must fit -----------------------------------------------------
    vae_stride_t: int = 8
    """VAE temporal compression; video lengths are 1 + a multiple of it (same value as
    `shape.vae_stride_t`)."""

    vae_stride_hw: int = 8
    """VAE spatial compression; the collate builds the latent mask at H / stride x W / stride (same
    value as `shape.vae_stride_hw`)."""

    context_parallel: int = 1
    """Context-parallel size: video lengths are snapped so latent frames divide by it (same value as
    `parallel.context_parallel`)."""

    # ----- batching and loading ----------------------------------------------------------------
    batch_size: int = 1
    """Micro-batch per data-parallel rank (one shape per micro-batch)."""

    seed: int = 42
    """Seed of every data-side random choice: drop-short draws, temporal crops, the sampler's order and
    replacements of unreadable samples. Equal on all ranks."""

    group_data: bool = True
    """Order the epoch by bucket (most frequent first, shuffled inside) before cutting megabatches, so
    almost every micro-batch is naturally one shape. False shuffles globally; the sampler still makes
    every micro-batch one shape by replacing minority items, at the cost of many more replacements."""

    bucket_drop_threshold: float = 4.0
    """Buckets (frames x height x width) with fewer than this x global batch samples are dropped by the
    sampler (4 in the reference); 0 keeps every bucket."""

    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""

    decode_timeout_s: float = 60.0
    """Time limit for loading one sample (decode + transform), in seconds (60 in v1.3, 600 in v1.5). A
    sample over it is replaced like an unreadable one."""

    max_load_attempts: int = 20
    """Replacements tried (same bucket) after an unreadable sample before the loader raises."""

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix; reads no file."""
        for name in ("num_frames", "min_num_frames", "max_height", "max_width", "hw_stride", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vae_stride_t", "vae_stride_hw", "context_parallel", "max_load_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_fps", "default_fps", "too_long_factor", "decode_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"data.{name} must be > 0, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.drop_short_ratio <= 1.0:
            raise ConfigError(f"data.drop_short_ratio must be in [0, 1], got {self.drop_short_ratio}")
        if self.speed_factor < 1.0:
            raise ConfigError(f"data.speed_factor must be >= 1 (1 = no speed-up), got {self.speed_factor}")
        if self.bucket_drop_threshold < 0:
            raise ConfigError(
                f"data.bucket_drop_threshold must be >= 0 (0 keeps every bucket), got {self.bucket_drop_threshold}"
            )
        if self.min_num_frames > self.num_frames:
            raise ConfigError(
                f"data.min_num_frames={self.min_num_frames} exceeds data.num_frames={self.num_frames}; "
                f"lower min_num_frames (image stages with num_frames=1 need min_num_frames=1)"
            )
        snapped = snap_num_frames(
            self.num_frames, self.vae_stride_t, self.context_parallel, self.min_num_frames
        )
        if self.num_frames > 1 and snapped != self.num_frames:
            valid = valid_num_frames(
                self.vae_stride_t, self.context_parallel, self.min_num_frames, max(self.num_frames, 1) * 2
            )[:6]
            raise ConfigError(
                f"data.num_frames={self.num_frames} is not a length the VAE (temporal stride {self.vae_stride_t}) "
                f"and context parallel size {self.context_parallel} accept with min_num_frames="
                f"{self.min_num_frames}; valid lengths: {valid or 'none'} (1 + k x stride with "
                f"(1 + k) divisible by the context-parallel size)"
            )
        if not 0 < self.min_h_div_w_ratio <= self.max_h_div_w_ratio:
            raise ConfigError(
                f"data.min_h_div_w_ratio={self.min_h_div_w_ratio} and data.max_h_div_w_ratio="
                f"{self.max_h_div_w_ratio} must satisfy 0 < min <= max"
            )
        if self.hw_stride % self.vae_stride_hw != 0:
            raise ConfigError(
                f"data.hw_stride={self.hw_stride} must be a multiple of data.vae_stride_hw={self.vae_stride_hw} "
                "(normally VAE stride x patch size)"
            )
        if self.min_hxw is not None and self.min_hxw < 1:
            raise ConfigError(f"data.min_hxw must be >= 1 or null, got {self.min_hxw}")
        if self.force_resolution:
            for name in ("max_height", "max_width"):
                if getattr(self, name) % self.hw_stride != 0:
                    raise ConfigError(
                        f"data.{name}={getattr(self, name)} must be a multiple of data.hw_stride={self.hw_stride} "
                        "under force_resolution"
                    )
        else:
            if self.max_hxw is None or self.max_hxw < self.hw_stride**2:
                raise ConfigError(
                    f"data.max_hxw={self.max_hxw}: the Min-Max strategy (force_resolution=false) needs a "
                    f"largest pixel area of at least hw_stride^2 = {self.hw_stride**2}"
                )
            if self.min_hxw is not None and self.min_hxw > self.max_hxw:
                raise ConfigError(
                    f"data.min_hxw={self.min_hxw} exceeds data.max_hxw={self.max_hxw}; every sample would be skipped"
                )
