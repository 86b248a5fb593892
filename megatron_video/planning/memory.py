"""Per-device memory of a training step, broken down.

Static (held all run): weights (`params.py`, split over TP and the pipeline), the fp32 gradient
buffer of Megatron's DDP (`grad_reduce_in_fp32`), the distributed optimizer's fp32 main
parameters (of the bf16 weights; fp32 weights serve as their own) and Adam moments sharded over
DP x CP (unsharded with the plain optimizer), the fp32 EMA (sharded like the model), and the
frozen VAE / text encoders when the stage encodes online (`features.cache_dir` unset).

Activations: what autograd saves per block and micro-batch, counted tensor by tensor from the
block code (bf16 linears, fp32 streams; models/suv/model.py, models/common/attention.py,
models/opensora_dit/model.py). With `a` = local video tokens x batch x D (sequence split by CP
and, under SP, by TP) and `c` = CP-local tokens x batch x D / TP (head- or FFN-split regions),
one SUV video stream saves (b = bytes of the matmul dtype):

    attention half: LayerNorm input 4a, modulated input 4a, q/k/v input b a, gated output b a;
                    RMS QK-norm 16c (fp32 input and normalised value of q and k), the output
                    projection's input b c where a copy separates it from the kernel's output
                    (RoPE multiplies by constant tables, so it saves only those)
    FFN half:       LayerNorm input 4a, modulated input 4a, fc1 input b a, gated output b a;
                    GELU input (fp32) 16c, fc2 input 4b c
    attention:      q, k, v and output of the kernel, 4 b (N' + k L) x batch x D / (TP x CP)
                    (Skiparse-padded video plus the text repeated per sub-sequence), fp32 LSE

The text stream saves the same with its L tokens (no RoPE). Recompute 'full' keeps only each
recomputed block's inputs (fp32 streams), 'ffn' the attention half plus the FFN half's inputs.
The backward pass adds a working set: the stream gradients and the largest half's temporaries,
plus (under recompute) one block's rematerialised activations.

Pipeline: the first stage holds the most micro-batches in flight (1F1B: min(pp, m); interleaved:
Megatron's warm-up count of chunk forwards), each with its received stage input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_video.models.common.skiparse import skiparse_padding
from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.suv.config import SUVConfig
from megatron_video.planning.params import ParamCount, chunk_parameters, pipeline_chunks

ModelConfig = SUVConfig | OpenSoraDiTConfig

GB = 1e9

BUCKET_PARAMS = 40_000_000
"""Megatron DDP's gradient bucket size (parameters) when the reduction overlaps the backward pass."""

FROZEN_ENCODER_PARAMS: dict[str, int] = {
    "wfvae:wfvae_8x8x8_d32": 227_035_624,
    "t5": 1_223_522_304,
    "mt5": 5_650_000_000,
    "clip": 694_659_840,
    "minilm": 22_713_216,
}
"""Parameters of the frozen encoders a stage loads when it encodes online: the VAE by
`kind:flavor` (counted from the built module) and the text encoders by kind (T5-v1.1-XL and
mT5-XXL encoders, CLIP-bigG text tower, MiniLM-L6). An unknown VAE flavor counts as the v1.5 one."""


@dataclass(frozen=True)
class Layout:
    """How a stage is laid out on the devices, and what it keeps."""

    tp: int = 1
    sp: bool = False
    cp: int = 1
    pp: int = 1
    vpp: int | None = None
    dp: int = 1
    micro_batch: int = 1
    micro_batches: int = 1
    """Micro-batches per optimizer step on each data-parallel rank."""
    recompute: str = "none"
    recompute_num_layers: int | None = None
    linear_bytes: int = 2
    """Bytes per element of the matmul dtype: 2 (bf16) or 4 (fp32)."""
    distributed_optimizer: bool = True
    ema: bool = True
    online_encoders: tuple[tuple[str, int], ...] = ()
    """(name, bytes of its weights) of each frozen encoder held on the device."""
    vae_working_bytes: float = 0.0
    """Peak working memory of encoding one micro-batch with the VAE (online encoding)."""
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    reduce_copies_bucket: bool = False
    """The gradient reduce-scatter copies its bucket (gloo, the CPU backend, does; NCCL and HCCL
    reduce in place). Megatron's DDP keeps one bucket per parameter dtype without overlap, buckets
    of `BUCKET_PARAMS` with it."""

    @property
    def devices(self) -> int:
        """World size."""
        return self.tp * self.cp * self.pp * self.dp

    @property
    def seq_split(self) -> int:
        """How many ways the CP-local sequence is split again outside attention (TP under SP)."""
        return self.tp if self.sp else 1


