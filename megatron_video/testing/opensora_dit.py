"""Small Open-Sora-Plan v1.2 / v1.3 DiT models and inputs for tests and benchmarks."""

from __future__ import annotations

import dataclasses

import torch

from megatron_video.config.schema import ParallelConfig
from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.opensora_dit.model import OpenSoraDiT
from megatron_video.parallel.setup import build_parallel_plan
from megatron_video.parallel.tensor_parallel_state import partition_dims, shard_state_dict
from megatron_video.testing.models import tiny_config


def tiny_dit_config(parallel: dict | None = None, version: str = "v1.3", **model_overrides):
    """ExperimentConfig holding the tiny DiT flavor of `version`, fp32, and the given parallel layout."""
    model = OpenSoraDiTConfig.from_flavor("tiny", version=version, **model_overrides)
    cfg = dataclasses.replace(tiny_config(), model=model, parallel=ParallelConfig(**(parallel or {})))
    cfg.validate()
    return cfg


def build_dit(
    cfg, inpaint_mask_channels: int | None = None, blocks: range | None = None, plan=None
) -> OpenSoraDiT:
    """DiT model (or pipeline chunk) over the initialised megatron groups."""
    return OpenSoraDiT(
        cfg.model,
        plan if plan is not None else build_parallel_plan(cfg),
        inpaint_mask_channels=inpaint_mask_channels,
        blocks=blocks,
    )


def random_dit_inputs(
    cfg,
    batch: int,
    frames: int,
    height: int,
    width: int,
    text_len: int,
    seed: int = 0,
    masks: bool = True,
    inpaint_mask_channels: int | None = None,
) -> dict[str, torch.Tensor]:
    """Latents, DDPM timesteps, text and masks (and I2V conditions) for `cfg.model`."""
    m = cfg.model
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "latents_BCTHW": torch.randn(batch, m.in_channels, frames, height, width, generator=gen),
        "timestep_B": torch.randint(0, 1000, (batch,), generator=gen).float(),
        "text_BLC": torch.randn(batch, text_len, m.caption_channels, generator=gen),
    }
    if masks:
        text_mask = torch.ones(batch, text_len)
        text_mask[-1, text_len // 2 :] = 0
        video_mask = torch.ones(batch, frames, height, width)
        video_mask[0, -1, : height // 2] = 0
        inputs["text_mask_BL"] = text_mask
        inputs["video_mask_BTHW"] = video_mask
    if inpaint_mask_channels is not None:
        inputs["masked_latents_BCTHW"] = torch.randn(
            batch, m.in_channels, frames, height, width, generator=gen
        )
        inputs["inpaint_mask_BMTHW"] = (
            torch.rand(batch, inpaint_mask_channels, frames, height, width, generator=gen) > 0.5
        ).float()
    return inputs


def shard_for_model(state: dict[str, torch.Tensor], model: OpenSoraDiT) -> dict[str, torch.Tensor]:
    """The part of a full state dict that `model` (a pipeline chunk at any TP rank) holds, split
    along its tensor-parallel dims; loads with `load_state_dict(..., strict=False)`."""
    own = [k for k in model.state_dict() if not k.endswith("_extra_state")]
    plan = model.plan
    subset = {k: state[k] for k in own}
    return shard_state_dict(subset, partition_dims(model), plan.tensor_parallel_rank, plan.tensor_parallel)
