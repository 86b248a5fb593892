"""Sample sizes (reference 6.3): pure rules from a source (h, w) to a target (h, w), and the tensor
transforms that produce it.

Two strategies:

* force resolution: every sample is (max_height, max_width); the source is centre-cropped to that
  aspect, then resized. Sources are kept when h / w is in [min_h_div_w_ratio, max_h_div_w_ratio]
  and h x w >= ceil(min_hxw x max(r / a, a / r)) (r the source aspect, a the target aspect).
* Min-Max tokens: sources larger than max_hxw pixels are scaled by sqrt(max_hxw / (h w)) (sizes
  truncated to integers), then each side is centre-cropped down to a multiple of hw_stride; samples
  under min_hxw pixels are skipped. With `force_5_ratio` the target is instead snapped to the
  nearest of 9:16, 3:4, 1:1, 4:3, 16:9: (r_h k s, r_w k s), s = hw_stride,
  k = floor(sqrt(A / (r_h r_w s^2))), A = min(h w, max_hxw); the source is resized to cover it,
  centre-cropped to the ratio, then to stride multiples. E.g. A = 384^2 gives 384x384 for 1:1 and
  288x512 for 9:16.

Resizes use torch interpolation with antialiasing and align_corners=True, as the reference does.
Video tensors here are [T, C, H, W] (T = 1 for images).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from megatron_video.data.frames import Skipped

if TYPE_CHECKING:
    from megatron_video.data.config import DataConfig

FIVE_RATIOS: dict[float, tuple[int, int]] = {
    0.56: (9, 16),
    0.75: (3, 4),
    1.00: (1, 1),
    1.33: (4, 3),
    1.78: (16, 9),
}
"""h / w key (rounded as in the reference) -> (ratio_h, ratio_w) of the `force_5_ratio` targets."""

ASPECT_OUT_OF_RANGE = Skipped("aspect")
TOO_SMALL = Skipped("too_small")
BELOW_STRIDE = Skipped("below_stride")
"""A side ends up below one hw_stride after the Min-Max resize."""

Box = tuple[int, int, int, int]
"""(top, left, height, width) of a crop, in pixels."""


def closest_ratio(h: int, w: int) -> tuple[int, int]:
    """(ratio_h, ratio_w) of the five training ratios nearest h / w (by |h / w - key|)."""
    aspect = h / w
    return FIVE_RATIOS[min(FIVE_RATIOS, key=lambda key: abs(key - aspect))]


def size_for_ratio(ratio_h: int, ratio_w: int, area: float, stride: int) -> tuple[int, int]:
    """Largest (r_h k s, r_w k s) with area <= `area`; below one stride, the unsnapped size of that area."""
    k = math.floor(math.sqrt(area / (ratio_h * ratio_w * stride * stride)))
    if k > 0:
        return ratio_h * k * stride, ratio_w * k * stride
    scale = math.sqrt(area / (ratio_h * ratio_w))
    return int(ratio_h * scale), int(ratio_w * scale)


def cover_size(h: int, w: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Aspect-preserving size whose short side (relative to the target aspect) meets the target."""
    if h / w > target_h / target_w:
        return int(target_w / w * h), target_w
    return target_h, int(target_h / h * w)


def max_area_size(
    h: int, w: int, max_hxw: int, force_5_ratio: bool = False, hw_stride: int = 16
) -> tuple[int, int]:
    """Size a source is resized to before the stride crop of the Min-Max strategy."""
    if force_5_ratio:
        ratio_h, ratio_w = closest_ratio(h, w)
        target_h, target_w = size_for_ratio(ratio_h, ratio_w, min(h * w, max_hxw), hw_stride)
        return cover_size(h, w, target_h, target_w)
    if h * w > max_hxw:
        scale = math.sqrt(max_hxw / (h * w))
        return int(h * scale), int(w * scale)
    return h, w


def stride_crop_box(h: int, w: int, stride: int, force_5_ratio: bool = False) -> Box:
    """Centre crop to multiples of `stride` (first to the nearest five-ratio aspect if asked)."""
    top = left = 0
    if force_5_ratio:
        ratio_h, ratio_w = closest_ratio(h, w)
        if h / w > ratio_h / ratio_w:
            crop_h, crop_w = int(w * ratio_h / ratio_w), w
        else:
            crop_h, crop_w = h, int(h * ratio_w / ratio_h)
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        h, w = crop_h, crop_w
    th, tw = h // stride * stride, w // stride * stride
    return top + (h - th) // 2, left + (w - tw) // 2, th, tw


def aspect_crop_box(h: int, w: int, target_h: int, target_w: int) -> Box:
    """Largest centred crop of an h x w frame with the aspect of target_h x target_w."""
    aspect = target_h / target_w
    if h / w > aspect:
        crop_h, crop_w = int(w * aspect), w
    else:
        crop_h, crop_w = h, int(h / aspect)
    return int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0)), crop_h, crop_w


