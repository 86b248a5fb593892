"""Joint video/text attention with Skiparse sparsity (the SUV attention).

Shapes: N video tokens, L text tokens, B batch, h heads (this rank's), d head dim; sparse_n is
the Skiparse sparsity (`model.sparse_n` of the stage). A key mask of None means every key of that
stream is valid; the kernel then gets no mask unless Skiparse padding or the other stream needs one.

Per sub-sequence j of the video (see `skiparse.py`) the attended sequence is [video_j ; text]:
video queries see their sub-sequence and all text keys; the text is repeated sparse_n times,
attends once per sub-sequence, and its sparse_n outputs are averaged. Padded video keys, masked
latents and padded text tokens are excluded from every softmax. sparse_n = 1 is dense joint
attention.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megatron_video.models.common.layers import RMSNorm
from megatron_video.models.common.rope import apply_rope_3d
from megatron_video.models.common.skiparse import (
    skiparse_key_mask,
    skiparse_padding,
    skiparse_regroup,
    skiparse_ungroup,
)
from megatron_video.parallel.plan import ParallelPlan, ulysses_head_to_seq, ulysses_seq_to_head
from megatron_video.platform.attention import attention


def joint_skiparse_attention(
    q_NBhd: torch.Tensor,
    k_NBhd: torch.Tensor,
    v_NBhd: torch.Tensor,
    tq_LBhd: torch.Tensor,
    tk_LBhd: torch.Tensor,
    tv_LBhd: torch.Tensor,
    video_keep_BN: torch.Tensor | None,
    text_keep_BL: torch.Tensor | None,
    sparse_n: int,
    group: bool,
    backend: str = "sdpa",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention over full sequences; returns video [N, B, h, d] and text [L, B, h, d].

    `video_keep_BN` / `text_keep_BL` are True where a key is valid; None: all of that stream.
    """
    n, b = q_NBhd.shape[:2]
    num_text = tq_LBhd.shape[0]
    scale = q_NBhd.shape[-1] ** -0.5

    # 1. Pad the video to a multiple of sparse_n^2 and regroup into sparse_n sub-sequences
    # (batch j * B + b).
    pad = skiparse_padding(n, sparse_n) if sparse_n > 1 else 0
    video = [q_NBhd, k_NBhd, v_NBhd]
    if pad:
        video = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)) for t in video]
    if pad and video_keep_BN is None:  # the padded keys must be masked
        video_keep_BN = torch.ones(b, n, dtype=torch.bool, device=q_NBhd.device)
    video_keep, text, text_keep = video_keep_BN, [tq_LBhd, tk_LBhd, tv_LBhd], text_keep_BL
    if sparse_n > 1:
        video = [skiparse_regroup(t, sparse_n, group) for t in video]
        video_keep = None if video_keep_BN is None else skiparse_key_mask(video_keep_BN, sparse_n, group)
        text = [t.repeat(1, sparse_n, 1, 1) for t in text]
        text_keep = None if text_keep_BL is None else text_keep_BL.repeat(sparse_n, 1)

    # 2. One softmax over [video_j ; text] per sub-sequence.
    q, k, v = (torch.cat([vt, tt], dim=0).permute(1, 2, 0, 3) for vt, tt in zip(video, text))
    keep = _joint_key_mask(video_keep, text_keep, q.shape[0], video[0].shape[0], num_text, q.device)
    out = attention(q, k, v, keep, scale, backend).permute(2, 0, 1, 3)  # [S_j + L, sparse_n*B, h, d]

    # 3. Undo the regrouping, drop the padding, average the sparse_n text outputs.
    out_video, out_text = out[: out.shape[0] - num_text], out[out.shape[0] - num_text :]
    if sparse_n > 1:
        out_video = skiparse_ungroup(out_video, sparse_n, group)
        out_text = out_text.reshape(num_text, sparse_n, b, *out_text.shape[2:]).mean(dim=1)
    return out_video[:n], out_text


def _joint_key_mask(video_keep, text_keep, batch, num_video, num_text, device) -> torch.Tensor | None:
    """[video ; text] key validity [batch, num_video + num_text], or None when every key is valid."""
    if video_keep is None and text_keep is None:
        return None
    if video_keep is None:
        video_keep = torch.ones(batch, num_video, dtype=torch.bool, device=device)
    if text_keep is None:
        text_keep = torch.ones(batch, num_text, dtype=torch.bool, device=device)
    return torch.cat([video_keep, text_keep], dim=1)


