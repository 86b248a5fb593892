"""Generation: prompt (+ condition frames) -> sampling with CFG -> VAE decode -> mp4.

How the ranks share the work (`InferenceGroups`):

* Tensor and context (Ulysses) parallel split one video over the ranks of a model replica; every
  rank of the replica runs the same sampling loop, the denoiser returns the full prediction.
* CFG-parallel pairs two replicas: the first runs the conditional branch, the second the
  unconditional one, and each step all-gathers the two predictions over the pair, so both apply
  the same guided update.
* The remaining data-parallel replicas (or pairs) take every n-th prompt.

Noise is drawn per prompt from `seed + prompt index`, so a prompt's video does not depend on the
layout or on which other prompts share its batch. One rank of each replica (or pair) decodes and
writes the files of its prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_video.data.i2v_masks import add_inference_condition_noise, compress_mask, inference_condition
from megatron_video.diffusion import ddpm_sample, euler_flow_sample, flow_sigmas, guided_velocity
from megatron_video.parallel.plan import ParallelPlan

DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, low resolution, distorted, deformed, watermark, text, static, jittery motion"
)

FLOW_SAMPLER = "flow_euler"


RELEASE_DEFAULTS = {
    "flow": {"guidance_scale": 8.0, "guidance_rescale": 0.7, "prompt_template": "high quality, {}"},
    "ddpm": {
        "guidance_scale": 7.5,
        "guidance_rescale": 0.0,
        "prompt_template": "high quality, high aesthetic, {}",
    },
}
"""Guidance and prompt template of the releases: v1.5 for flow models, v1.3 (and v1.2) for DDPM ones."""


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
    """Denoising steps."""

    sampler: str = FLOW_SAMPLER
    """flow_euler for rectified-flow models (v1.5); a DDPM sampler name for v-prediction / epsilon
    models (v1.3 / v1.2, see megatron_video/diffusion/ddpm_samplers.py)."""

    shift: float = 7.0
    """Static sigma shift of the flow schedule (v1.5 uses 7.0)."""

    linear_quadratic: bool = False
    """Use the linear-quadratic flow schedule instead of the shifted linear one."""

    guidance_scale: float = 8.0
    """Classifier-free guidance scale (1 disables the unconditional branch)."""

    guidance_rescale: float = 0.7
    """Guidance rescale factor (0 disables)."""

    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """Text of the unconditional branch."""

    prompt_template: str = "high quality, {}"
    """Template the prompt is placed into."""

    seed: int = 0
    """Noise seed of the first prompt; prompt i uses seed + i."""

    fps: float = 24.0
    """Frame rate of the written mp4."""

    condition_noise: float = 0.0
    """I2V: strength in [0, 1] of the noise added to the kept condition frames (0 = none)."""

    @property
    def use_cfg(self) -> bool:
        """Whether the unconditional branch runs."""
        return self.guidance_scale != 1.0


# ---------------------------------------------------------------------------------------------
# Work sharing over ranks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceGroups:
    """This rank's share of the prompts and its CFG partner."""

    prompt_group: int = 0
    """Which share of the prompts this rank works on."""

    num_prompt_groups: int = 1
    """Number of shares (data-parallel replicas, or replica pairs under CFG-parallel)."""

    cfg_rank: int = 0
    """0: conditional branch (or both, serial CFG); 1: unconditional branch."""

    cfg_group: Any = None
    """Process group of the CFG pair (None: both branches on this replica)."""

    writer: bool = True
    """This rank decodes and writes the videos of its share."""

    def prompt_indices(self, num_prompts: int) -> list[int]:
        """Indices of the prompts this rank works on."""
        return list(range(self.prompt_group, num_prompts, self.num_prompt_groups))


