"""Data-parallel communication overlapped with compute (Megatron DDP and distributed optimizer).

Gradient reduction: Megatron DDP groups the gradient buffer into buckets (`parallel.bucket_size`
parameters each, in reverse order of registration, which is roughly the order the backward pass
produces them). With `overlap_grad_reduce` a bucket's reduce-scatter (all-reduce with the plain
optimizer) starts asynchronously as soon as the backward pass of the step's last micro-batch has
produced all its gradients; earlier micro-batches run under `no_sync` and only accumulate.
`finalize_model_grads` then waits for the reductions that are still running.

Parameter gather: after the distributed optimizer's step each rank holds the updated values of its
own shard only. With `overlap_param_gather` the all-gather of bucket i is started when the forward
pass first needs it and bucket i + 1's is started as bucket i's arrives, so the gather hides behind
the next forward pass. Until that forward pass, the parameters outside this rank's shard are
stale: whatever reads parameters outside a forward pass (checkpoints, exports, the EMA) goes
through `sync_params` / `finish_param_gather` first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads

from megatron_video.config.schema import ExperimentConfig
from megatron_video.training.optimizer_state import CheckpointMismatchError


@dataclass(frozen=True)
class CommOverlap:
    """What the data-parallel communication of one run overlaps (the resolved `parallel.overlap_*`)."""

    grad_reduce: bool = False
    """Reduce gradients bucket by bucket during the last micro-batch's backward pass."""

    param_gather: bool = False
    """All-gather updated parameters bucket by bucket during the next forward pass."""

    bucket_size: int | None = None
    """Parameters per bucket; None: Megatron's default (used only when grad_reduce is on)."""


def resolve_overlap(cfg: ExperimentConfig, data_parallel: int, distributed_optimizer: bool) -> CommOverlap:
    """The run's overlap from `cfg.parallel`: unset settings are on when gradients are reduced over
    more than one rank (data parallel x context parallel), the gather only with the distributed
    optimizer running, the reduction not under batch dropping (which needs unreduced gradients)."""
    p = cfg.parallel
    communicates = data_parallel * p.context_parallel > 1
    grad_reduce = p.overlap_grad_reduce
    if grad_reduce is None:
        grad_reduce = communicates and cfg.training.clip.mode != "batch_drop"
    param_gather = p.overlap_param_gather
    if param_gather is None:
        param_gather = communicates
    # Without the distributed optimizer (fp32 at one data-parallel rank) nothing is gathered.
    param_gather = bool(param_gather and grad_reduce and distributed_optimizer)
    return CommOverlap(bool(grad_reduce), param_gather, p.bucket_size)


def ddp_config(overlap: CommOverlap, distributed_optimizer: bool) -> DistributedDataParallelConfig:
    """Megatron's DDP settings: fp32 gradient reduction, the given overlap and buckets."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap.grad_reduce,
        overlap_param_gather=overlap.param_gather,
        use_distributed_optimizer=distributed_optimizer,
        bucket_size=overlap.bucket_size,
    )


def finalize_grads(ddp_chunks: list, plan) -> None:
    """Megatron's `finalize_model_grads` (DP x CP reduction or the wait for it, TP sums), with the
    pipeline-replicated conditioning embedder summed over the pipeline from complete gradients.

    Megatron sums the embedder copies' `main_grad` over the pipeline group after the data-parallel
    reduction. Under the distributed optimizer that reduction is a reduce-scatter: a rank's buffer
    holds reduced values only on its own shard, and the shards of one parameter lie at different
    offsets on different pipeline stages (their buffers hold different parameters, in buckets of
    their own), so the sum would mix reduced and unreduced values. Here the embedder gradients are
    first completed over data parallel (each rank contributes its shard), then summed over the
    chunks and the pipeline.
    """
    config = ddp_chunks[0].config
    saved = getattr(config, "has_cond_embedder", False)
    config.has_cond_embedder = False  # summed below instead
    try:
        finalize_model_grads(ddp_chunks)
    finally:
        config.has_cond_embedder = saved
    replicated = plan.pipeline_parallel > 1 and saved
    if replicated:
        _complete_sharded_grads(ddp_chunks)
        _sum_replicated_grads(ddp_chunks, plan.pipeline_parallel_group)


def _replicated_params(chunk) -> list:
    return [(n, p) for n, p in chunk.module.named_parameters() if getattr(p, "pipeline_parallel", False)]


@torch.no_grad()
def _complete_sharded_grads(ddp_chunks: list) -> None:
    """After a reduce-scatter: the replicated parameters' full reduced gradients on every rank."""
    for chunk in ddp_chunks:
        if not chunk.ddp_config.use_distributed_optimizer:
            continue
        by_group: dict = {}
        for _, p in _replicated_params(chunk):
            by_group.setdefault(chunk.param_to_bucket_group[p], []).append(p)
        for group, params in by_group.items():
            rank, size = (
                group.intra_distributed_optimizer_instance_rank,
                group.intra_distributed_optimizer_instance_size,
            )
            pieces = []
            for p in params:
                bucket = group.param_to_bucket[p]
                shard = bucket.grad_data.numel() // size
                start, end = bucket.param_to_index[p]
                lo, hi = max(start, rank * shard), min(end, (rank + 1) * shard)
                mine = torch.zeros_like(p.main_grad).view(-1)
                if lo < hi:
                    mine[lo - start : hi - start] = p.main_grad.view(-1)[lo - start : hi - start]
                pieces.append(mine)
            flat = torch.cat(pieces)
            dist.all_reduce(flat, group=group.intra_distributed_optimizer_instance_group)
            for p, full in zip(params, flat.split([p.numel() for p in params])):
                p.main_grad.copy_(full.view_as(p.main_grad))