@dataclass
class MemoryBreakdown:
    """Bytes per device (the busiest pipeline rank), by component."""

    weights: float = 0.0
    gradients: float = 0.0
    main_params: float = 0.0
    optimizer_states: float = 0.0
    ema: float = 0.0
    activations: float = 0.0
    """Saved activations of every micro-batch in flight (the in-flight count is `in_flight`)."""
    backward_working: float = 0.0
    pipeline_buffers: float = 0.0
    comm_buffers: float = 0.0
    frozen_encoders: float = 0.0
    in_flight: int = 1
    per_block: dict[str, float] = field(default_factory=dict)
    """Saved activation bytes of one micro-batch by block kind (e.g. 'k=4 none')."""
    encode_peak: float = 0.0
    """Static + frozen encoders + the VAE's working set while a micro-batch is encoded."""
    reduce_peak: float = 0.0
    """Static + the copied gradient bucket while gradients are reduced (`Layout.reduce_copies_bucket`)."""

    @property
    def static(self) -> float:
        """Everything held for the whole run."""
        return (
            self.weights
            + self.gradients
            + self.main_params
            + self.optimizer_states
            + self.ema
            + self.frozen_encoders
        )

    @property
    def step_peak(self) -> float:
        """Peak during forward / backward."""
        return (
            self.static + self.activations + self.backward_working + self.pipeline_buffers + self.comm_buffers
        )

    @property
    def total(self) -> float:
        """Predicted peak allocated bytes: the largest of the training pass, online encoding and the
        gradient reduction."""
        return max(self.step_peak, self.encode_peak, self.reduce_peak)

    def rows(self) -> list[tuple[str, float]]:
        """(component, GB) for printing."""
        items = [
            ("weights", self.weights),
            ("gradients (fp32 DDP buffer)", self.gradients),
            ("main params (fp32 shard)", self.main_params),
            ("Adam moments", self.optimizer_states),
            ("EMA (fp32)", self.ema),
            ("frozen VAE / text encoders", self.frozen_encoders),
            (
                f"activations ({self.in_flight} micro-batch{'es' if self.in_flight > 1 else ''} in flight)",
                self.activations,
            ),
            ("backward working set", self.backward_working),
            ("pipeline p2p buffers", self.pipeline_buffers),
            ("communication buffers", self.comm_buffers),
        ]
        return [(name, value / GB) for name, value in items]


# -- activations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockActivations:
    """Saved bytes of one block for one micro-batch, by recompute mode, and its backward working set."""

    none: float
    ffn: float
    full: float
    working: float


def _sizes(layout: Layout, tokens: int, batch: int, d: int) -> tuple[float, float]:
    """(a, c) element counts of one stream: sequence-split full width, CP-local head/FFN-split."""
    local = tokens / layout.cp
    return local / layout.seq_split * batch * d, local * batch * d / layout.tp


def suv_block_activations(
    cfg: SUVConfig,
    layout: Layout,
    n: int,
    lt: int,
    k: int,
    context_pre_only: bool = False,
    group: bool = False,
) -> BlockActivations:
    """Saved activations of one SUV block (n video, lt text tokens, sparsity k) on one rank."""
    b, mb, d = layout.linear_bytes, layout.micro_batch, cfg.hidden_size
    av, cv = _sizes(layout, n, mb, d)
    at, ct = _sizes(layout, lt, mb, d)
    padded = n + (skiparse_padding(n, k) if k > 1 else 0)
    kernel_tokens = padded + (k * lt)
    kernel = 4 * b * kernel_tokens * mb * d / (layout.tp * layout.cp)
    lse = 4 * k * mb * (cfg.num_heads / (layout.tp * layout.cp)) * (padded / k + lt)
    # The kernel's output is the output projection's input unless a copy sits between them:
    # Ulysses (CP > 1), Group-Skip ungrouping (odd blocks of a sparse stage), the text average.
    video_copy = layout.cp > 1 or (k > 1 and group)
    text_copy = layout.cp > 1 or k > 1
    attn_video = (8 + 2 * b) * av + (16 + (b if video_copy else 0)) * cv
    ffn_video = (8 + 2 * b) * av + (16 + 4 * b) * cv
    if context_pre_only:
        attn_text = (8 + b) * at + 16 * ct
        ffn_text = 0.0
    else:
        attn_text = (8 + 2 * b) * at + (16 + (b if text_copy else 0)) * ct
        ffn_text = (8 + 2 * b) * at + (16 + 4 * b) * ct
    attn = attn_video + attn_text + kernel + lse
    inputs = 4 * (av + at)
    ffn_working = (16 + 8 * b) * max(cv, ct)
    attn_working = (4 * b + 4) * kernel_tokens * mb * d / (layout.tp * layout.cp)
    working = 4 * (av + at) + max(ffn_working, attn_working)
    return BlockActivations(none=attn + ffn_video + ffn_text, ffn=attn + inputs, full=inputs, working=working)


