"""A stage's plan: its layout from the config, memory, step prediction and whether it fits."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_video.config.schema import ExperimentConfig
from megatron_video.planning.devices import Device
from megatron_video.planning.flops import video_tokens
from megatron_video.planning.memory import (
    FROZEN_ENCODER_PARAMS,
    GB,
    Layout,
    MemoryBreakdown,
    memory_breakdown,
)
from megatron_video.planning.step import StepPrediction, predict_step

FRAGMENTATION = 0.05
"""Allocator slack on top of the predicted peak of live tensors when deciding whether a layout fits."""


def _encoder_bytes(name: str, dtype: str | None) -> int:
    params = FROZEN_ENCODER_PARAMS.get(
        name, FROZEN_ENCODER_PARAMS["wfvae:wfvae_8x8x8_d32"] if name.startswith("wfvae") else 0
    )
    return params * (2 if dtype in ("bfloat16", "float16") else 4)


def vae_working_bytes(cfg: ExperimentConfig) -> float:
    """Estimate of the VAE's encoding working set for one micro-batch: four live feature maps of its
    first level (base channels at half the pixel resolution after the wavelet transform) over one
    temporal chunk, in fp32. An estimate, not validated against measurement."""
    vae = cfg.vae.model_config()
    channels = getattr(vae, "base_channels", 128)
    stride_t, _ = cfg.vae.strides
    frames = min(cfg.shape.num_frames, stride_t + 1)
    return (
        4
        * 4
        * channels
        * frames
        * (cfg.shape.height // 2)
        * (cfg.shape.width // 2)
        * cfg.training.micro_batch_size
    )


def layout_from_config(cfg: ExperimentConfig, devices: int) -> Layout:
    """The layout `cfg` describes on `devices` devices (data parallel fills the rest)."""
    p, t, m = cfg.parallel, cfg.training, cfg.model
    dp = devices // p.model_parallel_size
    encoders: list[tuple[str, int]] = []
    online = cfg.features.cache_dir is None and cfg.data.data_list is not None
    if online:
        encoders.append(("vae", _encoder_bytes(f"{cfg.vae.kind}:{cfg.vae.flavor}", None)))
        encoders.append(("text", _encoder_bytes(cfg.text.context.kind, cfg.text.context.dtype)))
        if cfg.text.pooled is not None:
            encoders.append(("pooled text", _encoder_bytes(cfg.text.pooled.kind, cfg.text.pooled.dtype)))
    multi = devices > 1
    return Layout(
        tp=p.tensor_parallel,
        sp=p.sequence_parallel,
        cp=p.context_parallel,
        pp=p.pipeline_parallel,
        vpp=p.virtual_pipeline,
        dp=dp,
        micro_batch=t.micro_batch_size,
        micro_batches=t.global_batch_size // (t.micro_batch_size * dp),
        recompute=m.recompute,
        recompute_num_layers=m.recompute_num_layers,
        linear_bytes=2 if cfg.runtime.dtype == "bf16" else 4,
        distributed_optimizer=t.optimizer.distributed_optimizer and (cfg.runtime.dtype == "bf16" or dp > 1),
        ema=t.ema_decay is not None,
        online_encoders=tuple(encoders),
        vae_working_bytes=vae_working_bytes(cfg) if online else 0.0,
        overlap_grad_reduce=bool(getattr(p, "overlap_grad_reduce", True)) and multi,
        overlap_param_gather=bool(getattr(p, "overlap_param_gather", True)) and multi,
    )


@dataclass
class StagePlan:
    """Memory and step of one stage on one cluster."""

    layout: Layout
    memory: MemoryBreakdown
    step: StepPrediction
    device: Device
    video_tokens: int
    text_tokens: int

    @property
    def needed_gb(self) -> float:
        """Predicted peak with allocator slack and the device's reserved memory, GB."""
        return self.memory.total * (1 + FRAGMENTATION) / GB + self.device.reserved_gb

    @property
    def fits(self) -> bool:
        """Whether the predicted peak (with slack) fits the device."""
        return self.needed_gb <= self.device.memory_gb


def plan_stage(
    cfg: ExperimentConfig, devices: int, device: Device, layout: Layout | None = None
) -> StagePlan:
    """Plan `cfg` (or `layout` in its place) on `devices` x `device` at the config's largest sample shape."""
    layout = layout or layout_from_config(cfg, devices)
    n = video_tokens(cfg.model, cfg.latent_grid)
    lt = cfg.shape.text_length
    memory = memory_breakdown(cfg.model, layout, n, lt)
    step = predict_step(cfg.model, layout, device, n, lt, cfg.training.global_batch_size)
    return StagePlan(layout, memory, step, device, n, lt)
