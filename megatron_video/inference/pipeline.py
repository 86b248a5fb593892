"""Generation: prompt (+ condition frames) -> Euler flow sampling with CFG -> VAE decode -> mp4.

Every rank of a model-parallel group runs the same loop (the denoiser is sharded over them and
returns the full velocity); noise comes from the seed, so the ranks agree; one rank writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_video.data.i2v_masks import compress_mask, inference_condition
from megatron_video.diffusion import euler_flow_sample, flow_sigmas, guided_velocity

DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, low resolution, distorted, deformed, watermark, text, static, jittery motion"
)


@dataclass
class SamplingConfig:
    """How a video is sampled."""

    num_frames: int = 121
    """Pixel frames (1 + a multiple of the VAE temporal stride)."""

    height: int = 576
    """Pixel height (a multiple of VAE stride x patch)."""

    width: int = 1024
    """Pixel width."""

    steps: int = 50
    """Euler steps."""

    shift: float = 7.0
    """Static sigma shift of the schedule (v1.5 uses 7.0)."""

    linear_quadratic: bool = False
    """Use the linear-quadratic schedule instead of the shifted linear one."""

    guidance_scale: float = 8.0
    """Classifier-free guidance scale (1 disables the unconditional branch)."""

    guidance_rescale: float = 0.7
    """Guidance rescale factor (0 disables)."""

    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """Text of the unconditional branch."""

    prompt_template: str = "high quality, {}"
    """Template the prompt is placed into."""

    seed: int = 0
    """Noise seed."""

    fps: float = 24.0
    """Frame rate of the written mp4."""


@torch.no_grad()
def generate(
    model,
    vae,
    text_encoder,
    prompts: list[str],
    cfg: SamplingConfig,
    condition_frames: list[torch.Tensor] | None = None,
    progress=None,
) -> torch.Tensor:
    """Videos [B, 3, T, H, W] in [-1, 1] for `prompts` (I2V when `condition_frames` are given:
    one [K, 3, H, W] tensor in [-1, 1] per prompt; one frame = i2v, two = first/last transition)."""
    device = next(model.parameters()).device
    b = len(prompts)
    texts = [cfg.prompt_template.format(p) for p in prompts]
    use_cfg = cfg.guidance_scale != 1.0
    if use_cfg:
        texts = texts + [cfg.negative_prompt] * b
    emb = text_encoder.encode_texts(texts)
    lat_t = 1 + (cfg.num_frames - 1) // vae.temporal_stride
    shape = (b, vae.latent_channels, lat_t, cfg.height // vae.spatial_stride, cfg.width // vae.spatial_stride)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    extra = {}
    if condition_frames is not None:
        masked, masks = [], []
        for frames in condition_frames:
            c = inference_condition(frames.to(device), cfg.num_frames)
            masked.append(c.masked_video_CTHW)
            masks.append(c.mask_1THW)
        masked_latents = vae.encode_latents(torch.stack(masked), sample=False)
        inpaint_mask = compress_mask(
            torch.stack(masks), vae.temporal_stride, vae.spatial_stride, vae.spatial_stride
        )
        extra = {"masked_latents_BCTHW": masked_latents, "inpaint_mask_BMTHW": inpaint_mask}
        if use_cfg:
            extra = {k: torch.cat([v, v]) for k, v in extra.items()}

    cond = {
        "text_BLC": emb.hidden_BLC.float(),
        "text_mask_BL": emb.mask_BL,
        "pooled_BP": emb.pooled_BP.float(),
    }

    def velocity(x, t):
        if not use_cfg:
            return model(x, t, **cond, **extra)
        v = model(torch.cat([x, x]), torch.cat([t, t]), **cond, **extra)
        return guided_velocity(v[:b], v[b:], cfg.guidance_scale, cfg.guidance_rescale)

    sigmas = flow_sigmas(cfg.steps, cfg.shift, cfg.linear_quadratic)
    latents = euler_flow_sample(velocity, noise, sigmas, progress)
    return vae.decode_latents(latents).clamp(-1, 1)


def write_videos(videos_BCTHW: torch.Tensor, paths: list[str | Path], fps: float) -> list[Path]:
    """One H.264 mp4 per video."""
    from megatron_video.data.video_io import video_to_uint8, write_video

    return [write_video(p, video_to_uint8(v), fps, layout="THWC") for v, p in zip(videos_BCTHW, paths)]