def build_inference_groups(plan: ParallelPlan, cfg_parallel: bool) -> InferenceGroups:
    """Groups for the data-parallel replicas of `plan`.

    Collective: every rank calls it. With `cfg_parallel` the data-parallel size must be even;
    consecutive data-parallel ranks (2g, 2g + 1) form pair g.
    """
    if not dist.is_initialized():
        if cfg_parallel:
            raise ValueError("CFG-parallel needs two data-parallel replicas; launch at least 2 processes")
        return InferenceGroups()
    dp_group, dp_rank, dp_size = plan.data_parallel_group, plan.data_parallel_rank, plan.data_parallel
    model_parallel_main = plan.tensor_parallel_rank == 0 and plan.context_parallel_rank == 0
    if not cfg_parallel:
        return InferenceGroups(dp_rank, dp_size, 0, None, model_parallel_main)
    if dp_size % 2:
        raise ValueError(
            f"CFG-parallel pairs data-parallel replicas, but there are {dp_size}: launch an even multiple of "
            "tensor x context parallel processes, or sample without CFG-parallel"
        )
    # new_group is collective over the world: every rank creates every pair, in the same order.
    dp_groups = [None] * dist.get_world_size()
    dist.all_gather_object(dp_groups, tuple(dist.get_process_group_ranks(dp_group)))
    mine = None
    for ranks in sorted(set(dp_groups)):
        for g in range(len(ranks) // 2):
            pair = dist.new_group([ranks[2 * g], ranks[2 * g + 1]])
            if dist.get_rank() in ranks[2 * g : 2 * g + 2]:
                mine = pair
    cfg_rank = dp_rank % 2
    return InferenceGroups(dp_rank // 2, dp_size // 2, cfg_rank, mine, model_parallel_main and cfg_rank == 0)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def prompt_noise(shape_CTHW: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """Initial noise [B, C, T, H, W], prompt b drawn from generator seed `seeds[b]` on the CPU."""
    return torch.stack(
        [torch.randn(tuple(shape_CTHW), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def latent_shape(vae, cfg: SamplingConfig) -> tuple[int, int, int, int]:
    """[C, T, H, W] of the latent video for the configured pixel size."""
    if not vae.valid_num_frames(cfg.num_frames):
        raise ValueError(
            f"num_frames={cfg.num_frames} is not 1 + a multiple of the VAE temporal stride {vae.temporal_stride}"
        )
    s = vae.spatial_stride
    if cfg.height % s or cfg.width % s:
        raise ValueError(
            f"height and width ({cfg.height}x{cfg.width}) must be multiples of the VAE stride {s}"
        )
    return (
        vae.latent_channels,
        1 + (cfg.num_frames - 1) // vae.temporal_stride,
        cfg.height // s,
        cfg.width // s,
    )


def encode_condition(
    vae,
    condition_frames: Sequence[torch.Tensor],
    num_frames: int,
    size: tuple[int, int] | None = None,
    noise_strength: float = 0.0,
    seeds: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The inpainting inputs (masked-video latents and compressed mask) for per-prompt condition frames
    ([K, 3, H, W] in [-1, 1]: one frame = i2v, two = first/last transition, more = continuation).

    size: the (H, W) being sampled, checked against the frames. noise_strength: the release's
    inference condition noise (sigma ~ exp(N(log s, 0.01)) on the kept frames; 0 = none), drawn
    per prompt from `seeds`.
    """
    device = next((p.device for p in vae.parameters()), condition_frames[0].device)
    masked, masks = [], []
    for i, frames in enumerate(condition_frames):
        if size is not None and tuple(frames.shape[-2:]) != tuple(size):
            raise ValueError(
                f"condition frames are {tuple(frames.shape[-2:])} but the video is sampled at {tuple(size)}; "
                "resize them (tools/sample_video.py centre-crops and resizes)"
            )
        c = inference_condition(frames.to(device), num_frames)
        video = c.masked_video_CTHW
        if noise_strength:
            gen = torch.Generator().manual_seed(int(seeds[i] if seeds is not None else i) + 2_000_003)
            video = add_inference_condition_noise(
                video[None].cpu(), c.mask_1THW[None].cpu(), noise_strength, gen
            )[0]
        masked.append(video.to(device))
        masks.append(c.mask_1THW)
    return {
        "masked_latents_BCTHW": vae.encode_latents(torch.stack(masked), sample=False),
        "inpaint_mask_BMTHW": compress_mask(
            torch.stack(masks), vae.temporal_stride, vae.spatial_stride, vae.spatial_stride
        ),
    }


def _text_inputs(text_encoder, texts: list[str]) -> dict[str, torch.Tensor]:
    emb = text_encoder.encode_texts(texts)
    return {
        "text_BLC": emb.hidden_BLC.float(),
        "text_mask_BL": emb.mask_BL,
        "pooled_BP": emb.pooled_BP.float(),
    }


@torch.no_grad()
def sample_latents(
    model,
    text_encoder,
    prompts: list[str],
    cfg: SamplingConfig,
    shape_CTHW: Sequence[int],
    seeds: Sequence[int],
    condition: dict[str, torch.Tensor] | None = None,
    groups: InferenceGroups | None = None,
    ddpm=None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Clean latents [B, C, T, H, W] for `prompts` (fp32 sampling state).

    `condition`: inpainting inputs from `encode_condition` (I2V models). `groups.cfg_group`: run
    only this rank's CFG branch and exchange predictions with the partner. `ddpm`: the
    DDPMObjective of a v-prediction / epsilon model (needed by the DDPM samplers).
    """
    groups = groups or InferenceGroups()
    device = next(model.parameters()).device
    b = len(prompts)
    positive = [cfg.prompt_template.format(p) for p in prompts]
    negative = [cfg.negative_prompt] * b
    extra = {k: v.to(device) for k, v in (condition or {}).items()}
    parallel_cfg = cfg.use_cfg and groups.cfg_group is not None
    if parallel_cfg:
        text = _text_inputs(text_encoder, positive if groups.cfg_rank == 0 else negative)
    elif cfg.use_cfg:
        text = _text_inputs(text_encoder, positive + negative)
        extra = {k: torch.cat([v, v]) for k, v in extra.items()}
    else:
        text = _text_inputs(text_encoder, positive)

    def prediction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not cfg.use_cfg:
            return model(x, t, **text, **extra)
        if parallel_cfg:
            mine = model(x, t, **text, **extra).float().contiguous()
            both = [torch.empty_like(mine), torch.empty_like(mine)]
            dist.all_gather(both, mine, group=groups.cfg_group)
            return guided_velocity(both[0], both[1], cfg.guidance_scale, cfg.guidance_rescale)
        v = model(torch.cat([x, x]), torch.cat([t, t]), **text, **extra)
        return guided_velocity(v[:b], v[b:], cfg.guidance_scale, cfg.guidance_rescale)

    noise = prompt_noise(shape_CTHW, seeds).to(device)
    if cfg.sampler == FLOW_SAMPLER:
        sigmas = flow_sigmas(cfg.steps, cfg.shift, cfg.linear_quadratic)
        return euler_flow_sample(prediction, noise, sigmas, progress)
    if ddpm is None:
        raise ValueError(f"sampler {cfg.sampler!r} needs the model's DDPM objective (prediction type, betas)")
    # The ancestral noise of prompt i comes from its own generator, like its initial noise.
    generators = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]
    return ddpm_sample(prediction, noise, ddpm, cfg.steps, cfg.sampler, generators, progress)


@torch.no_grad()
def generate(
    model,
    vae,
    text_encoder,
    prompts: list[str],
    cfg: SamplingConfig,
    condition_frames: list[torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    seeds: Sequence[int] | None = None,
    groups: InferenceGroups | None = None,
    ddpm=None,
) -> torch.Tensor:
    """Videos [B, 3, T, H, W] in [-1, 1] for `prompts` (I2V when `condition_frames` are given: one
    [K, 3, H, W] tensor in [-1, 1] per prompt). Seeds default to cfg.seed + prompt position."""
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(len(prompts))]
    condition = None
    if condition_frames:
        size = (cfg.height, cfg.width)
        condition = encode_condition(vae, condition_frames, cfg.num_frames, size, cfg.condition_noise, seeds)
    latents = sample_latents(
        model, text_encoder, prompts, cfg, latent_shape(vae, cfg), seeds, condition, groups, ddpm, progress
    )
    return vae.decode_latents(latents).clamp(-1, 1)


class StepTimer:
    """Progress over denoising steps (a tqdm bar on the printing rank) and the time each step took."""

    def __init__(self, total: int, enabled: bool, description: str = "denoising"):
        self.total = total
        self.times: list[float] = []
        self._last = time.perf_counter()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="step", leave=False)

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        if self._bar is not None:
            self._bar.update(1)
            if done == total:
                self._bar.close()

    def summary(self) -> str:
        """'N steps, mean x s/step (first y s, median of the rest z s)'."""
        if not self.times:
            return "no steps"
        rest = sorted(self.times[1:]) or self.times
        return (
            f"{len(self.times)} steps, {sum(self.times) / len(self.times):.3f} s/step "
            f"(first {self.times[0]:.3f} s, median of the rest {rest[len(rest) // 2]:.3f} s)"
        )


def write_videos(videos_BCTHW: torch.Tensor, paths: list[str | Path], fps: float) -> list[Path]:
    """One H.264 mp4 per video."""
    from megatron_video.data.video_io import video_to_uint8, write_video

    return [write_video(p, video_to_uint8(v), fps, layout="THWC") for v, p in zip(videos_BCTHW, paths)]
