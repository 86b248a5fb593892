"""The Open-Sora-Plan v1.2 / v1.3 denoiser: a PixArt-style DiT over video tokens.

Shape legend
    B batch, C latent channels, T/H/W latent frames/height/width, p spatial patch
    N = T * (H/p) * (W/p) video tokens, L text tokens, D width, h heads, d head dim
    Suffixes give the layout: x_SBD is sequence-first [tokens, batch, width]. Inside a parallel run
    x_SBD holds this rank's token shard (see megatron_video/parallel/plan.py); shapes in comments are
    those of a single process.

Block (same math in v1.2 and v1.3; v1.3 makes the self-attention of blocks 2..L-3 Skiparse):
    (sh1, sc1, g1, sh2, sc2, g2) = scale_shift_table_i[6, D] + t6[B, 6, D]     (AdaLN-single)
    x = x + g1 * SelfAttn(LN(x) * (1 + sc1) + sh1)       3D RoPE (head_dim in thirds), Skiparse
    x = x + CrossAttn(x, c, text mask)                    no norm, no gate, no RoPE; dense always
    x = x + g2 * FFN(LN(x) * (1 + sc2) + sh2)             tanh-GELU, biased
    LN has no affine parameters. t6 = Linear(D, 6D)(SiLU(emb)), emb = MLP(sinusoid_256(t)), shared by
    all blocks; c = Linear -> tanh-GELU -> Linear of the text features. The head modulates with
    scale_shift_table[2, D] + emb and projects to p * p * C_out channels.
Masks: the video mask [B, T, H, W] (1 = valid latent) is max-pooled per patch and binarised; the text
mask [B, L] keeps tokens equal to 1. The released code adds -10000 to excluded scores (-9980 to
Skiparse padding); here excluded keys are left out of the softmax, which is the same in fp32 unless a
query has no valid key at all, where the release attends all keys uniformly: a sample whose keys are
all excluded is therefore treated as if none were.

Contract: model(latents_BCTHW, timestep_B, text_BLC, pooled_BP, text_mask_BL, video_mask_BTHW)
-> prediction_BCTHW, the full tensors on every rank whatever the parallel layout. `pooled_BP` is
accepted for the shared contract and unused (the family has no pooled text). Timesteps are DDPM
steps 0..999 (float allowed).

Precision (models/common/layers.py): attention and FFN linears and the inpainting projections take
`plan.linear_config.params_dtype`; AdaLN-single, the caption projection, patch embeddings, norms,
modulation, the output head and the residual stream are fp32. The prediction is fp32.

Pipeline chunks: built with `blocks=range(a, b)` the model holds only those blocks (global names
`blocks.<i>.`). AdaLN-single and the caption projection are replicated on every chunk (every stage
reads the same batch), so only the video stream crosses a stage boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_video.models.common.layers import (
    FeedForward,
    LayerNormFP32,
    MLPEmbedder,
    PatchEmbed2D,
    PipelineChunkInput,
    modulate,
    run_maybe_recomputed,
    timestep_sinusoid,
)
from megatron_video.models.common.rope import apply_rope_3d, rope_3d_tables
from megatron_video.models.common.skiparse import (
    skiparse_key_mask,
    skiparse_padding,
    skiparse_regroup,
    skiparse_ungroup,
)
from megatron_video.models.conditioning.inpaint import InpaintConditioning
from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.parallel.pipeline import mark_pipeline_replicated_params
from megatron_video.parallel.plan import (
    ParallelPlan,
    gather_frames_from_context_parallel,
    gather_from_sequence_parallel,
    mark_sequence_parallel_params,
    scatter_to_sequence_parallel,
    split_frames_for_context_parallel,
    split_tokens_for_context_parallel,
    sum_grads_over_sequence_shards,
    ulysses_head_to_seq,
    ulysses_seq_to_head,
)
from megatron_video.platform.attention import attention, drop_full_masks

_ANGLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def skiparse_self_attention(
    q_NBhd: torch.Tensor,
    k_NBhd: torch.Tensor,
    v_NBhd: torch.Tensor,
    keep_BN: torch.Tensor | None,
    sparse_n: int,
    group: bool,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Attention of the video with itself, Skiparse-regrouped when sparse_n > 1: [N, B, h, d] out.

    The sequence is padded to a multiple of sparse_n^2 (padded keys excluded) and split into
    sparse_n sub-sequences that attend within themselves (models/common/skiparse.py).
    """
    n = q_NBhd.shape[0]
    scale = q_NBhd.shape[-1] ** -0.5
    qkv = [q_NBhd, k_NBhd, v_NBhd]
    keep = keep_BN  # None: every key valid
    if sparse_n > 1:
        pad = skiparse_padding(n, sparse_n)
        qkv = [skiparse_regroup(F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)), sparse_n, group) for t in qkv]
        if pad and keep is None:  # the padded keys must be masked
            keep = torch.ones(q_NBhd.shape[1], n, dtype=torch.bool, device=q_NBhd.device)
        if keep is not None:
            keep = skiparse_key_mask(keep, sparse_n, group)
    q, k, v = (t.permute(1, 2, 0, 3) for t in qkv)  # [B', h, N', d]
    out = attention(q, k, v, keep, scale, backend).permute(2, 0, 1, 3)
    if sparse_n > 1:
        out = skiparse_ungroup(out, sparse_n, group)[:n]
    return out


