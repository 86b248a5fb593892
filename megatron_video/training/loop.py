"""The training loop shared by pretrain_t2v.py and pretrain_i2v.py.

One optimizer step:
    for each micro-batch: objective.training_loss(model, x0, cond) -> backward (scaled for
    accumulation and for the (DP x CP) gradient average) -> finalize_grads (DP x CP
    reduction, TP sums of sequence-parallel / QK-norm grads, pipeline sums of replicated embedders) -> clipping rule (clip, or skip on
    NaN / extreme norms) -> AdamW -> LR schedule -> EMA.
With `parallel.overlap_grad_reduce` the reduction of the last micro-batch's gradients runs during its
backward pass (earlier micro-batches accumulate under `no_sync`); with `overlap_param_gather` the
updated parameters are gathered during the next forward pass, and the EMA update of a step waits
for it (overlap.py).
Sigma and noise come from a generator seeded by (seed, step, micro-batch, DP rank), so every TP /
CP rank of a replica draws the same values and a resumed run draws what the original would have.

With pipeline parallelism the model is a list of chunks (one per virtual stage) and Megatron's
1F1B schedule (interleaved for several chunks) runs the micro-batches. Every stage reads the same
micro-batches and seeds the same generators: the first chunk embeds the noisy input the objective
builds, the last computes the loss from the same sigma and noise, and the chunks in between only
pass the hidden states on (megatron_video/parallel/pipeline.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel
from megatron.core.utils import get_attr_wrapped_model
from torch import nn

from megatron_video.config.schema import ExperimentConfig
from megatron_video.data.batches import BatchSource, TrainBatch, step_generators
from megatron_video.diffusion import DDPMObjective, FlowMatching
from megatron_video.models.suv.model import SUVModel
from megatron_video.parallel.pipeline import run_pipeline_schedule
from megatron_video.platform.launch import Runtime
from megatron_video.training.ema import ParamEMA
from megatron_video.training.grad_clip import BatchDropClip, build_clipper
from megatron_video.training.optim import (
    build_optimizer,
    local_grad_norm,
    optimizer_step,
    scale_local_grads,
    uses_distributed_optimizer,
)
from megatron_video.training.overlap import (
    CommOverlap,
    ddp_config,
    finalize_grads,
    finish_param_gather,
    resolve_overlap,
    sync_params,
)


def build_objective(cfg: ExperimentConfig, dp_rank: int, dp_size: int):
    """The configured diffusion objective."""
    o = cfg.training.objective
    if o.kind == "flow":
        return FlowMatching(weighting=o.weighting, shift=o.shift, patch_size=cfg.model.patch_size)
    return DDPMObjective(
        prediction=o.kind,
        zero_terminal_snr=o.zero_terminal_snr,
        snr_gamma=o.snr_gamma,
        noise_offset=o.noise_offset,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )


def wrap_ddp(
    model: torch.nn.Module,
    plan,
    distributed_optimizer: bool,
    overlap: CommOverlap | None = None,
    disable_bucketing: bool = False,
) -> DistributedDataParallel:
    """Megatron DDP with fp32 gradient reduction and the given communication overlap (none by default)."""
    return DistributedDataParallel(
        config=plan.linear_config,
        ddp_config=ddp_config(overlap or CommOverlap(), distributed_optimizer),
        module=model,
        disable_bucketing=disable_bucketing,
    )


def hidden_states_for_next_stage(objective, chunk, batch: TrainBatch, generators) -> torch.Tensor:
    """The chunk's output (packed hidden states) on a pipeline stage that does not hold the output head.

    The objective draws sigma (or timesteps) and noise and builds the noisy input exactly as on the
    last stage; the chunk's output is what the schedule sends on.
    """
    inputs = objective.noised_inputs(batch.x0_BCTHW, generators)
    return chunk(inputs.x_t, inputs.timesteps, **batch.cond)


class UniqueParameters(nn.Module):
    """The parameters of several model chunks under their (global) names, replicated ones once.

    Pipeline chunks on one rank each hold a copy of the conditioning embedder; the copies stay
    equal (same gradient after finalize_model_grads), so the EMA tracks one of them.
    """

    def __init__(self, chunks: list[nn.Module]):
        super().__init__()
        self._chunks = list(chunks)  # a plain list: names are the chunks' own, without a prefix

    def named_parameters(self, *args, **kwargs):
        seen = set()
        for chunk in self._chunks:
            for name, p in chunk.named_parameters(*args, **kwargs):
                if name not in seen:
                    seen.add(name)
                    yield name, p


@dataclass
class Trainer:
    """Model, optimizer, EMA and clipping for one stage, and the step that drives them."""

    cfg: ExperimentConfig
    runtime: Runtime
    model: SUVModel | list[SUVModel]
    """The model, or this pipeline rank's chunks (one per virtual stage) when PP > 1."""

    ddp: DistributedDataParallel = field(init=False)
    optimizer: Any = field(init=False)
    scheduler: Any = field(init=False)
    ema: ParamEMA | None = field(init=False)
    clipper: Any = field(init=False)
    objective: Any = field(init=False)
    step: int = 0
    consumed_samples: int = 0
    consecutive_skipped_steps: int = 0
    """Optimizer steps skipped in a row by the clipping rule, up to the last one (0 after a taken step)."""
    before_optimizer_step: Callable[[Trainer], None] | None = None
    """Test hook called with gradients reduced and before the clipping decision."""

    def __post_init__(self):
        cfg, rt = self.cfg, self.runtime
        dist_opt = uses_distributed_optimizer(cfg.training, cfg.runtime.dtype, rt.data_parallel)
        chunks = self.model if isinstance(self.model, list) else [self.model]
        if rt.pipeline_parallel > 1 and not isinstance(self.model, list):
            raise TypeError("with pipeline parallelism the Trainer takes this rank's list of model chunks")
        self.overlap = resolve_overlap(cfg, rt.data_parallel, dist_opt)
        # As Megatron does: only the first chunk's reduction is on the critical path, so only it is bucketed.
        self._ddp_chunks = [
            wrap_ddp(chunk, rt.plan, dist_opt, self.overlap, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.ddp = self._ddp_chunks[0]
        self.optimizer, self.scheduler = build_optimizer(
            self._ddp_chunks, cfg.training, cfg.runtime.dtype, rt.data_parallel
        )
        t = cfg.training
        self._ema_params = chunks[0] if len(chunks) == 1 else UniqueParameters(chunks)
        self.ema = ParamEMA(self._ema_params, t.ema_decay) if t.ema_decay is not None else None
        self.clipper = build_clipper(t.clip.mode, t.clip.max_norm, t.clip.ema_decay)
        self.objective = build_objective(cfg, rt.data_parallel_rank, rt.data_parallel)
        self.accumulation = t.accumulation_steps(rt.data_parallel)
        self._ema_pending = False  # the last step's EMA update, waiting for its parameters' gather

    @property
    def ema_module(self) -> nn.Module:
        """The module whose named parameters the EMA tracks (the model, or every chunk's once)."""
        return self._ema_params

    @property
    def model_chunks(self) -> list:
        """DDP-wrapped model chunks (one without virtual pipelining)."""
        return list(self._ddp_chunks)

    def train_step(self, source: BatchSource) -> dict:
        """One optimizer step over `accumulation` micro-batches; returns metrics (equal on all ranks)."""
        rt, t = self.runtime, self.cfg.training
        cp = rt.plan.context_parallel
        for chunk in self._ddp_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = []
        if rt.pipeline_parallel > 1:
            losses = self._pipeline_micro_batches(source)
        else:
            for micro in range(self.accumulation):
                # Only the last micro-batch's backward pass marks gradients ready for reduction.
                last = micro == self.accumulation - 1
                with contextlib.nullcontext() if last else self.ddp.no_sync():
                    batch = source.next_batch()
                    gen = self._generators(micro, batch)
                    loss = self.objective.training_loss(
                        self.ddp, batch.x0_BCTHW, batch.cond, gen, batch.loss_mask_BTHW
                    )
                    # DDP averages over (DP x CP); each CP rank holds a share of the gradient.
                    (loss * cp / self.accumulation).backward()
                losses.append(loss.detach().clone())
        self._apply_pending_ema()  # the forward passes gathered the last step's parameters
        if isinstance(self.clipper, BatchDropClip):
            self._drop_abnormal_ranks()
        finalize_grads(self.model_chunks, rt.plan)
        if self.before_optimizer_step is not None:
            self.before_optimizer_step(self)
        result = optimizer_step(self.optimizer, self.clipper)
        self.consecutive_skipped_steps = self.consecutive_skipped_steps + 1 if result.action == "skip" else 0
        if result.action != "skip":
            self.scheduler.step(increment=t.global_batch_size)
            if self.ema is not None:
                self._ema_pending = True
                if not self.overlap.param_gather:
                    self._apply_pending_ema()
        self.step += 1
        self.consumed_samples += t.global_batch_size
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        if rt.pipeline_parallel > 1:  # only the last stage computed the loss
            dist.broadcast(loss, src=rt.plan.pipeline_last_rank, group=rt.plan.pipeline_parallel_group)
        dist.all_reduce(loss, group=rt.plan.data_parallel_group)
        return {
            "loss": loss.item() / rt.data_parallel,
            "grad_norm": result.grad_norm,
            "clip_threshold": result.threshold,
            "skipped_steps": self.clipper.skipped_steps,
            "lr": result.lr,
        }

    def sync_params(self) -> None:
        """Make the parameters and the EMA current (collective): call before reading them outside
        `train_step` (checkpoints, exports, evaluation). Under `overlap_param_gather` the last step's
        updated parameters are otherwise gathered only by the next forward pass."""
        sync_params(self._ddp_chunks)
        self._apply_pending_ema()

    def _apply_pending_ema(self) -> None:
        if self._ema_pending:
            finish_param_gather(self._ddp_chunks)
            self.ema.update(self._ema_params)
            self._ema_pending = False

    def _generators(self, micro: int, batch: TrainBatch) -> list[torch.Generator]:
        """Per-sample generators of micro-batch `micro`, keyed by position in the global batch."""
        t = self.cfg.training
        first = (self.runtime.data_parallel_rank * self.accumulation + micro) * t.micro_batch_size
        return step_generators(t.seed, self.step, range(first, first + batch.x0_BCTHW.shape[0]))

    def _pipeline_micro_batches(self, source: BatchSource) -> list[torch.Tensor]:
        """Forward and backward of every micro-batch through the pipeline schedule.

        Each chunk reads micro-batches 0, 1, ... in order; the source is read once per micro-batch
        and what it gave is kept for this rank's other chunks. Returns the losses (last stage only).
        """
        batches: list[TrainBatch] = []

        def micro_batches():
            for micro in range(self.accumulation):
                if micro == len(batches):
                    batches.append(source.next_batch())
                yield micro, batches[micro]

        def forward_step(data_iterator, chunk):
            micro, batch = next(data_iterator)
            gen = self._generators(micro, batch)
            if not get_attr_wrapped_model(chunk, "post_process"):
                return hidden_states_for_next_stage(self.objective, chunk, batch, gen), None
            loss = self.objective.training_loss(chunk, batch.x0_BCTHW, batch.cond, gen, batch.loss_mask_BTHW)
            # The schedule scales the returned loss in place by cp / micro-batches before backward.
            return loss, lambda out: (out, {"loss": out.detach().clone()})

        reports = run_pipeline_schedule(
            forward_step,
            self._ddp_chunks,
            [micro_batches() for _ in self._ddp_chunks],
            self.accumulation,
            self.cfg.training.micro_batch_size,
            self.runtime.device,
        )
        return [r["loss"] for r in reports]

    def _drop_abnormal_ranks(self) -> None:
        """v1.3 batch dropping: weigh each DP rank's local gradient before the reduction."""
        group = self.runtime.plan.data_parallel_group
        norm = torch.tensor([local_grad_norm(self.model_chunks)], dtype=torch.float64)
        norms = [torch.zeros_like(norm) for _ in range(dist.get_world_size(group))]
        dist.all_gather(norms, norm, group=group)
        weights = self.clipper.rank_weights([float(n) for n in norms])
        scale_local_grads(self.model_chunks, weights[dist.get_rank(group)])

    def train_state(self) -> dict:
        """Everything besides tensors that a resume needs."""
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "clip": self.clipper.state_dict(),
            "consecutive_skipped_steps": self.consecutive_skipped_steps,
        }

    def load_train_state(self, state: dict) -> None:
        """Restore counters and clipping statistics."""
        self.step = state["step"]
        self.consumed_samples = state["consumed_samples"]
        self.clipper.load_state_dict(state["clip"])
        self.consecutive_skipped_steps = state.get("consecutive_skipped_steps", 0)
