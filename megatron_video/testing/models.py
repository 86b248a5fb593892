"""Small SUV models and inputs for tests and benchmarks."""

from __future__ import annotations

import torch

from megatron_video.config import build_config
from megatron_video.models.common.layers import LayerNormFP32, RMSNorm
from megatron_video.models.suv.model import SUVModel
from megatron_video.parallel.setup import build_parallel_plan


def tiny_config(parallel: dict | None = None, **model_overrides):
    """ExperimentConfig with the tiny SUV flavor, fp32, and the given parallel layout."""
    data = {
        "model": {"flavor": "tiny", **model_overrides},
        "parallel": dict(parallel or {}),
        "shape": {"text_length": 8, "height": 64, "width": 64, "num_frames": 1},
    }
    return build_config(data)


def build_model(cfg, backend: str = "sdpa", inpaint_mask_channels: int | None = None) -> SUVModel:
    """SUV model over the initialised megatron groups (an I2V model with `inpaint_mask_channels`)."""
    return SUVModel(
        cfg.model,
        build_parallel_plan(cfg),
        attention_backend=backend,
        inpaint_mask_channels=inpaint_mask_channels,
    )


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Fill every parameter with N(0, std), norm scales with 1 + N(0, std); return the state dict.

    Zero-initialised tensors (AdaLN, skips) get random values too, so every path carries signal.
    Parameters are visited in sorted-name order, so a seed gives the same weights everywhere.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_scales = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, (LayerNormFP32, RMSNorm)) and getattr(m, "weight", None) is not None
    }
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(noise + 1 if name in norm_scales else noise)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def random_inputs(
    cfg,
    batch: int,
    frames: int,
    height: int,
    width: int,
    text_len: int,
    seed: int = 0,
    masks: bool = True,
    inpaint_mask_channels: int | None = None,
):
    """Latents, timesteps, text, pooled text and masks (and I2V conditions) for `cfg.model`."""
    m = cfg.model
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "latents_BCTHW": torch.randn(batch, m.in_channels, frames, height, width, generator=gen),
        "timestep_B": torch.rand(batch, generator=gen) * 1000,
        "text_BLC": torch.randn(batch, text_len, m.caption_channels, generator=gen),
        "pooled_BP": torch.randn(batch, m.pooled_projection_dim, generator=gen),
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