def dit_block_activations(
    cfg: OpenSoraDiTConfig, layout: Layout, n: int, lt: int, k: int
) -> BlockActivations:
    """Saved activations of one DiT block on one rank (self-attention with sparsity k, cross-attention, FFN)."""
    b, mb, d = layout.linear_bytes, layout.micro_batch, cfg.hidden_size
    av, cv = _sizes(layout, n, mb, d)
    at, ct = _sizes(layout, lt, mb, d)
    padded = n + (skiparse_padding(n, k) if k > 1 else 0)
    self_kernel = 4 * b * padded * mb * d / (layout.tp * layout.cp)
    cross_kernel = b * (2 * n + 2 * lt) * mb * d / (layout.tp * layout.cp)
    self_half = (8 + 2 * b) * av + b * cv + self_kernel  # no QK-norm; RoPE saves only its tables
    cross = 2 * b * av + b * at + b * cv + cross_kernel
    ffn = (8 + 2 * b) * av + (16 + 4 * b) * cv
    inputs = 4 * av
    working = 4 * av + max((16 + 8 * b) * cv, (4 * b + 4) * padded * mb * d / (layout.tp * layout.cp))
    return BlockActivations(
        none=self_half + cross + ffn, ffn=self_half + cross + inputs, full=inputs, working=working
    )


def block_activations(cfg: ModelConfig, layout: Layout, n: int, lt: int) -> list[BlockActivations]:
    """Every block's activations, in global order."""
    if isinstance(cfg, SUVConfig):
        last = cfg.total_layers - 1
        positions = [i for layers in cfg.num_layers for i in range(layers)]
        return [
            suv_block_activations(cfg, layout, n, lt, k, g == last, positions[g] % 2 == 1)
            for g, k in enumerate(cfg.block_sparse_n)
        ]
    return [dit_block_activations(cfg, layout, n, lt, k) for k in cfg.block_sparse_n]


def _saved(act: BlockActivations, mode: str, recomputed: bool) -> float:
    if not recomputed or mode == "none":
        return act.none
    return act.full if mode == "full" else act.ffn


def _skip_inputs(cfg: ModelConfig, layout: Layout, n: int, lt: int, blocks: range) -> float:
    """Saved inputs of the U-skip fusions (Linear(2D -> D) of both streams) whose stage starts in `blocks`."""
    if not isinstance(cfg, SUVConfig) or not cfg.skip_connection:
        return 0.0
    mid = len(cfg.num_layers) // 2
    firsts = [sum(cfg.num_layers[:s]) for s in range(len(cfg.num_layers))]
    fused = sum(1 for j in range(mid) if firsts[mid + 1 + j] in blocks)
    av, _ = _sizes(layout, n, layout.micro_batch, cfg.hidden_size)
    at, _ = _sizes(layout, lt, layout.micro_batch, cfg.hidden_size)
    return fused * layout.linear_bytes * 2 * (av + at)


def chunk_activations(cfg: ModelConfig, layout: Layout, n: int, lt: int, blocks: range) -> float:
    """Saved activations of one micro-batch through a chunk holding `blocks`."""
    acts = block_activations(cfg, layout, n, lt)
    limit = cfg.total_layers if layout.recompute_num_layers is None else layout.recompute_num_layers
    total = sum(_saved(acts[g], layout.recompute, g < limit) for g in blocks)
    total += _skip_inputs(cfg, layout, n, lt, blocks)
    d, mb = cfg.hidden_size, layout.micro_batch
    av, _ = _sizes(layout, n, mb, d)
    if blocks.start == 0:
        total += 4 * lt / layout.cp * mb * cfg.caption_channels  # caption projection input
    if blocks.stop == cfg.total_layers:
        total += 16 * av  # final norm, AdaNorm and projection inputs (fp32)
    total += 8 * n * cfg.head_dim  # RoPE cos / sin tables of the whole grid, shared by the blocks
    return total


def chunk_working(cfg: ModelConfig, layout: Layout, n: int, lt: int, blocks: range) -> float:
    """Backward working set of a chunk: the largest block's, plus a recomputed block's activations."""
    acts = block_activations(cfg, layout, n, lt)
    limit = cfg.total_layers if layout.recompute_num_layers is None else layout.recompute_num_layers
    worst = 0.0
    for g in blocks:
        extra = 0.0
        if g < limit and layout.recompute != "none":
            extra = acts[g].none - _saved(acts[g], layout.recompute, True)
        worst = max(worst, acts[g].working + extra)
    return worst