class JointSkiparseAttention(nn.Module):
    """Per-modality q/k/v projections, RMS QK-norm, 3D RoPE, Ulysses, Skiparse joint attention.

    Runs in the linears' dtype (bf16 under runtime.dtype=bf16): the inputs are cast to it, QK-norm
    and RoPE compute in fp32 and return it, and the outputs are returned in it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        plan: ParallelPlan,
        bias: bool = True,
        eps: float = 1e-6,
        context_pre_only: bool = False,
    ):
        super().__init__()
        cfg = plan.linear_config
        self.plan = plan
        self.head_dim = head_dim
        self.local_heads = num_heads // plan.tensor_parallel
        self.context_pre_only = context_pre_only

        def column(out_features: int) -> ColumnParallelLinear:
            return ColumnParallelLinear(
                dim,
                out_features,
                config=cfg,
                init_method=cfg.init_method,
                bias=bias,
                tp_group=plan.tensor_parallel_group,
            )

        def row() -> RowParallelLinear:
            return RowParallelLinear(
                num_heads * head_dim,
                dim,
                config=cfg,
                init_method=cfg.output_layer_init_method,
                bias=bias,
                input_is_parallel=True,
                skip_bias_add=False,
                tp_group=plan.tensor_parallel_group,
            )

        # Fused projections, rows laid out per head as [head, (q, k, v), head_dim] so that a
        # tensor-parallel split hands each rank whole heads.
        self.linear_qkv = column(3 * num_heads * head_dim)
        self.linear_added_qkv = column(3 * num_heads * head_dim)
        self.q_layernorm = RMSNorm(head_dim, eps)
        self.k_layernorm = RMSNorm(head_dim, eps)
        self.added_q_layernorm = RMSNorm(head_dim, eps)
        self.added_k_layernorm = RMSNorm(head_dim, eps)
        self.linear_proj = row()
        self.linear_added_proj = None if context_pre_only else row()

    def _qkv(self, x_SBD: torch.Tensor, linear: ColumnParallelLinear, q_norm: RMSNorm, k_norm: RMSNorm):
        # [S_cp, B, 3 * h_tp * d] (sequence gathered under SP), in the weight dtype.
        qkv, _ = linear(x_SBD.to(linear.weight.dtype))
        s, b = qkv.shape[:2]
        q, k, v = qkv.reshape(s, b, self.local_heads, 3, self.head_dim).unbind(dim=3)
        q, k = q_norm(q), k_norm(k)
        return [ulysses_seq_to_head(t, self.plan) for t in (q, k, v)]

    def forward(
        self,
        x_SBD: torch.Tensor,
        c_LBD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        video_keep_BN: torch.Tensor | None,
        text_keep_BL: torch.Tensor | None,
        sparse_n: int,
        group: bool,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Video [S, B, D] and text [L, B, D] shards in, projected attention outputs out."""
        # 1. Projections, QK-norm, all-to-all to the full sequence for this rank's heads.
        q, k, v = self._qkv(x_SBD, self.linear_qkv, self.q_layernorm, self.k_layernorm)
        tq, tk, tv = self._qkv(c_LBD, self.linear_added_qkv, self.added_q_layernorm, self.added_k_layernorm)
        # 2. 3D RoPE on video queries and keys at their global positions.
        q, k = apply_rope_3d(q, *rope_cos_sin), apply_rope_3d(k, *rope_cos_sin)
        # 3. Skiparse joint attention.
        out, out_text = joint_skiparse_attention(
            q, k, v, tq, tk, tv, video_keep_BN, text_keep_BL, sparse_n, group, backend
        )
        # 4. Back to the sequence split and the output projections.
        out = ulysses_head_to_seq(out, self.plan)
        out, _ = self.linear_proj(out.flatten(2))
        if self.context_pre_only:
            return out, None
        out_text = ulysses_head_to_seq(out_text, self.plan)
        out_text, _ = self.linear_added_proj(out_text.flatten(2))
        return out, out_text