def _column(plan: ParallelPlan, dim: int, out_features: int, bias: bool) -> ColumnParallelLinear:
    cfg = plan.linear_config
    return ColumnParallelLinear(
        dim,
        out_features,
        config=cfg,
        init_method=cfg.init_method,
        bias=bias,
        tp_group=plan.tensor_parallel_group,
    )


def _row(plan: ParallelPlan, in_features: int, dim: int) -> RowParallelLinear:
    cfg = plan.linear_config
    return RowParallelLinear(
        in_features,
        dim,
        config=cfg,
        init_method=cfg.output_layer_init_method,
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=plan.tensor_parallel_group,
    )


class SelfAttention(nn.Module):
    """Fused q/k/v (rows per head [head, (q, k, v), d]), Ulysses, 3D RoPE, Skiparse, output projection."""

    def __init__(self, cfg: OpenSoraDiTConfig, plan: ParallelPlan):
        super().__init__()
        self.plan, self.head_dim = plan, cfg.head_dim
        self.local_heads = cfg.num_heads // plan.tensor_parallel
        self.rope_dims = (cfg.head_dim // 3,) * 3
        self.linear_qkv = _column(plan, cfg.hidden_size, 3 * cfg.hidden_size, cfg.attention_bias)
        self.linear_proj = _row(plan, cfg.hidden_size, cfg.hidden_size)

    def forward(self, x_SBD, rope_cos_sin, video_keep_BN, sparse_n: int, group: bool, backend: str):
        # 1. Projections (sequence gathered under SP), all-to-all to the full sequence for our heads.
        qkv, _ = self.linear_qkv(x_SBD.to(self.linear_qkv.weight.dtype))
        s, b = qkv.shape[:2]
        q, k, v = qkv.reshape(s, b, self.local_heads, 3, self.head_dim).unbind(dim=3)
        q, k, v = (ulysses_seq_to_head(t, self.plan) for t in (q, k, v))
        # 2. 3D RoPE at global positions, then (Skiparse) attention.
        q = apply_rope_3d(q, *rope_cos_sin, axis_dims=self.rope_dims)
        k = apply_rope_3d(k, *rope_cos_sin, axis_dims=self.rope_dims)
        out = skiparse_self_attention(q, k, v, video_keep_BN, sparse_n, group, backend)
        # 3. Back to the sequence split, output projection.
        out, _ = self.linear_proj(ulysses_head_to_seq(out, self.plan).flatten(2))
        return out


class CrossAttention(nn.Module):
    """Video queries attend the projected caption (K/V fused per head [head, (k, v), d]).

    Under Ulysses each rank projects its text slice and the all-to-all hands every rank the whole
    caption for its heads, like the video queries. Skiparse does not change cross-attention (each
    query sees all text), so it is dense in every block.
    """

    def __init__(self, cfg: OpenSoraDiTConfig, plan: ParallelPlan):
        super().__init__()
        self.plan, self.head_dim = plan, cfg.head_dim
        self.local_heads = cfg.num_heads // plan.tensor_parallel
        self.linear_q = _column(plan, cfg.hidden_size, cfg.hidden_size, cfg.attention_bias)
        self.linear_kv = _column(plan, cfg.hidden_size, 2 * cfg.hidden_size, cfg.attention_bias)
        self.linear_proj = _row(plan, cfg.hidden_size, cfg.hidden_size)

    def forward(self, x_SBD, c_LBD, text_keep_BL, backend: str):
        q, _ = self.linear_q(x_SBD.to(self.linear_q.weight.dtype))
        kv, _ = self.linear_kv(c_LBD.to(self.linear_kv.weight.dtype))
        q = q.reshape(*q.shape[:2], self.local_heads, self.head_dim)
        k, v = kv.reshape(*kv.shape[:2], self.local_heads, 2, self.head_dim).unbind(dim=3)
        q, k, v = (ulysses_seq_to_head(t, self.plan).permute(1, 2, 0, 3) for t in (q, k, v))
        out = attention(q, k, v, text_keep_BL, self.head_dim**-0.5, backend).permute(2, 0, 1, 3)
        out, _ = self.linear_proj(ulysses_head_to_seq(out, self.plan).flatten(2))
        return out


class DiTBlock(nn.Module):
    """Gated self-attention, ungated cross-attention, gated FFN, modulated by AdaLN-single."""

    def __init__(self, cfg: OpenSoraDiTConfig, plan: ParallelPlan, sparse_n: int, group: bool):
        super().__init__()
        d = cfg.hidden_size
        self.plan, self.sparse_n, self.group = plan, sparse_n, group
        self.recompute_ffn = False
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)
        self.norm1 = LayerNormFP32(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg, plan)
        self.cross_attn = CrossAttention(cfg, plan)
        self.norm2 = LayerNormFP32(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.ff = FeedForward(d, cfg.ff_mult, plan, bias=True)

    def modulation(self, t6_6BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Six [1, B, D] tensors: this block's table plus the shared AdaLN-single output.

        They meet sequence-split tokens, so their gradient (the table's and t6's) is summed over
        the sequence shards.
        """
        mod = sum_grads_over_sequence_shards(self.scale_shift_table[:, None] + t6_6BD, self.plan)
        return mod.chunk(6, dim=0)

    def forward(self, x_SBD, c_LBD, t6_6BD, rope, video_keep_BN, text_keep_BL, backend):
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(t6_6BD)
        # 1. Gated self-attention.
        attn = self.self_attn(
            modulate(self.norm1(x_SBD), sh1, sc1), rope, video_keep_BN, self.sparse_n, self.group, backend
        )
        x_SBD = x_SBD + g1 * attn
        # 2. Cross-attention to the caption: no norm, no gate.
        x_SBD = x_SBD + self.cross_attn(x_SBD, c_LBD, text_keep_BL, backend)
        # 3. Gated FFN.
        if self.recompute_ffn:
            return tensor_parallel.checkpoint(self._ffn, False, x_SBD, sh2, sc2, g2)
        return self._ffn(x_SBD, sh2, sc2, g2)

    def _ffn(self, x_SBD, shift, scale, gate):
        return x_SBD + gate * self.ff(modulate(self.norm2(x_SBD), shift, scale))


class AdaLNSingle(nn.Module):
    """t [B] -> (t6 [B, 6D], emb [B, D]) in fp32: emb = MLP(sinusoid(t)), t6 = Linear(SiLU(emb))."""

    def __init__(self, dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_embedder = MLPEmbedder(freq_dim, dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.timestep_embedder(timestep_sinusoid(t_B, self.freq_dim))
        return self.linear(F.silu(emb)), emb


class CaptionProjection(nn.Module):
    """Text features [.., C_text] -> [.., D]: Linear -> tanh-GELU -> Linear, fp32."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(text.float()), approximate="tanh"))


def v12_inpaint_mask_layout(mask_BMTHW: torch.Tensor) -> torch.Tensor:
    """A compressed I2V mask in the v1.3 layout -> the v1.2 layout, same shape [B, M, T', h, w].

    Both start from the per-frame mask with the first frame repeated M times (M = VAE temporal
    stride), a sequence of M * T' maps. v1.3 (and `data.i2v_masks.compress_mask`) gives latent step t
    the maps t*M .. t*M + M-1 as channels (`view(B, T', M, h, w).transpose(1, 2)`); v1.2 splits the
    sequence channel-major (`view(B, M, T', h, w)`), so channel m of step t is map m*T' + t.
    """
    b, m, t, h, w = mask_BMTHW.shape
    frames = mask_BMTHW.transpose(1, 2).reshape(b, m * t, h, w)
    return frames.reshape(b, m, t, h, w)


class OpenSoraDiT(PipelineChunkInput, MegatronModule):
    """The v1.2 / v1.3 denoiser (T2V, or I2V with `inpaint_mask_channels`), as one model or one
    pipeline chunk (`blocks`, a contiguous range of block indices).

    A MegatronModule so that DDP, the distributed optimizer and `sharded_state_dict` work on it
    unchanged.
    """

    def __init__(
        self,
        cfg: OpenSoraDiTConfig,
        plan: ParallelPlan,
        attention_backend: str = "sdpa",
        inpaint_mask_channels: int | None = None,
        blocks: range | None = None,
    ):
        super().__init__(config=plan.linear_config)
        cfg.validate()
        self.cfg, self.plan, self.attention_backend = cfg, plan, attention_backend
        total = cfg.num_layers
        self.block_range = range(total) if blocks is None else blocks
        if self.block_range.step != 1 or not 0 <= self.block_range.start < self.block_range.stop <= total:
            raise ValueError(
                f"blocks={blocks} is not a contiguous, non-empty range within the {total} blocks"
            )
        self.pre_process = self.block_range.start == 0
        self.post_process = self.block_range.stop == total
        self.input_tensor = None
        # What Megatron's pipeline schedule and finalize_model_grads ask of a pipelined model.
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        d = cfg.hidden_size

        self.patch_embed = PatchEmbed2D(cfg.in_channels, d, cfg.patch_size) if self.pre_process else None
        self.inpaint = None
        if inpaint_mask_channels is not None and self.pre_process:
            self.inpaint = InpaintConditioning(
                cfg.in_channels,
                inpaint_mask_channels,
                d,
                cfg.patch_size,
                dtype=plan.linear_config.params_dtype,
            )
        # Replicated on every pipeline chunk; their gradients are summed over the pipeline.
        self.adaln_single = AdaLNSingle(d, cfg.timestep_freq_dim)
        self.caption_projection = CaptionProjection(cfg.caption_channels, d)
        for module in (self.adaln_single, self.caption_projection):
            mark_pipeline_replicated_params(module, primary=self.pre_process)

        sparse_n = cfg.block_sparse_n
        self.blocks = nn.ModuleDict(
            {str(i): DiTBlock(cfg, plan, sparse_n[i], group=(i % 2 == 1)) for i in self.block_range}
        )

        self.norm_out = self.proj_out = self.scale_shift_table = None
        if self.post_process:
            self.norm_out = LayerNormFP32(d, eps=cfg.norm_eps, elementwise_affine=False)
            self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
            self.proj_out = nn.Linear(d, cfg.patch_size * cfg.patch_size * cfg.out_channels)
            mark_sequence_parallel_params(self.proj_out, plan)
        self._init_weights()
        self.set_recompute(cfg.recompute, cfg.recompute_num_layers)

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        linears = [m for m in self.modules() if type(m) is nn.Linear or isinstance(m, nn.Conv2d)]
        for m in linears:
            if self.inpaint is not None and m in (self.inpaint.masked_video_proj, self.inpaint.mask_proj):
                continue  # zero-initialised: a T2V model extended to I2V starts unchanged
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_recompute(self, mode: str, num_layers: int | None = None) -> None:
        """Recompute whole blocks ('full'), only their FFN part ('ffn'), or nothing ('none');
        `num_layers` counts blocks over the whole model."""
        limit = self.cfg.num_layers if num_layers is None else num_layers
        self.recompute_full = mode == "full"
        for i, block in self.blocks.items():
            block.recompute_ffn = mode == "ffn" and int(i) < limit
        self._recompute_limit = limit if mode == "full" else 0

    def _run_block(self, index, block, x, c, t6, rope, video_keep, text_keep):
        recompute = self.recompute_full and index < self._recompute_limit
        constants = (rope, video_keep, text_keep, self.attention_backend)
        return run_maybe_recomputed(recompute, block, (x, c, t6), *constants)

    def forward(
        self,
        latents_BCTHW: torch.Tensor,
        timestep_B: torch.Tensor,
        text_BLC: torch.Tensor,
        pooled_BP: torch.Tensor | None = None,
        text_mask_BL: torch.Tensor | None = None,
        video_mask_BTHW: torch.Tensor | None = None,
        masked_latents_BCTHW: torch.Tensor | None = None,
        inpaint_mask_BMTHW: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prediction [B, C_out, T, H, W] for noisy latents at DDPM timesteps.

        I2V models also take the masked-video latents and the compressed mask [B, M, T, H, W]
        (1 = generate, 0 = given) in the layout of their version (`v12_inpaint_mask_layout`). A
        pipeline chunk before the last returns the video stream for the next stage instead.
        """
        cfg, plan = self.cfg, self.plan
        b, _, t, h, w = latents_BCTHW.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent height/width {h}x{w} must be multiples of the patch size {p}")
        hp, wp = h // p, w // p

        # 1. Masks (full sequences, used inside attention) and RoPE tables for the global grid.
        #    None where every key is valid, so that the kernels without a mask can run.
        video_keep_BN = None if video_mask_BTHW is None else self._video_keep(video_mask_BTHW, b, t, h, w)
        text_keep_BL = None if text_mask_BL is None else _keep_some(text_mask_BL == 1)
        video_keep_BN, text_keep_BL = drop_full_masks(video_keep_BN, text_keep_BL)
        rope = rope_3d_tables(
            (t, hp, wp),
            cfg.head_dim,
            (cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w),
            device=latents_BCTHW.device,
            axis_dims=(cfg.head_dim // 3,) * 3,
            angle_dtype=_ANGLE_DTYPES[cfg.rope_angle_dtype],
        )

        # 2. Conditioning, replicated on every chunk: AdaLN-single and the caption on this rank's
        #    text slice (split like the video under CP and SP).
        t6_BX, emb_BD = self.adaln_single(timestep_B)
        t6_6BD = t6_BX.reshape(b, 6, -1).transpose(0, 1)
        text_LBC = split_tokens_for_context_parallel(text_BLC.transpose(0, 1), plan)
        c_LBD = scatter_to_sequence_parallel(self.caption_projection(text_LBC), plan)

        # 3. Video tokens of this rank's frames (first chunk) or from the previous stage.
        if self.pre_process:
            x_SBD = self.patch_embed(split_frames_for_context_parallel(latents_BCTHW, plan))
            if self.inpaint is not None:
                if masked_latents_BCTHW is None or inpaint_mask_BMTHW is None:
                    raise ValueError("this I2V model needs masked_latents_BCTHW and inpaint_mask_BMTHW")
                x_SBD = x_SBD + self.inpaint(
                    split_frames_for_context_parallel(masked_latents_BCTHW, plan),
                    split_frames_for_context_parallel(inpaint_mask_BMTHW, plan),
                )
            x_SBD = scatter_to_sequence_parallel(x_SBD, plan)
        else:
            x_SBD = self._received(t // plan.context_parallel * hp * wp // plan.sequence_parallel_size)

        # 4. Blocks.
        for index in self.block_range:
            block = self.blocks[str(index)]
            x_SBD = self._run_block(index, block, x_SBD, c_LBD, t6_6BD, rope, video_keep_BN, text_keep_BL)
        if not self.post_process:
            return x_SBD

        # 5. Output head: affine-free LayerNorm, modulation by the final table + emb, projection.
        mod = sum_grads_over_sequence_shards(self.scale_shift_table[:, None] + emb_BD[None], plan)
        shift, scale = mod.chunk(2, dim=0)
        x_SBD = self.proj_out(modulate(self.norm_out(x_SBD), shift, scale))

        # 6. Gather the sequence, unpatchify (channels ordered p_h, p_w, C), gather the frames.
        x_SBD = gather_from_sequence_parallel(x_SBD, plan)
        t_local = t // plan.context_parallel
        x = x_SBD.reshape(t_local, hp, wp, b, p, p, cfg.out_channels)
        x = torch.einsum("thwbpqc->bcthpwq", x).reshape(b, cfg.out_channels, t_local, h, w)
        return gather_frames_from_context_parallel(x, plan)

    def _received(self, n_video: int) -> torch.Tensor:
        if self.input_tensor is None:
            raise ValueError(
                "this pipeline chunk received no input tensor; set_input_tensor must precede forward"
            )
        if self.input_tensor.shape[0] != n_video:
            raise ValueError(f"received {self.input_tensor.shape[0]} video tokens, expected {n_video}")
        return self.input_tensor

    def _video_keep(self, video_mask_BTHW, b, t, h, w) -> torch.Tensor:
        """Latent-level mask [B, T, H, W] (1 = valid) -> token validity [B, N] (max over each patch, != 0)."""
        p = self.cfg.patch_size
        m = video_mask_BTHW.float().reshape(b * t, 1, h, w)
        m = F.max_pool2d(m, kernel_size=p, stride=p)
        return _keep_some(m.reshape(b, -1) != 0)


def _keep_some(keep_BS: torch.Tensor) -> torch.Tensor:
    """A sample with no valid key keeps them all: the release's uniform -10000 bias does the same."""
    return keep_BS | ~keep_BS.any(dim=-1, keepdim=True)