def stage_tensor_bytes(cfg: ModelConfig, layout: Layout, n: int, lt: int, boundary: int) -> float:
    """Bytes of the tensor crossing the pipeline boundary before block `boundary` (fp32 streams and pending U-skips)."""
    av, _ = _sizes(layout, n, layout.micro_batch, cfg.hidden_size)
    at, _ = _sizes(layout, lt, layout.micro_batch, cfg.hidden_size)
    if isinstance(cfg, OpenSoraDiTConfig):
        return 4 * av
    from megatron_video.models.suv.model import pending_skips

    return 4 * (av + at) * (1 + pending_skips(cfg, boundary))


def in_flight_chunks(pp: int, vpp: int | None, rank: int, micro_batches: int) -> int:
    """Chunk forwards whose activations a pipeline rank holds at once (Megatron's warm-up + 1)."""
    if pp == 1:
        return 1
    if vpp is None:
        return min(pp - rank, micro_batches)
    warmup = (pp - rank - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, micro_batches * vpp)


# -- the whole device --------------------------------------------------------------------------------


def memory_breakdown(cfg: ModelConfig, layout: Layout, n: int, lt: int) -> MemoryBreakdown:
    """Peak memory of the busiest pipeline rank for micro-batches of `n` video and `lt` text tokens."""
    best: MemoryBreakdown | None = None
    for rank, chunks in enumerate(pipeline_chunks(cfg.total_layers, layout.pp, layout.vpp)):
        m = _rank_memory(cfg, layout, n, lt, rank, chunks)
        if best is None or m.total > best.total:
            best = m
    assert best is not None
    return best


def _rank_memory(
    cfg: ModelConfig, layout: Layout, n: int, lt: int, rank: int, chunks: list[range]
) -> MemoryBreakdown:
    counts = [chunk_parameters(cfg, layout.tp, blocks) for blocks in chunks]
    params = sum(counts, ParamCount())
    replicated = _replicated_conditioning(cfg, layout.tp) * (len(chunks) - 1)
    m = MemoryBreakdown()
    m.weights = params.nbytes(layout.linear_bytes)
    m.gradients = 4 * params.total
    shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    if layout.linear_bytes == 2:
        m.main_params = 4 * params.linear / shards
    m.optimizer_states = 8 * params.total / shards
    if layout.ema:
        m.ema = 4 * (params.total - replicated)
    m.frozen_encoders = sum(nbytes for _, nbytes in layout.online_encoders)

    # Activations: in-flight chunk forwards, spread over this rank's chunks in schedule order.
    flights = in_flight_chunks(layout.pp, layout.vpp, rank, layout.micro_batches)
    per_chunk = [chunk_activations(cfg, layout, n, lt, blocks) for blocks in chunks]
    m.in_flight = flights if layout.vpp is None else -(-flights // len(chunks))
    if layout.vpp is None:
        m.activations = flights * per_chunk[0]
    else:  # chunk j's forwards run in groups of pp micro-batches
        held = [0] * len(chunks)
        for i in range(flights):
            held[(i // layout.pp) % len(chunks)] += 1
        m.activations = sum(h * a for h, a in zip(held, per_chunk))
    m.backward_working = max(chunk_working(cfg, layout, n, lt, blocks) for blocks in chunks)
    if layout.pp > 1:
        boundary_bytes = max(stage_tensor_bytes(cfg, layout, n, lt, blocks.start) for blocks in chunks)
        m.pipeline_buffers = 2 * flights * boundary_bytes
    if layout.sp and layout.tp > 1:  # one gathered linear input alive at a time
        m.comm_buffers = layout.linear_bytes * n / layout.cp * layout.micro_batch * cfg.hidden_size
    acts = block_activations(cfg, layout, n, lt)
    for g in (b for blocks in chunks for b in blocks):
        key = f"k={cfg.block_sparse_n[g]}"
        m.per_block.setdefault(key, acts[g].none)
    m.encode_peak = m.static + layout.vae_working_bytes
    if layout.reduce_copies_bucket:
        bucket = (
            min(max(params.linear, params.fp32), BUCKET_PARAMS)
            if layout.overlap_grad_reduce
            else max(params.linear, params.fp32)
        )
        m.reduce_peak = m.static + 4 * bucket
    return m


def _replicated_conditioning(cfg: ModelConfig, tp: int) -> int:
    """Parameters every pipeline chunk replicates (the conditioning embedders)."""
    if isinstance(cfg, SUVConfig):
        e = cfg.timestep_embed_dim
        return 2 * (e * e + e) + (cfg.pooled_projection_dim * e + e) + (e * e + e)
    d, fq = cfg.hidden_size, cfg.timestep_freq_dim
    return (fq * d + d) + (d * d + d) + (d * 6 * d + 6 * d) + cfg.caption_channels * d + d + d * d + d
