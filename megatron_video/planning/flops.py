"""FLOPs of one training sample: model FLOPs (the math the model defines) and hardware FLOPs
(what the devices execute: plus recomputed forwards and Skiparse padding).

A multiply-add is 2 FLOPs; the backward pass costs twice the forward (3x in all). Counted: every
matmul (q/k/v and output projections of both streams, FFNs, cross-attention, AdaLN, U-skip
fusions, patch embedding, caption projection, output head) and attention scores and values,
4 S_q S_k D per attention. Norms, RoPE, softmax and other elementwise work are not FLOPs here.

Skiparse with sparsity k regroups the N video tokens into k sub-sequences of N/k; each attends
jointly with the L text tokens (SUV), so a sparse SUV block costs 4 k (N/k + L)^2 D in attention,
N^2/k for the video part. The devices pad N to N' (a multiple of k^2) and compute
4 k (N'/k + L)^2 D: the padding counts as hardware FLOPs only. The DiT's cross-attention is
always dense (4 N L D).

Recompute (`model.recompute`, `model.recompute_num_layers`; models/common/layers.py
`run_maybe_recomputed`): 'full' runs each recomputed block's forward again in the backward pass,
'ffn' the FFN half of each block (the SUV's AdaLN-modulated FFNs of both streams, the DiT's FFN).
Recomputed work is hardware FLOPs, never model FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_video.models.common.skiparse import skiparse_padding
from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.suv.config import SUVConfig

ModelConfig = SUVConfig | OpenSoraDiTConfig


@dataclass(frozen=True)
class BlockFlops:
    """Forward FLOPs of one block for one sample."""

    linear: float
    """Matmuls of the projections, FFNs and AdaLN."""
    attention: float
    """Attention scores and values (model count: no padding)."""
    attention_padded: float
    """Attention as computed (Skiparse padding included)."""
    ffn: float
    """The part of `linear` that FFN recompute runs again."""


def suv_block_flops(cfg: SUVConfig, n: int, lt: int, k: int, context_pre_only: bool = False) -> BlockFlops:
    """One SUV block, `n` video and `lt` text tokens, Skiparse sparsity `k` (1 = dense)."""
    d, e, f = cfg.hidden_size, cfg.timestep_embed_dim, cfg.ff_mult * cfg.hidden_size
    linear = 2 * e * 12 * d  # two AdaLN modulations (6 D each) per sample
    linear += 2 * (n + lt) * d * 3 * d  # fused q/k/v of both streams
    linear += 2 * n * d * d + (0 if context_pre_only else 2 * lt * d * d)  # output projections
    ffn_tokens = n if context_pre_only else n + lt  # double_ff or one shared FFN over [video; text]
    ffn = 2 * 2 * ffn_tokens * d * f
    attention = _joint_attention(n, lt, k, d)
    padded = _joint_attention(n + (skiparse_padding(n, k) if k > 1 else 0), lt, k, d)
    return BlockFlops(linear + ffn, attention, padded, ffn)


def _joint_attention(n: int, lt: int, k: int, d: int) -> float:
    """k sub-sequences of n/k video tokens, each with the lt text tokens: 4 k (n/k + lt)^2 d."""
    s = n / k + lt
    return 4 * k * s * s * d


def dit_block_flops(cfg: OpenSoraDiTConfig, n: int, lt: int, k: int) -> BlockFlops:
    """One v1.2 / v1.3 DiT block: self-attention (Skiparse k), cross-attention to `lt` text tokens, FFN."""
    d, f = cfg.hidden_size, cfg.ff_mult * cfg.hidden_size
    linear = 2 * n * d * 3 * d + 2 * n * d * d  # self-attention q/k/v, output
    linear += 2 * n * d * d + 2 * lt * d * 2 * d + 2 * n * d * d  # cross-attention q, k/v (text), output
    ffn = 2 * 2 * n * d * f
    self_attention = 4 * k * (n / k) ** 2 * d
    padded = n + (skiparse_padding(n, k) if k > 1 else 0)
    cross = 4 * n * lt * d
    return BlockFlops(linear + ffn, self_attention + cross, 4 * k * (padded / k) ** 2 * d + cross, ffn)


def block_flops(cfg: ModelConfig, n: int, lt: int) -> list[BlockFlops]:
    """Every block's forward FLOPs, in global order."""
    if isinstance(cfg, SUVConfig):
        last = cfg.total_layers - 1
        return [suv_block_flops(cfg, n, lt, k, i == last) for i, k in enumerate(cfg.block_sparse_n)]
    return [dit_block_flops(cfg, n, lt, k) for k in cfg.block_sparse_n]


def outside_block_flops(cfg: ModelConfig, n: int, lt: int) -> float:
    """Forward FLOPs of one sample outside the blocks: embeddings, U-skip fusions, output head."""
    d, p = cfg.hidden_size, cfg.patch_size
    patch = 2 * n * cfg.in_channels * p * p * d
    head = 2 * n * d * p * p * cfg.out_channels
    if isinstance(cfg, SUVConfig):
        e = cfg.timestep_embed_dim
        embed = 2 * (2 * e * e + cfg.pooled_projection_dim * e + e * e) + 2 * lt * cfg.caption_channels * d
        skips = (len(cfg.num_layers) // 2 if cfg.skip_connection else 0) * 2 * (n + lt) * 2 * d * d
        return patch + embed + skips + head + 2 * e * 2 * d
    embed = 2 * (cfg.timestep_freq_dim * d + d * d + d * 6 * d) + 2 * lt * (cfg.caption_channels * d + d * d)
    return patch + embed + head


@dataclass(frozen=True)
class SampleFlops:
    """Training FLOPs of one sample (forward + backward)."""

    model: float
    """3 x the forward of the model as defined (what MFU counts)."""
    hardware: float
    """What the devices execute: `model` plus Skiparse padding and recomputed forwards."""
    forward: float
    """One forward (model count)."""
    linear_hardware: float
    """The matmul part of `hardware` (the rest is attention)."""


def sample_flops(
    cfg: ModelConfig, n: int, lt: int, recompute: str | None = None, recompute_num_layers=None
) -> SampleFlops:
    """Training FLOPs of one sample of `n` video and `lt` text tokens; recompute as configured in
    `cfg` unless `recompute` / `recompute_num_layers` are given."""
    mode = cfg.recompute if recompute is None else recompute
    limit = cfg.recompute_num_layers if recompute is None else recompute_num_layers
    limit = cfg.total_layers if limit is None else limit
    outside = outside_block_flops(cfg, n, lt)
    forward = outside
    linear_hw = 3 * outside
    attention_hw = 0.0
    for i, b in enumerate(block_flops(cfg, n, lt)):
        forward += b.linear + b.attention
        linear_hw += 3 * b.linear
        attention_hw += 3 * b.attention_padded
        if i < limit and mode == "full":
            linear_hw += b.linear
            attention_hw += b.attention_padded
        elif i < limit and mode == "ffn":
            linear_hw += b.ffn
    return SampleFlops(3 * forward, linear_hw + attention_hw, forward, linear_hw)


def video_tokens(cfg: ModelConfig, latent_thw: tuple[int, int, int]) -> int:
    """Tokens of a latent (frames, height, width) after the patch embedding."""
    t, h, w = latent_thw
    return t * (h // cfg.patch_size) * (w // cfg.patch_size)
