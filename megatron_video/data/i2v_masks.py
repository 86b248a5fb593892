"""Image-to-video conditioning data: which pixel frames are kept, the masked video, the mask
compressed to the latent grid, and optional noise on the kept frames.

Convention (Open-Sora-Plan inpainting): mask = 1 marks a frame to generate, 0 a kept condition
frame. Generated frames of the masked video are black, -1 in [-1, 1] space (the release zeroes
uint8 frames before normalising), and the masked video is VAE-encoded like any clip.

Mask types (`MASK_TYPES`): t2iv (nothing kept), i2v (frame 0), transition (first and last),
continuation (the first k frames), clear (every frame), random_temporal (k frames anywhere), with
k drawn uniformly from [floor(T * min_clear_ratio), ceil(T * max_clear_ratio)]. Images use t2iv or
clear only.

Shape legend
    C colour channels, T pixel frames, H/W pixel height/width, B batch, s_t/s_h/s_w VAE strides,
    T_lat = latent frames, h = H / s_h, w = W / s_w.

Every random draw comes from the `torch.Generator` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from megatron_video.data.config import IMAGE_MASK_TYPES, MASK_TYPES, I2VMaskConfig


def normalize_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """Weights scaled to sum to 1; all zero gives the same share to every listed type."""
    total = sum(ratios.values())
    if total == 0:
        return {k: 1.0 / len(ratios) for k in ratios}
    return {k: v / total for k, v in ratios.items()}


def sample_mask_type(ratios: Mapping[str, float], gen: torch.Generator | None = None) -> str:
    """One mask type drawn with the (normalised) weights."""
    probs = normalize_ratios(ratios)
    names = list(probs)
    index = torch.multinomial(torch.tensor([probs[n] for n in names], dtype=torch.float64), 1, generator=gen)
    return names[int(index)]


# ---------------------------------------------------------------------------------------------
# Kept frames and the masked video


def kept_frames(
    mask_type: str,
    num_frames: int,
    gen: torch.Generator | None = None,
    *,
    min_clear_ratio: float = 0.0,
    max_clear_ratio: float = 1.0,
) -> torch.Tensor:
    """Bool [T], True where the frame is kept as a condition."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask type '{mask_type}'; choose one of {list(MASK_TYPES)}")
    t = num_frames
    kept_T = torch.zeros(t, dtype=torch.bool)
    if mask_type == "i2v":
        kept_T[0] = True
    elif mask_type == "transition":
        kept_T[[0, -1]] = True
    elif mask_type == "clear":
        kept_T[:] = True
    elif mask_type in ("continuation", "random_temporal"):
        lo, hi = math.floor(t * min_clear_ratio), math.ceil(t * max_clear_ratio)
        k = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        if mask_type == "continuation":
            kept_T[:k] = True
        else:
            kept_T[torch.randperm(t, generator=gen)[:k]] = True
    return kept_T