@torch.no_grad()
def _sum_replicated_grads(ddp_chunks: list, pp_group) -> None:
    """Every copy of a replicated parameter gets the sum of all copies' gradients (this rank's chunks,
    then the pipeline group)."""
    copies: dict[str, list] = {}
    for chunk in ddp_chunks:
        for name, p in _replicated_params(chunk):
            copies.setdefault(name, []).append(p.main_grad)
    if not copies:
        return
    totals = [torch.stack(grads).sum(dim=0) for grads in copies.values()]
    flat = torch.cat([t.view(-1) for t in totals])
    dist.all_reduce(flat, group=pp_group)
    for grads, total in zip(copies.values(), flat.split([t.numel() for t in totals])):
        for g in grads:
            g.copy_(total.view_as(g))


def _bucket_groups(chunk) -> list:
    return list(chunk.bucket_groups) + list(chunk.expert_parallel_bucket_groups)


def finish_param_gather(ddp_chunks: list) -> None:
    """Make every parameter current after a forward pass under `overlap_param_gather`.

    The forward pass waited for the buckets its modules use; this waits for a gather that was
    started but not waited for, and gathers (synchronously) a bucket whose gather never started.
    No communication when the forward pass gathered everything. Call before `finalize_model_grads`,
    which resets the bookkeeping for the next step.
    """
    for chunk in ddp_chunks:
        if not chunk.ddp_config.overlap_param_gather:
            continue
        for group in _bucket_groups(chunk):
            if not group.param_gather_dispatched:
                group.start_param_sync(force_sync=True)
            elif group.param_gather_handle is not None:
                group.finish_param_sync(skip_next_bucket_dispatch=True)


def sync_params(ddp_chunks: list) -> None:
    """Gather the parameters now (collective over the data-parallel x context-parallel group), so
    that code outside a forward pass reads current values; a no-op without `overlap_param_gather`."""
    for chunk in ddp_chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def bucket_layout(ddp_chunks: list) -> list:
    """Parameters per DDP bucket, per gradient buffer, per chunk on this rank: where each rank's
    distributed-optimizer shard lies (`parallel.overlap_grad_reduce` and `bucket_size` decide it)."""
    return [
        [[b.numel_unpadded for b in buf.buckets] for buf in getattr(c, "buffers", [])] for c in ddp_chunks
    ]


def gather_bucket_layouts(ddp_chunks: list, pipeline_rank: int) -> dict[str, list]:
    """Pipeline rank (as a string) -> its bucket layout; collective (the layout is the same on every
    TP / CP / DP rank of a pipeline stage). Recorded in checkpoint metadata."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (pipeline_rank, bucket_layout(ddp_chunks)))
    return {str(rank): layout for rank, layout in sorted(everyone, key=lambda item: item[0])}


def check_bucket_layout(meta: dict, ddp_chunks: list, pipeline_rank: int) -> None:
    """Refuse on every rank (collective) to load a 'dp_reshardable' optimizer state, which is stored
    per DDP bucket, into other buckets; a checkpoint without the record was saved with one bucket."""
    mine = bucket_layout(ddp_chunks)
    saved = meta.get("ddp_buckets")
    if saved is None:
        differs = any(len(buckets) > 1 for chunk in mine for buckets in chunk)
    else:
        differs = saved.get(str(pipeline_rank)) != mine
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, differs)
    if any(flags):
        raise CheckpointMismatchError(
            f"checkpoint {meta['path']} stores the distributed optimizer as dp_reshardable (training.checkpoint."
            "optimizer_format), per gradient bucket, and this run's buckets differ; resume with the saving "
            "run's parallel.overlap_grad_reduce and parallel.bucket_size (a checkpoint without this record "
            "was saved with overlap_grad_reduce=false), or save once with optimizer_format=fully_reshardable"
        )
