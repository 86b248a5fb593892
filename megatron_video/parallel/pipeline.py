"""Pipeline parallelism: which blocks a model chunk holds, what crosses a stage boundary, the schedule.

Layout rules (S = tokens, B = batch, D = width):

* The global block list (U-stage by U-stage) is cut into pp x vpp contiguous chunks. In Megatron's
  interleaved order pipeline rank r holds chunks r, r + pp, r + 2 pp, ... (one without virtual
  pipelining). The first chunk holds the input embeddings (patch embedding, caption projection),
  the last the output head. Block parameter names keep their global positions (`stages.<s>.<i>.`),
  so checkpoints and flat exports do not depend on the layout.
* The conditioning embedder (timestep + pooled text) is replicated on every chunk: every stage
  reads the same batch and draws the same sigma, so it recomputes the embedding instead of
  receiving it. Its parameters carry `pipeline_parallel=True`; Megatron's `finalize_model_grads`
  sums their gradients over the pipeline group (and over a rank's chunks) only when the model
  config has `has_cond_embedder=True`, which `setup.build_transformer_config` sets for PP > 1.
  Without it every copy trains on its own chunk's share of the gradient and the copies drift.
* What crosses a boundary is ONE sequence-first tensor `[x ; c ; skip_x_0 ; skip_c_0 ; ...]`: the
  video stream, the text stream and the U-skips pushed before the boundary and not yet popped,
  oldest first. Each piece is this rank's context-parallel / sequence-parallel shard, so tensor
  rank t of one stage talks to tensor rank t of the next. The length differs from boundary to
  boundary (the number of pending skips), so the config sets `variable_seq_lengths=True` and
  Megatron exchanges the shape before each tensor.
* Message order on gloo: with two pipeline ranks, the previous and the next rank are the same
  process, and gloo matches messages to one peer in posting order. Megatron's batched exchanges
  post `[send_prev, recv_prev, send_next, recv_next]`, so a step that sends an activation and a
  gradient to the same peer swaps them on the receiving side, silently when shapes agree. The
  interleaved schedule does this from its steady state on. Tensors therefore go through
  Megatron's unbatched path under virtual pipelining (`batch_p2p_comm=False`, which posts the
  activation first on both sides), and `OrderedP2PCommunicator` posts the shape exchange, which is
  always batched, in the same activation-first order.
* Waiting on gloo: a send completes only once the peer posts the matching receive. With as many
  micro-batches as pipeline ranks, the first rank runs all its forwards before any backward while
  the last is already in 1F1B, so the last rank sends a gradient's shape that the first receives
  only after its final forward, whose activation the last rank receives only after that shape
  exchange: both wait. The shape exchange therefore waits for its receives only and finishes its
  sends when the schedule ends (upstream waits for all of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from torch import nn

# ---------------------------------------------------------------------------------------------
# Which blocks each chunk holds
# ---------------------------------------------------------------------------------------------


def chunk_block_ranges(
    total_blocks: int, pipeline_parallel: int, virtual_pipeline: int | None = None
) -> list[range]:
    """Global block ranges of all pp x vpp chunks, in pipeline order (earlier chunks take the remainder)."""
    chunks = pipeline_parallel * (virtual_pipeline or 1)
    if chunks > total_blocks:
        raise ValueError(f"{total_blocks} blocks cannot fill {chunks} pipeline chunks")
    size, extra = divmod(total_blocks, chunks)
    ranges, start = [], 0
    for k in range(chunks):
        stop = start + size + (1 if k < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def build_model_chunks(make_chunk: Callable[[range], nn.Module], total_blocks: int) -> list[nn.Module]:
    """This pipeline rank's model chunks, `make_chunk(block_range)` each, one per virtual stage.

    The replicated conditioning parameters are then made equal on every chunk of the pipeline
    (ranks are seeded differently, so a fresh build initialises them differently).
    """
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    ranges = chunk_block_ranges(total_blocks, pp, ps.get_virtual_pipeline_model_parallel_world_size())
    chunks = [make_chunk(blocks) for blocks in ranges[ps.get_pipeline_model_parallel_rank() :: pp]]
    sync_pipeline_replicated_params(chunks, ps.get_pipeline_model_parallel_group())
    return chunks


def mark_pipeline_replicated_params(module: nn.Module, primary: bool) -> None:
    """Tag parameters that every pipeline chunk holds a copy of.

    `pipeline_parallel=True` selects them for Megatron's gradient sum over the pipeline group;
    `shared=True` on every copy but the first chunk's keeps them out of the gradient norm, which
    would otherwise count them once per chunk.
    """
    for p in module.parameters():
        p.pipeline_parallel = True
        p.shared = not primary


@torch.no_grad()
def sync_pipeline_replicated_params(chunks: list[nn.Module], pp_group) -> None:
    """Copy the first pipeline chunk's replicated parameters to every other chunk."""
    first = {n: p for n, p in chunks[0].named_parameters() if getattr(p, "pipeline_parallel", False)}
    if dist.is_initialized() and dist.get_world_size(pp_group) > 1:
        src = dist.get_global_rank(pp_group, 0)
        for p in first.values():
            dist.broadcast(p.data, src=src, group=pp_group)
    for chunk in chunks[1:]:
        for name, p in chunk.named_parameters():
            if getattr(p, "pipeline_parallel", False):
                p.copy_(first[name])