def plan_resolution(h: int, w: int, cfg: DataConfig) -> tuple[int, int] | Skipped:
    """Target (height, width) of a sample whose source frames (after `crop`) are h x w, or why not."""
    aspect = h / w
    if not cfg.min_h_div_w_ratio <= aspect <= cfg.max_h_div_w_ratio:
        return ASPECT_OUT_OF_RANGE
    if cfg.min_hxw is not None and h * w < cfg.min_hxw:
        return TOO_SMALL
    if cfg.force_resolution:
        if cfg.min_hxw is not None:
            target_aspect = cfg.max_height / cfg.max_width
            needed = math.ceil(cfg.min_hxw * max(aspect / target_aspect, target_aspect / aspect))
            if h * w < needed:
                return TOO_SMALL
        return cfg.max_height, cfg.max_width
    rh, rw = max_area_size(h, w, cfg.max_hxw, cfg.force_5_ratio, cfg.hw_stride)
    _, _, sample_h, sample_w = stride_crop_box(rh, rw, cfg.hw_stride, cfg.force_5_ratio)
    if sample_h <= 0 or sample_w <= 0:
        return BELOW_STRIDE
    if cfg.min_hxw is not None and sample_h * sample_w < cfg.min_hxw:
        return TOO_SMALL
    return sample_h, sample_w


def crop(video_TCHW: torch.Tensor, box: Box) -> torch.Tensor:
    """Frames cut to box = (top, left, height, width)."""
    top, left, h, w = box
    return video_TCHW[..., top : top + h, left : left + w]


def resize(video_TCHW: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Float frames resized to size = (height, width), antialiased; a no-op at the same size."""
    if tuple(video_TCHW.shape[-2:]) == tuple(size):
        return video_TCHW
    return F.interpolate(video_TCHW, size=size, mode=mode, align_corners=True, antialias=True)


def center_crop_resize(
    video_TCHW: torch.Tensor, size: tuple[int, int], mode: str = "bicubic"
) -> torch.Tensor:
    """Force resolution: centre crop to the aspect of `size`, then resize to it."""
    h, w = video_TCHW.shape[-2:]
    return resize(crop(video_TCHW, aspect_crop_box(h, w, *size)), size, mode)


def max_area_resize_crop(
    video_TCHW: torch.Tensor, max_hxw: int, hw_stride: int, force_5_ratio: bool = False, mode: str = "bicubic"
) -> torch.Tensor:
    """Min-Max strategy: resize by the area bound (or to cover the five-ratio target), then stride crop."""
    h, w = video_TCHW.shape[-2:]
    video_TCHW = resize(video_TCHW, max_area_size(h, w, max_hxw, force_5_ratio, hw_stride), mode)
    h, w = video_TCHW.shape[-2:]
    return crop(video_TCHW, stride_crop_box(h, w, hw_stride, force_5_ratio))


def random_aspect_crop_box(h: int, w: int, target_h: int, target_w: int, rng: np.random.Generator) -> Box:
    """The crop of `aspect_crop_box` (largest with the target's aspect) at a uniformly random position."""
    _, _, crop_h, crop_w = aspect_crop_box(h, w, target_h, target_w)
    return int(rng.integers(0, h - crop_h + 1)), int(rng.integers(0, w - crop_w + 1)), crop_h, crop_w


def to_model_input(
    frames_TCHW_uint8: torch.Tensor,
    target: tuple[int, int],
    cfg: DataConfig,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """uint8 frames -> float32 [T, C, H, W] of size `target`, in [-1, 1] (clamped after resizing).

    With `cfg.random_crop` and an `rng`, the force-resolution crop is placed by `rng`; otherwise centred.
    Raises ValueError when the frames do not produce `target` (an annotation `resolution` that does
    not match the file).
    """
    h, w = frames_TCHW_uint8.shape[-2:]
    randomly = cfg.random_crop and rng is not None
    if cfg.force_resolution and cfg.crop_short_side is not None:  # resize, then cut the sample out
        scale = cfg.crop_short_side / min(h, w)
        size = (max(cfg.crop_short_side, round(h * scale)), max(cfg.crop_short_side, round(w * scale)))
        video = resize(frames_TCHW_uint8.float().div_(255.0), size, cfg.interpolation)
        (th, tw), (rh, rw) = target, size
        if randomly:
            box = int(rng.integers(0, rh - th + 1)), int(rng.integers(0, rw - tw + 1)), th, tw
        else:
            box = (rh - th) // 2, (rw - tw) // 2, th, tw
        video = crop(video, box)
    elif cfg.force_resolution:  # crop the uint8 frames first: less to convert
        box = random_aspect_crop_box(h, w, *target, rng) if randomly else aspect_crop_box(h, w, *target)
        video = crop(frames_TCHW_uint8, box).float().div_(255.0)
        video = resize(video, target, cfg.interpolation)
    else:
        video = frames_TCHW_uint8.float().div_(255.0)
        video = max_area_resize_crop(video, cfg.max_hxw, cfg.hw_stride, cfg.force_5_ratio, cfg.interpolation)
    if tuple(video.shape[-2:]) != tuple(target):
        raise ValueError(
            f"frames of {h}x{w} give a {video.shape[-2]}x{video.shape[-1]} sample, not the planned "
            f"{target[0]}x{target[1]}; the annotation's resolution does not match the file"
        )
    return video.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
