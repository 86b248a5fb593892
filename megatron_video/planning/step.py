"""Communication per step and the predicted step time and MFU.

Per micro-batch and block (forward; backward in brackets), bytes a device sends for each
collective of a tensor of X bytes (ring algorithms: all-gather / reduce-scatter move X (g-1)/g,
an all-reduce twice that, an all-to-all X (g-1)/g):

* TP with sequence parallel: an all-gather before each column-parallel linear and a
  reduce-scatter after each row-parallel one (backward: the reverse, plus the all-gather of the
  saved local input for the weight gradient); without SP an all-reduce after each row-parallel
  linear (backward: after each column-parallel one). SUV: two linear pairs per stream (attention,
  FFN); DiT: self-attention, cross-attention and FFN pairs, and the caption's k/v input.
* Ulysses CP: q, k, v to heads and the output back, per stream (backward the same).
* DP (over DP x CP, Megatron's gradient group): reduce-scatter of the fp32 gradients and
  all-gather of the bf16 weights with the distributed optimizer, an all-reduce without.
* PP: each micro-batch's stage tensor forward and its gradient backward, per chunk boundary.

Times use the link the group runs over: a group whose ranks fit in one node uses the intra-node
bandwidth, otherwise the network (Megatron's rank order: TP fastest, then CP, then DP, then PP),
at `COLLECTIVE_EFFICIENCY` of the link. TP and Ulysses collectives sit on the critical path. The
DP reduce-scatter overlaps the last micro-batch's backward (`parallel.overlap_grad_reduce`) and the
weight all-gather the first forward (`parallel.overlap_param_gather`): only what exceeds that
compute, or the last bucket, is exposed. The pipeline adds its bubble, (pp - 1) / (vpp x m) of the
compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.suv.config import SUVConfig
from megatron_video.planning.devices import Device
from megatron_video.planning.flops import sample_flops
from megatron_video.planning.memory import BUCKET_PARAMS, Layout, stage_tensor_bytes
from megatron_video.planning.params import chunk_parameters, pipeline_chunks

ModelConfig = SUVConfig | OpenSoraDiTConfig

COLLECTIVE_EFFICIENCY = 0.8
"""Achieved fraction of the link bandwidth in large collectives."""


@dataclass
class CommVolume:
    """Bytes one device sends per optimizer step, by kind."""

    tensor_parallel: float = 0.0
    context_parallel: float = 0.0
    grad_reduce: float = 0.0
    param_gather: float = 0.0
    pipeline: float = 0.0


@dataclass
class StepPrediction:
    """Predicted step of one stage."""

    model_flops: float
    """Model FLOPs per optimizer step, all devices."""
    hardware_flops: float
    compute_s: float
    tp_s: float
    cp_s: float
    dp_exposed_s: float
    dp_total_s: float
    pp_bubble_s: float
    pp_p2p_s: float
    comm: CommVolume
    devices: int
    peak_tflops: float

    @property
    def step_s(self) -> float:
        """Predicted seconds per optimizer step."""
        return self.compute_s + self.tp_s + self.cp_s + self.dp_exposed_s + self.pp_bubble_s + self.pp_p2p_s

    @property
    def mfu(self) -> float:
        """Model-FLOP utilisation."""
        return self.model_flops / (self.devices * self.peak_tflops * 1e12 * self.step_s)

    @property
    def hfu(self) -> float:
        """Hardware-FLOP utilisation (recompute and padding included)."""
        return self.hardware_flops / (self.devices * self.peak_tflops * 1e12 * self.step_s)


def _ring(nbytes: float, g: int) -> float:
    return nbytes * (g - 1) / g if g > 1 else 0.0


def _bandwidth(device: Device, span: int) -> float:
    """Bytes/s of a group whose ranks span `span` consecutive devices."""
    gbps = device.intra_node_gbps if span <= device.devices_per_node else device.inter_node_gbps
    return gbps * 1e9 * COLLECTIVE_EFFICIENCY


def _block_streams(cfg: ModelConfig, n: int, lt: int) -> list[tuple[float, float, int]]:
    """(tokens, linear pairs, all-to-alls) per stream of one block, summed over the blocks."""
    blocks = cfg.total_layers
    if isinstance(cfg, SUVConfig):
        # video: attention + FFN pairs, q/k/v/out all-to-alls; text the same (the last block: q/k/v only)
        return [(n, 2 * blocks, 4 * blocks), (lt, 2 * blocks - 1.5, 4 * blocks - 1)]
    return [(n, 3 * blocks, 6 * blocks), (lt, 0.5 * blocks, 2 * blocks)]


def predict_step(
    cfg: ModelConfig, layout: Layout, device: Device, n: int, lt: int, global_batch: int
) -> StepPrediction:
    """Step time of `global_batch` samples of `n` video and `lt` text tokens on `layout`."""
    flops = sample_flops(cfg, n, lt, layout.recompute, layout.recompute_num_layers)
    per_device = global_batch / layout.devices
    linear_s = flops.linear_hardware * per_device / (device.matmul_tflops * 1e12)
    attention_s = (flops.hardware - flops.linear_hardware) * per_device / (device.attention_tflops * 1e12)
    compute_s = linear_s + attention_s
    m = layout.micro_batches
    pp_mb = layout.pp  # micro-batches on one device per step: m, each through 1/pp of the model
    b, d, mb = layout.linear_bytes, cfg.hidden_size, layout.micro_batch
    recompute_fwd = 1.0 if layout.recompute == "full" else 0.0
    if layout.recompute == "full" and layout.recompute_num_layers is not None:
        recompute_fwd = layout.recompute_num_layers / cfg.total_layers

    comm = CommVolume()
    for tokens, pairs, all_to_alls in _block_streams(cfg, n, lt):
        x = b * tokens / layout.cp * mb * d  # one stream's CP-local activation, bytes
        per_pair = 2 * x  # forward: all-gather + reduce-scatter (or one all-reduce)
        backward = 3 * x if layout.sp else 2 * x
        tp_bytes = pairs * (per_pair * (1 + recompute_fwd) + backward) / pp_mb
        comm.tensor_parallel += m * _ring(tp_bytes, layout.tp)
        cp_bytes = all_to_alls * (x / layout.tp) * (2 + recompute_fwd) / pp_mb
        comm.context_parallel += m * _ring(cp_bytes, layout.cp)

    chunks = pipeline_chunks(cfg.total_layers, layout.pp, layout.vpp)
    params = max(sum(chunk_parameters(cfg, layout.tp, c).total for c in rank) for rank in chunks)
    g = layout.dp * layout.cp
    if layout.distributed_optimizer:
        comm.grad_reduce = _ring(4 * params, g)
        comm.param_gather = _ring(b * params, g)
    else:
        comm.grad_reduce = 2 * _ring(4 * params, g)
    if layout.pp > 1:
        boundaries = [c.start for rank in chunks for c in rank if c.start > 0]
        per_mb = sum(stage_tensor_bytes(cfg, layout, n, lt, s) for s in boundaries) / layout.pp
        comm.pipeline = m * 2 * per_mb

    tp_s = comm.tensor_parallel / _bandwidth(device, layout.tp)
    cp_s = comm.context_parallel / _bandwidth(device, layout.tp * layout.cp)
    dp_link = _bandwidth(device, layout.devices // layout.pp)
    reduce_s = comm.grad_reduce / dp_link
    gather_s = comm.param_gather / dp_link
    buckets = max(1, math.ceil(params / BUCKET_PARAMS))
    one_mb = compute_s / max(m, 1)
    exposed = 0.0
    exposed += max(reduce_s - 2 / 3 * one_mb, reduce_s / buckets) if layout.overlap_grad_reduce else reduce_s
    exposed += max(gather_s - 1 / 3 * one_mb, gather_s / buckets) if layout.overlap_param_gather else gather_s
    bubble = compute_s * (layout.pp - 1) / ((layout.vpp or 1) * m) if layout.pp > 1 else 0.0
    p2p_s = comm.pipeline / _bandwidth(device, layout.devices) if layout.pp > 1 else 0.0
    return StepPrediction(
        model_flops=flops.model * global_batch,
        hardware_flops=flops.hardware * global_batch,
        compute_s=compute_s,
        tp_s=tp_s,
        cp_s=cp_s,
        dp_exposed_s=exposed,
        dp_total_s=reduce_s + gather_s,
        pp_bubble_s=bubble,
        pp_p2p_s=p2p_s,
        comm=comm,
        devices=layout.devices,
        peak_tflops=device.peak_tflops,
    )
