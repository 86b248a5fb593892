"""Settings of the data pipeline (descriptions and validation only; no implementation is imported):
where the data is, which frames and sizes a sample gets, how samples are bucketed and loaded
(`DataConfig`), what the model side imposes on every sample (`SampleGeometry`, derived once from the
experiment config), captions (`TextConfig`), image-to-video masks (`I2VMaskConfig`) and the feature
cache (`FeatureCacheConfig`).

The defaults are the released Open-Sora-Plan v1.5 video stage (`examples/opensoraplan1.5/data.json`
of tag v1.5.0): 121 frames at 24 fps, force-resolution 576x1024, aspect h/w in [0.42, 1.0],
WF-VAE strides 8x8x8. Where v1.3 differs the field says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from megatron_video.errors import ConfigError


@dataclass(frozen=True)
class SampleGeometry:
    """What the model side imposes on every sample. Not a config section: `ExperimentConfig.sample_geometry`
    (or the VAE trainer) derives it from `vae`, `parallel` and `training`, and the data pipeline takes it
    as an argument."""

    vae_stride_t: int = 8
    """VAE temporal compression: video lengths are 1 + a multiple of it."""

    vae_stride_hw: int = 8
    """VAE spatial compression: the collate builds the latent mask at H / stride x W / stride."""

    context_parallel: int = 1
    """Context-parallel size: video lengths are snapped so their latent frames divide by it."""

    micro_batch_size: int = 1
    """Samples per micro-batch on one data-parallel rank (one shape per micro-batch)."""

    def validate(self) -> None:
        """Raise ConfigError for a size below 1."""
        for name in ("vae_stride_t", "vae_stride_hw", "context_parallel", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def snap_num_frames(
    length: int, vae_stride_t: int, context_parallel: int = 1, min_num_frames: int = 29
) -> int | None:
    """Largest y <= length with (y-1) % stride == 0, ((y-1)/stride + 1) % cp == 0, y >= min; else None.

    Stride 8: 33, 41, 49, 57, ... (25 is below the default minimum 29); stride 8 with CP 4: 57, 89, 121.
    """
    for y in range(length, min_num_frames - 1, -1):
        if y >= 1 and (y - 1) % vae_stride_t == 0 and ((y - 1) // vae_stride_t + 1) % context_parallel == 0:
            return y
    return None


def valid_num_frames(
    vae_stride_t: int, context_parallel: int, min_num_frames: int, max_num_frames: int
) -> list[int]:
    """Every length in [min_num_frames, max_num_frames] that `snap_num_frames` can return."""
    step = vae_stride_t * context_parallel
    first = 1 + vae_stride_t * (context_parallel - 1)
    return [y for y in range(first, max_num_frames + 1, step) if y >= min_num_frames]


@dataclass
class DataConfig:
    """The data pipeline: annotation source, frame rules, resolution rules, bucketing and loading."""

    # ----- source -----------------------------------------------------------------------------
    data_list: str | None = None
    """Path of `data.txt`: one `<media root>,<annotation file>` per line. Relative paths on a line are
    read relative to the folder of `data.txt`. Required to build a dataset (not to validate)."""

    index: str | None = None
    """Folder of a sample index built by `tools/build_index.py` from a data list (the way to train on a
    real corpus: read once, memory-mapped by every rank). An alternative to `data_list`: set one."""

    probe_media: Literal["none", "missing", "all"] = "missing"
    """When `data_list` is read at start: "missing" opens the videos whose annotation lacks fps or
    num_frames to read them from the file (and corrects a resolution that contradicts it); "all"
    opens every media file (skipping unreadable ones); "none" opens none (a video without fps then
    uses `default_fps`, counted and warned about). A built index was probed when it was built."""

    media: Literal["all", "videos", "images"] = "all"
    """Which entries a stage trains on: v1.5's image stages use images, its video stages videos only.
    Context-parallel stages need videos (an image has one latent frame, which cannot be split)."""

    validation_fraction: float = 0.0
    """Fraction of the entries of `data_list` held out of training for the validation loss
    (`training.validation`). Which entries are held out depends only on each media path and `seed`,
    so the split is the same in every run, layout and resume; at least one entry is held out when
    the fraction is > 0. 0 holds out nothing."""

    validation_data_list: str | None = None
    """A separate data.txt whose entries are the validation samples (training keeps all of
    `data_list`). Exclusive with `validation_fraction`."""

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
    """Frame rate assumed for an annotation entry that has no `fps` and whose file was not probed (the
    reference's default); such entries are counted and warned about at start."""

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

    random_crop: bool = False
    """Under `force_resolution`, place the aspect crop at a random position (drawn from the sample's
    seed, epoch and index, so a resumed run draws the same) instead of the centre: a spatial
    augmentation for training VAEs on few clips. Evaluation and sampling always use the centre."""

    crop_short_side: int | None = None
    """Under `force_resolution`: resize the frames so their short side is this many pixels (aspect
    kept), then cut the `max_height` x `max_width` sample out of them (centred, or placed at random
    under `random_crop`), instead of resizing the largest crop of the target's aspect to the target.
    E.g. 64 x 64 patches of frames seen at 96 pixels: a VAE trains on patches at the resolution it is
    used at, for the cost of the patch. None (the default) crops then resizes."""

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

    # ----- batching and loading ----------------------------------------------------------------
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

    @property
    def has_validation_split(self) -> bool:
        """Whether validation samples are configured (a held-out fraction or a separate list)."""
        return self.validation_fraction > 0 or bool(self.validation_data_list)

    @property
    def has_source(self) -> bool:
        """A data list or a sample index is set (the stage reads media)."""
        return self.data_list is not None or self.index is not None

    def validate(self, geometry: SampleGeometry) -> None:
        """Raise ConfigError naming the field and the fix; reads no file. `geometry` is what the VAE,
        the context-parallel size and the micro-batch impose on samples."""
        geometry.validate()
        if self.data_list is not None and self.index is not None:
            raise ConfigError(
                "data.data_list and data.index are both set; set one (data.index is a folder built from a data "
                "list by tools/build_index.py)"
            )
        if self.probe_media not in ("none", "missing", "all"):
            raise ConfigError(f"data.probe_media must be one of none, missing, all; got {self.probe_media!r}")
        for name in ("num_frames", "min_num_frames", "max_height", "max_width", "hw_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.crop_short_side is not None:
            if not self.force_resolution:
                raise ConfigError(
                    "data.crop_short_side cuts force-resolution samples out of resized frames; set "
                    "data.force_resolution=true or crop_short_side=null"
                )
            if self.crop_short_side < max(self.max_height, self.max_width):
                raise ConfigError(
                    f"data.crop_short_side={self.crop_short_side} is smaller than the "
                    f"{self.max_height}x{self.max_width} sample cut out of the resized frames; use "
                    f">= {max(self.max_height, self.max_width)}"
                )
        for name in ("max_load_attempts",):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_fps", "default_fps", "too_long_factor", "decode_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"data.{name} must be > 0, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"data.validation_fraction must be in [0, 1) (0 holds out nothing), got {self.validation_fraction}"
            )
        if self.validation_fraction > 0 and self.index is not None:
            raise ConfigError(
                "data.validation_fraction holds out entries of data.data_list; a stage reading data.index "
                "takes its validation samples from data.validation_data_list"
            )
        if self.validation_fraction > 0 and self.validation_data_list:
            raise ConfigError(
                "data.validation_fraction and data.validation_data_list both name validation samples; set one "
                "(validation_data_list=null to hold out a fraction of data_list)"
            )
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
        g = geometry
        snapped = snap_num_frames(self.num_frames, g.vae_stride_t, g.context_parallel, self.min_num_frames)
        if self.num_frames > 1 and snapped != self.num_frames:
            valid = valid_num_frames(
                g.vae_stride_t, g.context_parallel, self.min_num_frames, max(self.num_frames, 1) * 2
            )[:6]
            raise ConfigError(
                f"data.num_frames={self.num_frames} is not a length the VAE (temporal stride {g.vae_stride_t}) "
                f"and context parallel size {g.context_parallel} accept with min_num_frames="
                f"{self.min_num_frames}; valid lengths: {valid or 'none'} (1 + k x stride with "
                f"(1 + k) divisible by the context-parallel size)"
            )
        if not 0 < self.min_h_div_w_ratio <= self.max_h_div_w_ratio:
            raise ConfigError(
                f"data.min_h_div_w_ratio={self.min_h_div_w_ratio} and data.max_h_div_w_ratio="
                f"{self.max_h_div_w_ratio} must satisfy 0 < min <= max"
            )
        if self.hw_stride % g.vae_stride_hw != 0:
            raise ConfigError(
                f"data.hw_stride={self.hw_stride} must be a multiple of the VAE spatial stride {g.vae_stride_hw} "
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


@dataclass
class TextConfig:
    """Caption handling options of the data pipeline (the encoders themselves are configured in
    `TextEncoderPairConfig`)."""

    caption_dropout: float = 0.1
    """Probability that a caption is dropped for classifier-free guidance (released: 0.1)."""

    default_text_ratio: float = 0.0
    """Of the dropped captions, the fraction replaced by the neutral default sentence instead of "".
    Open-Sora-Plan's I2V training uses 0.5; T2V uses 0."""

    default_text_video: str = "A video of a coherent scene with clear, stable visuals."
    """Neutral sentence a dropped video caption may become (see `default_text_ratio`)."""

    default_text_image: str = "An image of a coherent scene with clear visuals."
    """Neutral sentence a dropped image caption may become (see `default_text_ratio`)."""

    aesthetic_notice: bool = True
    """Add a low/high aesthetic phrase when the sample has an aesthetic score."""

    aesthetic_low: float = 4.25
    """Scores at or below this get a low-aesthetic phrase."""

    aesthetic_high: float = 5.75
    """Scores at or above this get a high-aesthetic phrase."""

    clean: bool = True
    """Clean captions: HTML entities and tags, URLs, @handles, dash and quote variants, whitespace."""

    lowercase: bool = True
    """Lower-case captions while cleaning (the released cleanup does)."""

    keep_cjk: bool = False
    """Keep CJK ideographs while cleaning; v1.5 (English T5) drops them, mT5 models keep them."""

    fix_unicode: bool = False
    """Repair mojibake with `ftfy` while cleaning (the released cleanup does). Needs `pip install ftfy`."""

    def validate(self) -> None:
        """Raise ConfigError for probabilities outside [0, 1] or inverted aesthetic thresholds."""
        for name in ("caption_dropout", "default_text_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"text.{name} must be in [0, 1], got {value}")
        if self.aesthetic_low >= self.aesthetic_high:
            raise ConfigError(
                f"text.aesthetic_low={self.aesthetic_low} must be below text.aesthetic_high={self.aesthetic_high}"
            )


MASK_TYPES = ("t2iv", "i2v", "transition", "continuation", "clear", "random_temporal")
"""Every mask type, in the release's order."""

IMAGE_MASK_TYPES = ("t2iv", "clear")
"""Mask types an image (one frame) may get."""


@dataclass
class I2VMaskConfig:
    """How I2V training samples are masked and how the kept frames are perturbed."""

    video_mask_ratios: dict[str, float] = field(
        default_factory=lambda: {
            "t2iv": 1.0,
            "i2v": 8.0,
            "transition": 8.0,
            "continuation": 2.0,
            "clear": 0.0,
            "random_temporal": 1.0,
        }
    )
    """Relative weight of each mask type for videos (normalised; all zero = uniform over the listed
    types). The default is the released mask_config.yaml: 5/40/40/10/0/5 %."""

    image_mask_ratios: dict[str, float] = field(default_factory=lambda: {"t2iv": 1.0, "clear": 1.0})
    """Relative weight of t2iv and clear for images (the release's all-zero dict means 50/50)."""

    min_clear_ratio: float = 0.0
    """Lower bound of the kept fraction for continuation and random_temporal (k >= floor(T x it))."""

    max_clear_ratio: float = 1.0
    """Upper bound of the kept fraction for continuation and random_temporal (k <= ceil(T x it))."""

    condition_noise: bool = False
    """Add Gaussian noise to the kept frames of the masked video during training."""

    noise_log_mean: float = -3.0
    """Mean of log(sigma_c): each sample's noise scale is sigma_c = exp(N(mean, std))."""

    noise_log_std: float = 0.5
    """Standard deviation of log(sigma_c)."""

    noise_clear_ratio: float = 0.05
    """Probability that a sample's kept frames get no noise at all."""

    def validate(self) -> None:
        """Raise ConfigError for unknown mask types, negative weights or bad ratios."""
        _check_ratios("i2v.video_mask_ratios", self.video_mask_ratios, MASK_TYPES)
        _check_ratios("i2v.image_mask_ratios", self.image_mask_ratios, IMAGE_MASK_TYPES)
        for name in ("min_clear_ratio", "max_clear_ratio", "noise_clear_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"i2v.{name} must be in [0, 1], got {value}")
        if self.min_clear_ratio > self.max_clear_ratio:
            raise ConfigError(
                f"i2v.min_clear_ratio={self.min_clear_ratio} exceeds i2v.max_clear_ratio={self.max_clear_ratio}"
            )
        if self.noise_log_std < 0:
            raise ConfigError(f"i2v.noise_log_std must be >= 0, got {self.noise_log_std}")


def _check_ratios(name: str, ratios: Mapping[str, float], allowed: Sequence[str]) -> None:
    if not ratios:
        raise ConfigError(f"{name} is empty; give a weight to at least one of {list(allowed)}")
    unknown = sorted(set(ratios) - set(allowed))
    if unknown:
        raise ConfigError(f"{name} has mask types {unknown}; allowed: {list(allowed)}")
    negative = {k: v for k, v in ratios.items() if v < 0}
    if negative:
        raise ConfigError(f"{name} weights must be >= 0, got {negative}")


@dataclass
class FeatureCacheConfig:
    """Training from pre-computed VAE latents and text features (the `features` config section)."""

    cache_dir: str | None = None
    """Folder of a cache written by tools/build_feature_cache.py. Set: T2V stages read latents and
    text features from it and load neither the VAE nor the text encoder. None: encode online. I2V
    stages cannot use a cache (see megatron_video/data/feature_cache/format.py)."""

    crop_epochs: int = 1
    """Temporal crops cached per video: epoch e trains on the crop of epoch e mod crop_epochs, so
    epochs below this value see exactly the online crops. 1 freezes every clip to its epoch-0 crop.
    A clip with a single possible window (and every image) stores one latent whatever the value."""

    latent_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage of the posterior mean and std. float32 reproduces the online latents exactly;
    bfloat16 halves the latent bytes (most of the cache) at ~0.4% relative rounding of mean and std,
    which is exact only when the VAE itself ran in bfloat16."""

    samples_per_shard: int = 64
    """Samples per shard file while building: the unit of resume (a stopped build redoes at most one
    shard per rank) and of the open-file cache while reading."""

    text_batch_size: int = 64
    """Caption strings per text-encoder call while building."""

    def validate(self) -> None:
        """Raise ConfigError for sizes below 1 or an unknown dtype."""
        for name in ("crop_epochs", "samples_per_shard", "text_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"features.{name} must be >= 1, got {getattr(self, name)}")
        if self.latent_dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"features.latent_dtype must be one of ['bfloat16', 'float32'], got {self.latent_dtype!r}"
            )
