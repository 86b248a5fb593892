"""How the video and text token sequences are split, and every collective that moves them.

Layout rules (S = tokens, B = batch, D = width, h = heads, d = head dim):

* Context parallel (Ulysses, group `cp`): rank c holds latent frames [c*T/cp, (c+1)*T/cp) and the
  matching text slice. The split is a plain slice of the inputs, so every parameter gradient on a
  CP rank is that rank's share; the data-parallel reduction over (DP x CP) sums the shares.
  Inside attention an all-to-all trades the sequence split for a head split, so each rank sees
  the full sequence for h / cp heads and Skiparse regrouping is local.
* Sequence parallel (Megatron, group `tp`): inside a CP rank, norms and elementwise regions hold
  S / tp tokens; column-parallel linears all-gather the sequence, row-parallel ones
  reduce-scatter it. Replicated parameters that touch sequence-split tokens are tagged
  `sequence_parallel=True`, and Megatron's `finalize_model_grads` sums their gradients over TP.
* Replicated conditioning (the timestep embedding) enters the sequence-split region through
  `sum_grads_over_sequence_shards`, so its gradient is the sum over all token shards.

Model code receives a `ParallelPlan` and calls these functions; it never reads global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import mappings


@dataclass(frozen=True)
class ParallelPlan:
    """The parallel layout one process runs in: sizes, ranks and explicit process groups.

    Built once per stage by `megatron_video.parallel.setup.build_parallel_plan` (the one reader of
    Megatron's global `parallel_state`) and handed to the model, the trainer, checkpointing and
    sampling. The defaults describe a single process.
    """

    tensor_parallel: int = 1
    """Tensor-parallel ranks (`parallel.tensor_parallel`)."""

    tensor_parallel_rank: int = 0
    context_parallel: int = 1
    """Ulysses context-parallel ranks (`parallel.context_parallel`)."""

    context_parallel_rank: int = 0
    pipeline_parallel: int = 1
    """Pipeline stages (`parallel.pipeline_parallel`)."""

    pipeline_parallel_rank: int = 0
    virtual_pipeline: int | None = None
    """Model chunks per pipeline stage under the interleaved schedule (`parallel.virtual_pipeline`)."""

    data_parallel: int = 1
    """Data-parallel replicas (the world divided by tp x cp x pp)."""

    data_parallel_rank: int = 0
    sequence_parallel: bool = False
    tensor_parallel_group: Any = None
    context_parallel_group: Any = None
    pipeline_parallel_group: Any = None
    data_parallel_group: Any = None
    """Replicas of this rank's model shard (same tp, cp and pp rank)."""

    data_context_parallel_group: Any = None
    """Data x context parallel: the group gradients are averaged over."""

    tensor_context_parallel_group: Any = None
    """Tensor x context parallel: the ranks of one replica stage that read the same batches."""

    groups: Any = None
    """Megatron's `ProcessGroupCollection` holding the same groups, for Megatron APIs that take one."""

    linear_config: Any = None
    """Megatron ModelParallelConfig for the tensor-parallel linears (carries sequence_parallel)."""

    conditioning_config: Any = None
    """The same config with sequence_parallel off and fp32 parameters, for linears fed by
    per-sample conditioning (AdaLN): they stay fp32 whatever the runtime dtype."""

    @property
    def sequence_parallel_size(self) -> int:
        """Ranks the token sequence of one CP shard is split over (TP under sequence parallel)."""
        return self.tensor_parallel if self.sequence_parallel else 1

    @property
    def pipeline_last_rank(self) -> int:
        """Global rank of the last pipeline stage of this rank's pipeline."""
        if self.pipeline_parallel_group is None:
            return dist.get_rank() if dist.is_initialized() else 0
        return dist.get_process_group_ranks(self.pipeline_parallel_group)[-1]


# ---------------------------------------------------------------------------------------------
# Entering and leaving the split layout (context parallel: plain slices; sequence parallel: Megatron)
# ---------------------------------------------------------------------------------------------


def split_frames_for_context_parallel(video_BCTHW: torch.Tensor, plan: ParallelPlan) -> torch.Tensor:
    """This CP rank's contiguous block of latent frames (dim 2)."""
    if plan.context_parallel == 1:
        return video_BCTHW
    frames = video_BCTHW.shape[2]
    if frames % plan.context_parallel != 0:
        raise ValueError(
            f"{frames} latent frames cannot be split over context_parallel={plan.context_parallel}; "
            "use a frame count whose latent length is divisible by it"
        )
    n = frames // plan.context_parallel
    return video_BCTHW[:, :, plan.context_parallel_rank * n : (plan.context_parallel_rank + 1) * n]


def split_tokens_for_context_parallel(tokens_SBD: torch.Tensor, plan: ParallelPlan) -> torch.Tensor:
    """This CP rank's contiguous slice of a sequence-first tensor (text tokens)."""
    if plan.context_parallel == 1:
        return tokens_SBD
    s = tokens_SBD.shape[0]
    if s % plan.context_parallel != 0:
        raise ValueError(
            f"{s} text tokens cannot be split over context_parallel={plan.context_parallel}; "
            "pad the text length to a multiple of it"
        )
    n = s // plan.context_parallel
    return tokens_SBD[plan.context_parallel_rank * n : (plan.context_parallel_rank + 1) * n]


def scatter_to_sequence_parallel(tokens_SBD: torch.Tensor, plan: ParallelPlan) -> torch.Tensor:
    """Full (CP-local) sequence -> this TP rank's slice; backward all-gathers."""
    if plan.sequence_parallel_size == 1:
        return tokens_SBD
    if tokens_SBD.shape[0] % plan.tensor_parallel != 0:
        raise ValueError(
            f"{tokens_SBD.shape[0]} tokens cannot be split over tensor_parallel={plan.tensor_parallel} "
            "under sequence parallel; adjust the shape or disable sequence_parallel"
        )
    return mappings.scatter_to_sequence_parallel_region(tokens_SBD, group=plan.tensor_parallel_group)


def gather_from_sequence_parallel(tokens_SBD: torch.Tensor, plan: ParallelPlan) -> torch.Tensor:
    """This TP rank's slice -> full (CP-local) sequence, used identically on every TP rank."""
    if plan.sequence_parallel_size == 1:
        return tokens_SBD
    return mappings.gather_from_sequence_parallel_region(
        tokens_SBD, tensor_parallel_output_grad=False, group=plan.tensor_parallel_group
    )


def gather_frames_from_context_parallel(video_BCTHW: torch.Tensor, plan: ParallelPlan) -> torch.Tensor:
    """Concatenate every CP rank's frames (dim 2); each rank then holds the full video.

    The backward keeps this rank's slice of the (identical) output gradient.
    """
    if plan.context_parallel == 1:
        return video_BCTHW
    moved_TBCHW = video_BCTHW.transpose(0, 2).contiguous()
    gathered = mappings.gather_from_sequence_parallel_region(
        moved_TBCHW, tensor_parallel_output_grad=False, group=plan.context_parallel_group
    )
    return gathered.transpose(0, 2)


def sum_grads_over_sequence_shards(x: torch.Tensor, plan: ParallelPlan) -> torch.Tensor:
    """Identity forward; under sequence parallel the backward sums the gradient over TP ranks.

    Use it where a per-sample tensor (AdaLN modulation) meets sequence-split tokens: each TP
    rank's gradient then covers only its tokens, and the sum restores the full gradient.
    """
    if plan.sequence_parallel_size == 1:
        return x
    return mappings.copy_to_tensor_model_parallel_region(x, group=plan.tensor_parallel_group)


def mark_sequence_parallel_params(module: torch.nn.Module, plan: ParallelPlan) -> None:
    """Tag replicated parameters that see sequence-split tokens, for the TP gradient sum."""
    for p in module.parameters():
        p.sequence_parallel = plan.sequence_parallel


# ---------------------------------------------------------------------------------------------
# Ulysses all-to-all over the context-parallel group
# ---------------------------------------------------------------------------------------------


def ulysses_seq_to_head(x_SBhd: torch.Tensor, plan: ParallelPlan) -> torch.Tensor:
    """[S/cp, B, h, d] -> [S, B, h/cp, d]: gather the sequence, scatter the heads."""
    if plan.context_parallel == 1:
        return x_SBhd
    cp = plan.context_parallel
    s, b, h, d = x_SBhd.shape
    chunks = x_SBhd.reshape(s, b, cp, h // cp, d).permute(2, 0, 1, 3, 4).contiguous()
    out = mappings.all_to_all(plan.context_parallel_group, chunks.reshape(cp * s, b, h // cp, d))
    return out.reshape(cp * s, b, h // cp, d)


def ulysses_head_to_seq(x_SBhd: torch.Tensor, plan: ParallelPlan) -> torch.Tensor:
    """[S, B, h/cp, d] -> [S/cp, B, h, d]: the inverse of `ulysses_seq_to_head`."""
    if plan.context_parallel == 1:
        return x_SBhd
    cp = plan.context_parallel
    s, b, hc, d = x_SBhd.shape
    out = mappings.all_to_all(plan.context_parallel_group, x_SBhd.contiguous())
    return out.reshape(cp, s // cp, b, hc, d).permute(1, 2, 0, 3, 4).reshape(s // cp, b, cp * hc, d)


def world_info() -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) when not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
