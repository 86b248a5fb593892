"""SUV: the sparse U-shaped MMDiT of Open-Sora-Plan v1.5.

Shape legend
    B batch, C latent channels, T/H/W latent frames/height/width, p spatial patch
    N = T * (H/p) * (W/p) video tokens, L text tokens, D width, E conditioning width (timestep_embed_dim)
    Suffixes give the layout: x_SBD is sequence-first [tokens, batch, width]. Inside a parallel run
    x_SBD holds this rank's token shard (see megatron_video/parallel/plan.py); shapes in comments are
    those of a single process.

Contract: model(latents_BCTHW, timestep_B, text_BLC, pooled_BP, text_mask_BL, video_mask_BTHW)
-> velocity_BCTHW, the full tensors on every rank whatever the parallel layout.

Precision (models/common/layers.py): the attention / FFN linears and the token-wise U-skip and
inpainting linears take `plan.linear_config.params_dtype` (bf16 under runtime.dtype=bf16); the
embeddings, norms, AdaLN, the output head and the video / text residual streams are fp32. Inputs of
any float dtype are cast on entry; the velocity is fp32.

Pipeline chunks: built with `blocks=range(a, b)` the model holds only those blocks of the global
list (stage by stage), under their global names. It takes the same inputs; a chunk after the
first starts from the tensor Megatron's schedule hands to `set_input_tensor`, and a chunk before
the last returns the packed streams and pending U-skips instead of the velocity
(megatron_video/parallel/pipeline.py).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_video.models.common.attention import JointSkiparseAttention
from megatron_video.models.common.layers import (
    AdaLNModulation,
    FeedForward,
    LayerNormFP32,
    PatchEmbed2D,
    PipelineChunkInput,
    TimestepTextEmbedding,
    TokenLinear,
    modulate,
    run_maybe_recomputed,
)
from megatron_video.models.common.rope import rope_3d_tables
from megatron_video.models.conditioning.inpaint import InpaintConditioning
from megatron_video.models.suv.config import SUVConfig
from megatron_video.parallel.pipeline import (
    mark_pipeline_replicated_params,
    pack_stage_tensors,
    unpack_stage_tensors,
)
from megatron_video.parallel.plan import (
    ParallelPlan,
    gather_frames_from_context_parallel,
    gather_from_sequence_parallel,
    mark_sequence_parallel_params,
    scatter_to_sequence_parallel,
    split_frames_for_context_parallel,
    split_tokens_for_context_parallel,
)
from megatron_video.platform.attention import drop_full_masks


class SUVBlock(nn.Module):
    """MMDiT block: AdaLN-Zero, joint (Skiparse) attention, per-modality FFN."""

    def __init__(
        self,
        cfg: SUVConfig,
        plan: ParallelPlan,
        sparse_n: int,
        group: bool,
        context_pre_only: bool = False,
    ):
        super().__init__()
        d, e = cfg.hidden_size, cfg.timestep_embed_dim
        self.sparse_n, self.group = sparse_n, group
        self.context_pre_only = context_pre_only
        self.double_ff = cfg.double_ff
        self.recompute_ffn = False
        self.norm1 = AdaLNModulation(e, d, 6, plan)
        self.norm1_video = LayerNormFP32(d, eps=cfg.norm_eps)
        self.norm1_text = LayerNormFP32(d, eps=cfg.norm_eps)
        self.attn = JointSkiparseAttention(
            d, cfg.num_heads, cfg.head_dim, plan, cfg.attention_bias, cfg.norm_eps, context_pre_only
        )
        self.norm2 = AdaLNModulation(e, d, 6, plan)
        self.norm2_video = LayerNormFP32(d, eps=cfg.norm_eps)
        self.ff = FeedForward(d, cfg.ff_mult, plan)
        has_text_ff = cfg.double_ff and not context_pre_only
        self.norm2_text = LayerNormFP32(d, eps=cfg.norm_eps) if has_text_ff else None
        self.ff_text = FeedForward(d, cfg.ff_mult, plan) if has_text_ff else None
        for norm in (self.norm1_video, self.norm1_text, self.norm2_video, self.norm2_text):
            if norm is not None:
                mark_sequence_parallel_params(norm, plan)

    def forward(self, x_SBD, c_LBD, temb_BE, rope, video_keep_BN, text_keep_BL, backend):
        # 1. Attention half: modulate both streams, joint attention, gated residuals.
        sh, sc, g, sh_c, sc_c, g_c = self.norm1(temb_BE)
        xn = modulate(self.norm1_video(x_SBD), sh, sc)
        cn = modulate(self.norm1_text(c_LBD), sh_c, sc_c)
        attn_x, attn_c = self.attn(
            xn, cn, rope, video_keep_BN, text_keep_BL, self.sparse_n, self.group, backend
        )
        x_SBD = x_SBD + g * attn_x
        if not self.context_pre_only:
            c_LBD = c_LBD + g_c * attn_c
        # 2. FFN half.
        if self.recompute_ffn:
            return tensor_parallel.checkpoint(self._ffn_half, False, x_SBD, c_LBD, temb_BE)
        return self._ffn_half(x_SBD, c_LBD, temb_BE)

    def _ffn_half(self, x_SBD, c_LBD, temb_BE):
        sh, sc, g, sh_c, sc_c, g_c = self.norm2(temb_BE)
        xn = modulate(self.norm2_video(x_SBD), sh, sc)
        if self.context_pre_only:
            return x_SBD + g * self.ff(xn), c_LBD
        if self.double_ff:
            cn = modulate(self.norm2_text(c_LBD), sh_c, sc_c)
            return x_SBD + g * self.ff(xn), c_LBD + g_c * self.ff_text(cn)
        # Shared FFN over [video ; text]; the text enters unnormalised, as in the released model.
        out = self.ff(torch.cat([xn, c_LBD], dim=0))
        n = x_SBD.shape[0]
        return x_SBD + g * out[:n], c_LBD + g_c * out[n:]


class IndexedModules(nn.Module):
    """Modules registered under their global positions: a ModuleList that may hold a subset.

    A pipeline chunk keeps the positions of its blocks and skip fusions, so a parameter is named
    `stages.3.1.attn...` whatever the layout.
    """

    def __init__(self, modules: dict[int, nn.Module]):
        super().__init__()
        for index, module in modules.items():
            self.add_module(str(index), module)

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


def block_positions(cfg: SUVConfig) -> list[tuple[int, int]]:
    """(U-stage, index within the stage) of every block, in global order."""
    return [(s, i) for s, layers in enumerate(cfg.num_layers) for i in range(layers)]


def stage_first_blocks(cfg: SUVConfig) -> list[int]:
    """Global index of the first block of every U-stage."""
    return [sum(cfg.num_layers[:s]) for s in range(len(cfg.num_layers))]


def pending_skips(cfg: SUVConfig, boundary: int) -> int:
    """U-skips pushed before global block `boundary` and popped at or after it.

    Encoder stage s < mid pushes after its last block; decoder stage s > mid pops before its first.
    """
    if not cfg.skip_connection:
        return 0
    mid = len(cfg.num_layers) // 2
    starts = stage_first_blocks(cfg)
    pushed = sum(1 for s in range(mid) if starts[s] + cfg.num_layers[s] <= boundary)
    popped = sum(1 for s in range(mid + 1, len(cfg.num_layers)) if starts[s] < boundary)
    return pushed - popped


class SUVModel(PipelineChunkInput, MegatronModule):
    """Sparse U-shaped MMDiT denoiser predicting the flow velocity.

    A MegatronModule so that DDP, the distributed optimizer and `sharded_state_dict`
    (dist_checkpointing with TP resharding) work on it unchanged. `blocks` (a contiguous range of
    global block indices, all of them by default) makes it one pipeline chunk: the chunk holding
    block 0 embeds the inputs, the one holding the last block has the output head, and every
    chunk has the conditioning embedder.
    """

    def __init__(
        self,
        cfg: SUVConfig,
        plan: ParallelPlan,
        attention_backend: str = "sdpa",
        inpaint_mask_channels: int | None = None,
        blocks: range | None = None,
    ):
        super().__init__(config=plan.linear_config)
        cfg.validate()
        self.cfg, self.plan, self.attention_backend = cfg, plan, attention_backend
        total = cfg.total_layers
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
        self._positions = block_positions(cfg)
        d, e = cfg.hidden_size, cfg.timestep_embed_dim
        matmul_dtype = plan.linear_config.params_dtype  # of the token-wise linears
        self.patch_embed = PatchEmbed2D(cfg.in_channels, d, cfg.patch_size) if self.pre_process else None
        # I2V: masked-video latents and the compressed mask (mask channels = VAE temporal stride).
        self.inpaint = None
        if inpaint_mask_channels is not None and self.pre_process:
            self.inpaint = InpaintConditioning(
                cfg.in_channels, inpaint_mask_channels, d, cfg.patch_size, dtype=matmul_dtype
            )
        self.time_text_embed = TimestepTextEmbedding(e, cfg.pooled_projection_dim)
        mark_pipeline_replicated_params(self.time_text_embed, primary=self.pre_process)
        self.caption_projection = nn.Linear(cfg.caption_channels, d) if self.pre_process else None

        num_stages = len(cfg.num_layers)
        held: dict[int, dict[int, SUVBlock]] = {}
        for g in self.block_range:
            s, i = self._positions[g]
            held.setdefault(s, {})[i] = SUVBlock(
                cfg,
                plan,
                sparse_n=cfg.sparse_n[s],
                group=(i % 2 == 1),
                context_pre_only=(s == num_stages - 1 and i == cfg.num_layers[s] - 1),
            )
        self.stages = IndexedModules({s: IndexedModules(stage) for s, stage in held.items()})

        # Long skips: decoder stage (num_stages // 2 + 1 + j) fuses the output of encoder stage
        # (num_stages // 2 - 1 - j) through Linear(2D -> D), for video and text alike. A chunk holds
        # the fusions of the decoder stages whose first block it holds.
        mid = num_stages // 2
        num_skips = mid if cfg.skip_connection else 0
        first_block = stage_first_blocks(cfg)
        fused = [j for j in range(num_skips) if first_block[mid + 1 + j] in self.block_range]
        self.skip_linears = IndexedModules({j: TokenLinear(2 * d, d, dtype=matmul_dtype) for j in fused})
        self.skip_linears_text = IndexedModules({j: TokenLinear(2 * d, d, dtype=matmul_dtype) for j in fused})
        # Without zero-init a LayerNorm(2D) precedes each skip linear; with it the norm is omitted.
        normed = [] if cfg.skip_connection_zero_init else fused
        self.skip_norms = IndexedModules({j: LayerNormFP32(2 * d, eps=cfg.norm_eps) for j in normed})
        self.skip_norms_text = IndexedModules({j: LayerNormFP32(2 * d, eps=cfg.norm_eps) for j in normed})

        head: list[nn.Module] = []
        self.norm_final = self.norm_out = self.norm_out_norm = self.proj_out = None
        if self.post_process:
            self.norm_final = LayerNormFP32(d, eps=cfg.norm_eps)
            self.norm_out = AdaLNModulation(e, d, 2, plan)
            self.norm_out_norm = LayerNormFP32(d, eps=cfg.norm_eps)
            self.proj_out = nn.Linear(d, cfg.patch_size * cfg.patch_size * cfg.out_channels)
            head = [self.norm_final, self.norm_out_norm, self.proj_out]
        for module in [self.skip_linears, self.skip_linears_text, *head]:
            mark_sequence_parallel_params(module, plan)
        self._init_weights()
        self.set_recompute(cfg.recompute, cfg.recompute_num_layers)

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        replicated = [self.caption_projection, self.patch_embed.proj] if self.pre_process else []
        replicated += [m for emb in self.time_text_embed.children() for m in emb.children()]
        for m in replicated:
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        for block in self.blocks():
            for lin in (block.attn.linear_qkv, block.attn.linear_added_qkv, block.attn.linear_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        for skips in (self.skip_linears, self.skip_linears_text):
            for lin in skips:
                self.init_skip_identity(lin)
        # AdaLN-Zero: every modulation and the output projection start at zero, so blocks start as
        # the identity and a fresh model predicts zero velocity.
        modulations = [b.norm1 for b in self.blocks()] + [b.norm2 for b in self.blocks()]
        if self.post_process:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)
            modulations.append(self.norm_out)
        for mod in modulations:
            nn.init.zeros_(mod.linear.weight)
            nn.init.zeros_(mod.linear.bias)

    def init_skip_identity(self, lin: nn.Linear) -> None:
        """Skip fusion weight [I | 0], bias 0 (zero-init) or the normal init otherwise."""
        d = self.cfg.hidden_size
        with torch.no_grad():
            if self.cfg.skip_connection_zero_init:
                lin.weight.zero_()
                lin.weight[:, :d].copy_(torch.eye(d))
            else:
                nn.init.normal_(lin.weight, std=self.cfg.init_std)
            lin.bias.zero_()

    def blocks(self) -> list[SUVBlock]:
        """Every block this model (chunk) holds, in global order."""
        return [self.stages[s][i] for s, i in (self._positions[g] for g in self.block_range)]

    def set_recompute(self, mode: str, num_layers: int | None = None) -> None:
        """Recompute whole blocks ('full'), only their FFN half ('ffn'), or nothing ('none').

        `num_layers` counts blocks over the whole model, so a pipeline chunk recomputes the same
        blocks as the full model would.
        """
        limit = self.cfg.total_layers if num_layers is None else num_layers
        self.recompute_full = mode == "full"
        for g, block in zip(self.block_range, self.blocks()):
            block.recompute_ffn = mode == "ffn" and g < limit
        self._recompute_limit = limit if mode == "full" else 0

    def _run_block(self, index, block, x, c, temb, rope, video_keep, text_keep):
        recompute = self.recompute_full and index < self._recompute_limit
        constants = (rope, video_keep, text_keep, self.attention_backend)
        return run_maybe_recomputed(recompute, block, (x, c, temb), *constants)

    def forward(
        self,
        latents_BCTHW: torch.Tensor,
        timestep_B: torch.Tensor,
        text_BLC: torch.Tensor,
        pooled_BP: torch.Tensor,
        text_mask_BL: torch.Tensor | None = None,
        video_mask_BTHW: torch.Tensor | None = None,
        masked_latents_BCTHW: torch.Tensor | None = None,
        inpaint_mask_BMTHW: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity [B, C_out, T, H, W] for noisy latents at timesteps sigma * 1000.

        I2V models (built with `inpaint_mask_channels`) also take the masked-video latents and the
        compressed mask (1 = frame to generate, 0 = kept condition). A pipeline chunk before the
        last returns the packed tensor for the next stage instead.
        """
        cfg, plan = self.cfg, self.plan
        b, _, t, h, w = latents_BCTHW.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent height/width {h}x{w} must be multiples of the patch size {p}")
        hp, wp = h // p, w // p

        # 1. Masks (full sequence, needed inside attention; None where every key is valid, so
        #    that the kernels without a mask can run) and RoPE tables for the global grid.
        video_keep_BN = None if video_mask_BTHW is None else self._video_keep(video_mask_BTHW, b, t, h, w)
        text_keep_BL = None if text_mask_BL is None else text_mask_BL == 1  # released: other values exclude
        video_keep_BN, text_keep_BL = drop_full_masks(video_keep_BN, text_keep_BL)
        rope = rope_3d_tables(
            (t, hp, wp),
            cfg.head_dim,
            (cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w),
            device=latents_BCTHW.device,
        )

        # 2. Embeddings on this rank's frames / text slice, then the sequence-parallel split. A
        #    later pipeline chunk instead unpacks both streams and the pending U-skips it received.
        temb_BE = self.time_text_embed(timestep_B, pooled_BP)
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
            text_LBC = split_tokens_for_context_parallel(text_BLC.transpose(0, 1), plan)
            c_LBD = self.caption_projection(text_LBC.to(self.caption_projection.weight.dtype))
            c_LBD = scatter_to_sequence_parallel(c_LBD, plan)
            skips: list[tuple[torch.Tensor, torch.Tensor]] = []
        else:
            n_video = (t // plan.context_parallel) * hp * wp // plan.sequence_parallel_size
            n_text = text_BLC.shape[1] // plan.context_parallel // plan.sequence_parallel_size
            x_SBD, c_LBD, skips = unpack_stage_tensors(
                self.input_tensor, n_video, n_text, pending_skips(cfg, self.block_range.start)
            )

        # 3. U-shaped stages with long skips (LIFO pairing of mirrored stages): a decoder stage pops
        #    before its first block, an encoder stage pushes after its last.
        mid = len(cfg.num_layers) // 2
        for index in self.block_range:
            s, i = self._positions[index]
            if i == 0 and s > mid and cfg.skip_connection:
                skip_x, skip_c = skips.pop()
                j = s - mid - 1
                x_SBD = torch.cat([x_SBD, skip_x], dim=-1)
                c_LBD = torch.cat([c_LBD, skip_c], dim=-1)
                if not cfg.skip_connection_zero_init:
                    x_SBD, c_LBD = self.skip_norms[j](x_SBD), self.skip_norms_text[j](c_LBD)
                x_SBD = self.skip_linears[j](x_SBD)
                c_LBD = self.skip_linears_text[j](c_LBD)
            x_SBD, c_LBD = self._run_block(
                index, self.stages[s][i], x_SBD, c_LBD, temb_BE, rope, video_keep_BN, text_keep_BL
            )
            if i == cfg.num_layers[s] - 1 and s < mid and cfg.skip_connection:
                skips.append((x_SBD, c_LBD))
        if not self.post_process:
            return pack_stage_tensors(x_SBD, c_LBD, skips)

        # 4. Output head: LayerNorm, AdaNorm (its own LayerNorm, then shift/scale), projection.
        x_SBD = self.norm_final(x_SBD)
        shift, scale = self.norm_out(temb_BE)
        x_SBD = modulate(self.norm_out_norm(x_SBD), shift, scale)
        x_SBD = self.proj_out(x_SBD)

        # 5. Gather the sequence, unpatchify, gather the frames.
        x_SBD = gather_from_sequence_parallel(x_SBD, plan)
        t_local = t // plan.context_parallel
        x = x_SBD.reshape(t_local, hp, wp, b, p, p, cfg.out_channels)
        x = torch.einsum("thwbpqc->bcthpwq", x).reshape(b, cfg.out_channels, t_local, h, w)
        return gather_frames_from_context_parallel(x, plan)

    def _video_keep(self, video_mask_BTHW, b, t, h, w) -> torch.Tensor:
        """Latent-level mask [B, T, H, W] (1 = valid) -> token validity [B, N] (max over each patch)."""
        p = self.cfg.patch_size
        m = video_mask_BTHW.float().reshape(b * t, 1, h, w)
        m = torch.nn.functional.max_pool2d(m, kernel_size=p, stride=p)
        return m.reshape(b, -1) > 0