def mask_video(video_CTHW: torch.Tensor, kept_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked video [C, T, H, W] (frames not kept set to -1) and the mask [1, T, H, W] (1 = generate)
    in the video's dtype. The video is in [-1, 1]."""
    _, t, h, w = video_CTHW.shape
    kept_1T11 = kept_T.to(video_CTHW.device).view(1, t, 1, 1)
    masked_CTHW = torch.where(kept_1T11, video_CTHW, torch.full_like(video_CTHW, -1.0))
    mask_1THW = (~kept_1T11).to(video_CTHW.dtype).expand(1, t, h, w).contiguous()
    return masked_CTHW, mask_1THW


class I2VCondition(NamedTuple):
    """A masked sample: masked video [C, T, H, W], mask [1, T, H, W] (1 = generate), mask type."""

    masked_video_CTHW: torch.Tensor
    mask_1THW: torch.Tensor
    mask_type: str


class I2VMasker:
    """Draws a mask type and kept frames for a training sample and masks its video."""

    def __init__(self, cfg: I2VMaskConfig):
        cfg.validate()
        self.cfg = cfg
        self.video_probs = normalize_ratios(cfg.video_mask_ratios)
        self.image_probs = normalize_ratios(cfg.image_mask_ratios)

    def __call__(
        self, video_CTHW: torch.Tensor, gen: torch.Generator | None = None, mask_type: str | None = None
    ) -> I2VCondition:
        """Mask a video (T > 1) or an image (T = 1) in [-1, 1]; `mask_type` forces the type."""
        num_frames = video_CTHW.shape[1]
        allowed = MASK_TYPES if num_frames > 1 else IMAGE_MASK_TYPES
        if mask_type is None:
            mask_type = sample_mask_type(self.video_probs if num_frames > 1 else self.image_probs, gen)
        elif mask_type not in allowed:
            raise ValueError(
                f"mask type '{mask_type}' is not allowed for {num_frames} frame(s); use {list(allowed)}"
            )
        kept_T = kept_frames(
            mask_type,
            num_frames,
            gen,
            min_clear_ratio=self.cfg.min_clear_ratio,
            max_clear_ratio=self.cfg.max_clear_ratio,
        )
        return I2VCondition(*mask_video(video_CTHW, kept_T), mask_type)

    def add_noise(
        self, masked_video_BCTHW: torch.Tensor, mask_B1THW: torch.Tensor, gen: torch.Generator | None = None
    ) -> torch.Tensor:
        """The configured training noise on the kept frames of a batch (unchanged when
        `condition_noise` is off)."""
        if not self.cfg.condition_noise:
            return masked_video_BCTHW
        return add_condition_noise(
            masked_video_BCTHW,
            mask_B1THW,
            gen,
            log_mean=self.cfg.noise_log_mean,
            log_std=self.cfg.noise_log_std,
            clear_ratio=self.cfg.noise_clear_ratio,
        )


# ---------------------------------------------------------------------------------------------
# Mask compression to the latent grid


def compress_mask(
    mask_B1THW: torch.Tensor, stride_t: int, stride_h: int = 8, stride_w: int = 8
) -> torch.Tensor:
    """Pixel mask [B, 1, T, H, W] -> latent mask [B, s_t, T_lat, H/s_h, W/s_w].

    Each frame is resized bilinearly to (H/s_h, W/s_w). When T = 1 mod s_t (causal VAE), frame 0
    is repeated s_t times at the front; when T = 0 mod s_t nothing is added. The s_t pixel frames of
    latent step i then become its s_t channels: channel j = padded frame i * s_t + j.
    """
    b, c, t, h, w = mask_B1THW.shape
    if c != 1:
        raise ValueError(
            f"compress_mask takes a one-channel mask [B, 1, T, H, W], got {tuple(mask_B1THW.shape)}"
        )
    if h % stride_h or w % stride_w:
        raise ValueError(f"mask size {h}x{w} is not divisible by the VAE strides {stride_h}x{stride_w}")
    if t % stride_t not in (0, 1 % stride_t):
        raise ValueError(f"{t} frames: a temporal stride of {stride_t} needs T = 1 or 0 (mod {stride_t})")
    out_dtype = mask_B1THW.dtype if mask_B1THW.is_floating_point() else torch.float32
    work_dtype = torch.promote_types(out_dtype, torch.float32)  # fp32 at least (the release does so on NPU)
    frames_N1HW = mask_B1THW.transpose(1, 2).reshape(b * t, 1, h, w).to(work_dtype)
    small_N1hw = F.interpolate(frames_N1HW, size=(h // stride_h, w // stride_w), mode="bilinear")
    small_BThw = small_N1hw.view(b, t, h // stride_h, w // stride_w).to(out_dtype)
    if stride_t > 1 and t % stride_t == 1:
        small_BThw = torch.cat([small_BThw[:, :1].expand(-1, stride_t, -1, -1), small_BThw[:, 1:]], dim=1)
    t_lat = small_BThw.shape[1] // stride_t
    steps_BTShw = small_BThw.reshape(b, t_lat, stride_t, h // stride_h, w // stride_w)
    return steps_BTShw.transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Noise on the kept frames


def add_condition_noise(
    masked_video_BCTHW: torch.Tensor,
    mask_B1THW: torch.Tensor,
    gen: torch.Generator | None = None,
    *,
    log_mean: float = -3.0,
    log_std: float = 0.5,
    clear_ratio: float = 0.05,
) -> torch.Tensor:
    """Masked video plus sigma_c * N(0, 1) on its kept frames (mask < 0.5), sigma_c = exp(N(log_mean,
    log_std)) per sample; a sample gets no noise with probability clear_ratio. Frames to generate
    are unchanged."""
    b = masked_video_BCTHW.shape[0]
    device = gen.device if gen is not None else torch.device("cpu")
    clear_B = torch.rand(b, generator=gen, device=device) < clear_ratio
    sigma_B = torch.exp(
        log_mean + log_std * torch.randn(b, generator=gen, device=device, dtype=torch.float64)
    )
    sigma_B = torch.where(clear_B, torch.zeros_like(sigma_B), sigma_B)
    noise = torch.randn(
        masked_video_BCTHW.shape, generator=gen, device=device, dtype=masked_video_BCTHW.dtype
    )
    noise = noise.to(masked_video_BCTHW.device) * sigma_B.to(masked_video_BCTHW).view(b, 1, 1, 1, 1)
    kept_B1THW = mask_B1THW.to(masked_video_BCTHW.device) < 0.5
    return masked_video_BCTHW + torch.where(kept_B1THW, noise, torch.zeros_like(noise))


def add_inference_condition_noise(
    masked_video_BCTHW: torch.Tensor,
    mask_B1THW: torch.Tensor,
    strength: float,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Sampling-time variant: sigma_c ~ exp(N(log(strength), 0.01)) on every sample; strength 0
    leaves the video unchanged. Strength is in [0, 1]."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"condition noise strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return masked_video_BCTHW
    return add_condition_noise(
        masked_video_BCTHW, mask_B1THW, gen, log_mean=math.log(strength), log_std=0.01, clear_ratio=0.0
    )


# ---------------------------------------------------------------------------------------------
# Inference: condition frames at given positions


def inference_condition(
    cond_frames_KCHW: torch.Tensor, num_frames: int, indices: Sequence[int] | None = None
) -> I2VCondition:
    """Masked video [C, T, H, W] and mask [1, T, H, W] with K given frames (in [-1, 1]) placed at
    `indices` (negative counts from the end). Without indices: one frame -> i2v at 0, two ->
    transition at (0, T-1), more -> continuation at 0..K-1."""
    k, c, h, w = cond_frames_KCHW.shape
    if indices is None:
        indices = [0] if k == 1 else [0, num_frames - 1] if k == 2 else list(range(k))
    if len(indices) != k:
        raise ValueError(f"{k} condition frames but {len(indices)} indices {list(indices)}")
    positions = [i + num_frames if i < 0 else i for i in indices]
    if any(not 0 <= p < num_frames for p in positions) or len(set(positions)) != k:
        raise ValueError(
            f"condition indices {list(indices)} must be distinct frames of a {num_frames}-frame video"
        )
    kept_T = torch.zeros(num_frames, dtype=torch.bool)
    kept_T[positions] = True
    video_CTHW = cond_frames_KCHW.new_full((c, num_frames, h, w), -1.0)
    video_CTHW[:, positions] = cond_frames_KCHW.transpose(0, 1)
    return I2VCondition(*mask_video(video_CTHW, kept_T), _classify(kept_T))


def _classify(kept_T: torch.Tensor) -> str:
    """The mask type whose pattern these kept frames follow (random_temporal if none)."""
    t, n = kept_T.numel(), int(kept_T.sum())
    if n == 0:
        return "t2iv"
    if n == t:
        return "clear"
    if n == 1 and kept_T[0]:
        return "i2v"
    if n == 2 and kept_T[0] and kept_T[-1]:
        return "transition"
    if bool(kept_T[:n].all()):
        return "continuation"
    return "random_temporal"