# ---------------------------------------------------------------------------------------------
# What crosses a stage boundary
# ---------------------------------------------------------------------------------------------


def pack_stage_tensors(
    x_SBD: torch.Tensor, c_LBD: torch.Tensor, skips: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """[x ; c ; skip_x_0 ; skip_c_0 ; ...] along the sequence: the one tensor sent to the next stage."""
    return torch.cat([x_SBD, c_LBD, *(t for pair in skips for t in pair)], dim=0)


def unpack_stage_tensors(
    packed_SBD: torch.Tensor | None, n_video: int, n_text: int, num_skips: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Inverse of `pack_stage_tensors` for `n_video` / `n_text` local tokens and `num_skips` skips."""
    if packed_SBD is None:
        raise ValueError(
            "this pipeline chunk received no input tensor; set_input_tensor must precede forward"
        )
    expected = (1 + num_skips) * (n_video + n_text)
    if packed_SBD.shape[0] != expected:
        raise ValueError(
            f"received {packed_SBD.shape[0]} packed tokens, expected (1 + {num_skips} skips) x "
            f"({n_video} video + {n_text} text) = {expected}"
        )
    parts = packed_SBD.split([n_video, n_text] * (1 + num_skips), dim=0)
    return parts[0], parts[1], [(parts[2 + 2 * k], parts[3 + 2 * k]) for k in range(num_skips)]


class OrderedP2PCommunicator(P2PCommunicator):
    """Megatron's P2P communicator with the shape exchange posted activation-first.

    Upstream posts `[send_prev, recv_prev, send_next, recv_next]` in one batch. With two pipeline
    ranks both sends go to the same peer, which receives them in posting order as
    `[recv_prev, recv_next]`, so the gradient's shape lands where the activation's was expected.
    Here both sides post the forward pair (send_next, recv_prev) before the backward pair, and
    wait for the received shapes only; the sends (one request per operation, as gloo gives them)
    are finished by `wait_for_sends` (see this module's docstring).
    Overrides the private `_communicate_shapes` of megatron-core 0.16 (the version pyproject pins).
    """

    def __init__(self, pp_group, config, device: torch.device):
        super().__init__(pp_group=pp_group, config=config)
        self.device = device
        self._pending_sends: list = []  # (request, shape tensor) of shape sends not yet finished

    def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        def shape_of(t):
            return torch.tensor(t.size(), device=self.device, dtype=torch.int64)

        recv_prev_shape = torch.empty(3, device=self.device, dtype=torch.int64) if recv_prev else None
        recv_next_shape = torch.empty(3, device=self.device, dtype=torch.int64) if recv_next else None
        ops = []
        if tensor_send_next is not None:
            ops.append(dist.P2POp(dist.isend, shape_of(tensor_send_next), self.next_rank, self.pp_group))
        if recv_prev_shape is not None:
            ops.append(dist.P2POp(dist.irecv, recv_prev_shape, self.prev_rank, self.pp_group))
        if tensor_send_prev is not None:
            ops.append(dist.P2POp(dist.isend, shape_of(tensor_send_prev), self.prev_rank, self.pp_group))
        if recv_next_shape is not None:
            ops.append(dist.P2POp(dist.irecv, recv_next_shape, self.next_rank, self.pp_group))
        if ops:
            reqs = dist.batch_isend_irecv(ops)
            if len(reqs) != len(ops):  # one coalesced request (NCCL): sends and receives together
                for req in reqs:
                    req.wait()
            else:
                for op, req in zip(ops, reqs):
                    if op.op is dist.isend:
                        self._pending_sends.append((req, op.tensor))  # keep the buffer alive
                    else:
                        req.wait()
                self._pending_sends = [(r, t) for r, t in self._pending_sends if not r.is_completed()]
        return (
            recv_prev_shape.tolist() if recv_prev_shape is not None else [0, 0, 0],
            recv_next_shape.tolist() if recv_next_shape is not None else [0, 0, 0],
        )

    def wait_for_sends(self) -> None:
        """Finish the shape sends still in flight (every receive is posted once the schedule ends)."""
        for req, _ in self._pending_sends:
            req.wait()
        self._pending_sends = []


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------


def run_pipeline_schedule(
    forward_step: Callable,
    model_chunks: list[nn.Module],
    data_iterators: list[Iterator],
    num_microbatches: int,
    micro_batch_size: int,
    device: torch.device,
) -> list:
    """Forward and backward of `num_microbatches` micro-batches through Megatron's 1F1B schedule
    (interleaved with more than one chunk per rank); returns the last stage's loss reports.

    `forward_step(data_iterator, chunk) -> (output, loss_func)` is Megatron's contract. Gradients are
    accumulated in the chunks' DDP buffers; the caller runs finalize_model_grads, which reduces them
    (or, with the DDP's `overlap_grad_reduce`, waits for the reductions the schedule started).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    if not config.variable_seq_lengths:
        raise ValueError(
            "pipeline stages exchange tensors of different lengths; build the config with "
            "megatron_video.parallel.setup.build_transformer_config"
        )
    if len(model_chunks) > 1 and config.batch_p2p_comm:
        raise ValueError(
            "the interleaved schedule needs batch_p2p_comm=False: batched P2P swaps activations and "
            "gradients between two pipeline ranks (see this module's docstring)"
        )
    groups = ProcessGroupCollection.use_mpu_process_groups(["tp", "cp", "pp", "embd", "pos_embd", "dp_cp"])
    communicator = OrderedP2PCommunicator(groups.pp, config, device)
    saved = (config.no_sync_func, config.grad_sync_func)
    config.no_sync_func, config.grad_sync_func = _grad_sync_funcs(model_chunks)
    try:
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data_iterators,
            model=model_chunks,
            num_microbatches=num_microbatches,
            seq_length=1,  # unused: every tensor's shape is exchanged (variable_seq_lengths)
            micro_batch_size=micro_batch_size,
            forward_only=False,
            p2p_communicator=communicator,
            pg_collection=groups,
        )
    finally:
        config.no_sync_func, config.grad_sync_func = saved
    communicator.wait_for_sends()
    return reports


def _grad_sync_funcs(model_chunks: list[nn.Module]) -> tuple:
    """(no_sync_func, grad_sync_func) for Megatron's schedules: None, None without overlapped
    gradient reduction; otherwise each DDP chunk's `no_sync` (so only a chunk's last micro-batch
    marks gradients ready) and `start_grad_sync` (the schedule starts each chunk's reduction at the
    same point on every pipeline rank; `finalize_model_grads` waits for it). Per chunk with
    virtual pipelining, as Megatron's interleaved schedule expects."""
    if not getattr(getattr(model_chunks[0], "ddp_config", None), "overlap_grad_reduce", False):
        return None, None
    no_sync = [chunk.no_sync for chunk in model_chunks]
    grad_sync = [chunk.start_grad_sync for chunk in model_chunks]
    if len(model_chunks) == 1:
        return no_sync[0], grad_sync[0]
    return no_sync, grad_sync
