"""The exact parameter inventory of a denoiser chunk on one tensor-parallel rank.

Counts follow the modules of `models/suv/model.py` and `models/opensora_dit/model.py`: Megatron's
column-parallel linears split weight and bias over TP, row-parallel linears split the weight and
keep the whole bias, everything else is replicated. `linear` parameters take the run's matmul
dtype (bf16 under runtime.dtype=bf16: the attention / FFN linears and the token-wise U-skip
fusions); `fp32` ones are the norms, AdaLN / AdaLN-single, embeddings and the output head.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.suv.config import SUVConfig
from megatron_video.parallel.pipeline import chunk_block_ranges

ModelConfig = SUVConfig | OpenSoraDiTConfig


@dataclass(frozen=True)
class ParamCount:
    """Parameters held by one rank, by dtype class."""

    linear: int = 0
    """In the matmul dtype (runtime.dtype)."""
    fp32: int = 0
    """Always fp32."""

    def __add__(self, other: ParamCount) -> ParamCount:
        return ParamCount(self.linear + other.linear, self.fp32 + other.fp32)

    @property
    def total(self) -> int:
        """All parameters."""
        return self.linear + self.fp32

    def nbytes(self, linear_bytes: int) -> int:
        """Bytes with `linear_bytes` per matmul-dtype parameter (2 for bf16, 4 for fp32)."""
        return self.linear * linear_bytes + self.fp32 * 4


def _column(in_f: int, out_f: int, tp: int, bias: bool) -> int:
    return (in_f * out_f + (out_f if bias else 0)) // tp


def _row(in_f: int, out_f: int, tp: int, bias: bool) -> int:
    return in_f * out_f // tp + (out_f if bias else 0)


def suv_block(cfg: SUVConfig, tp: int, context_pre_only: bool) -> ParamCount:
    """One SUV block on one TP rank."""
    d, e, hd, f = cfg.hidden_size, cfg.timestep_embed_dim, cfg.head_dim, cfg.ff_mult * cfg.hidden_size
    bias = cfg.attention_bias
    adaln = 2 * _column(e, 6 * d, tp, True)
    norms = 3 * 2 * d + 4 * hd  # norm1 video / text, norm2 video (weight + bias); QK RMS norms
    linear = 2 * _column(d, 3 * d, tp, bias) + _row(d, d, tp, bias)  # fused q/k/v of both streams, video out
    linear += _column(d, f, tp, False) + _row(f, d, tp, False)  # video FFN (no bias)
    if not context_pre_only:
        linear += _row(d, d, tp, bias)  # text output projection
        if cfg.double_ff:
            norms += 2 * d
            linear += _column(d, f, tp, False) + _row(f, d, tp, False)
    return ParamCount(linear, adaln + norms)


def suv_chunk(cfg: SUVConfig, tp: int, blocks: range) -> ParamCount:
    """An SUV model or pipeline chunk holding `blocks` (global indices), on one TP rank."""
    d, e = cfg.hidden_size, cfg.timestep_embed_dim
    total = cfg.total_layers
    p = cfg.patch_size
    count = ParamCount(fp32=2 * (e * e + e) + (cfg.pooled_projection_dim * e + e) + (e * e + e))  # temb
    for g in blocks:
        count += suv_block(cfg, tp, context_pre_only=(g == total - 1))
    if blocks.start == 0:
        count += ParamCount(fp32=cfg.in_channels * p * p * d + d + cfg.caption_channels * d + d)
    if cfg.skip_connection:
        mid = len(cfg.num_layers) // 2
        firsts = [sum(cfg.num_layers[:s]) for s in range(len(cfg.num_layers))]
        fused = sum(1 for j in range(mid) if firsts[mid + 1 + j] in blocks)
        count += ParamCount(linear=fused * 2 * (2 * d * d + d))
        if not cfg.skip_connection_zero_init:
            count += ParamCount(fp32=fused * 2 * (2 * 2 * d))
    if blocks.stop == total:
        out = p * p * cfg.out_channels
        count += ParamCount(fp32=2 * d + _column(e, 2 * d, tp, True) + 2 * d + d * out + out)
    return count


def dit_block(cfg: OpenSoraDiTConfig, tp: int) -> ParamCount:
    """One v1.2 / v1.3 DiT block on one TP rank."""
    d, f, bias = cfg.hidden_size, cfg.ff_mult * cfg.hidden_size, cfg.attention_bias
    linear = _column(d, 3 * d, tp, bias) + _row(d, d, tp, True)  # self-attention
    linear += _column(d, d, tp, bias) + _column(d, 2 * d, tp, bias) + _row(d, d, tp, True)  # cross
    linear += _column(d, f, tp, True) + _row(f, d, tp, True)  # FFN
    return ParamCount(linear, 6 * d)  # + the block's scale-shift table


def dit_chunk(cfg: OpenSoraDiTConfig, tp: int, blocks: range) -> ParamCount:
    """A DiT model or pipeline chunk holding `blocks`, on one TP rank."""
    d, p, fq = cfg.hidden_size, cfg.patch_size, cfg.timestep_freq_dim
    count = ParamCount(fp32=(fq * d + d) + (d * d + d) + (d * 6 * d + 6 * d))  # AdaLN-single
    count += ParamCount(fp32=cfg.caption_channels * d + d + d * d + d)  # caption projection
    for _ in blocks:
        count += dit_block(cfg, tp)
    if blocks.start == 0:
        count += ParamCount(fp32=cfg.in_channels * p * p * d + d)
    if blocks.stop == cfg.num_layers:
        out = p * p * cfg.out_channels
        count += ParamCount(fp32=2 * d + d * out + out)
    return count


def chunk_parameters(cfg: ModelConfig, tp: int, blocks: range) -> ParamCount:
    """Parameters of a chunk holding `blocks`, on one TP rank, for either family."""
    if isinstance(cfg, SUVConfig):
        return suv_chunk(cfg, tp, blocks)
    return dit_chunk(cfg, tp, blocks)


def pipeline_chunks(num_blocks: int, pp: int, vpp: int | None) -> list[list[range]]:
    """The block ranges each pipeline rank holds (rank r: chunks r, r + pp, ... of
    `parallel.pipeline.chunk_block_ranges`, Megatron's interleaved order)."""
    ranges = chunk_block_ranges(num_blocks, pp, vpp)
    return [ranges[r::pp] for r in range(pp)]


def total_parameters(cfg: ModelConfig) -> int:
    """Parameters of the whole model (one rank, no split)."""
    return chunk_parameters(cfg, 1, range(cfg.total_layers)).total
