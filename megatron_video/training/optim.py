"""Megatron optimizer + LR schedule, and one optimizer step under our clipping rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_video.config.training import TrainingConfig


def uses_distributed_optimizer(train: TrainingConfig, dtype: str, data_parallel_size: int) -> bool:
    """Whether Megatron's distributed optimizer runs: when asked for and there is more than one
    data-parallel rank, and always under bf16 (the model mixes bf16 and fp32 parameters, which
    Megatron's plain mixed-precision optimizer cannot checkpoint; at DP = 1 the distributed one
    keeps every fp32 main parameter on the one rank)."""
    if dtype == "bf16":
        return True
    return train.optimizer.distributed_optimizer and data_parallel_size > 1


def build_optimizer(
    model_chunks: list, train: TrainingConfig, dtype: str = "fp32", data_parallel_size: int = 1
):
    """AdamW (Megatron, distributed or not) and its LR / weight-decay scheduler.

    With dtype bf16 Megatron's mixed-precision optimizer keeps an fp32 main copy of every bf16
    parameter (sharded over DP by the distributed optimizer), clips and steps it in fp32 and writes
    it back rounded; fp32 parameters (norms, AdaLN, embedders) are their own main parameters.
    The scheduler counts samples, like Megatron's: it is stepped by the global batch size.
    """
    o = train.optimizer
    config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        use_distributed_optimizer=uses_distributed_optimizer(train, dtype, data_parallel_size),
        clip_grad=0.0,  # clipping is decided by our rule in `optimizer_step`
        bf16=dtype == "bf16",
        fp16=False,  # refused by RuntimeConfig.validate
        params_dtype=torch.float32,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    gbs = train.global_batch_size
    decay_steps = o.decay_steps or train.steps
    style = {"constant": "constant", "linear": "linear", "cosine": "cosine"}[o.schedule]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps * gbs,
        lr_decay_steps=max(decay_steps * gbs, o.warmup_steps * gbs + 1),
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(decay_steps * gbs, 1),
        wd_incr_style="constant",
        # A resume restores only the sample count: the configured settings stay (resume_policy.py).
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


@dataclass
class StepResult:
    """Outcome of one optimizer step."""

    grad_norm: float
    action: str
    threshold: float
    lr: float


@torch.no_grad()
def optimizer_step(optimizer, clipper) -> StepResult:
    """Clip or skip by `clipper`'s rule on the global gradient norm, then step.

    A skipped step (NaN / Inf or an extreme norm) leaves parameters and optimizer state untouched.
    """
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    decision = clipper.decide(grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    if decision.action == "skip":
        return StepResult(grad_norm, "skip", decision.threshold, lr)
    if decision.action == "clip":
        params = optimizer.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, decision.threshold, grad_norm)
    optimizer.step_with_ready_grads()
    return StepResult(grad_norm, decision.action, decision.threshold, lr)


def local_grad_norm(model_chunks: list) -> float:
    """L2 norm of this rank's accumulated (not yet reduced) main gradients; NaN if any is NaN."""
    total = torch.zeros((), dtype=torch.float64)
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None:
                total += g.detach().double().pow(2).sum()
    value = float(total.sqrt())
    return value if math.isfinite(value) else float("nan")


@torch.no_grad()
def scale_local_grads(model_chunks: list, factor: float) -> None:
    """Multiply this rank's unreduced gradients (0 drops them, NaN included)."""
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None:
                if factor == 0.0:
                    g.zero_()
                else:
                    g.mul_(factor)
