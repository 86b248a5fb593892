"""Building blocks shared by the denoisers: norms, embeddings, AdaLN modulation, FFN.

Shapes: B batch, S tokens (sequence-first), D width, E conditioning width.
Tensor-parallel linears are Megatron's; their config and groups come from a `ParallelPlan`.

Precision (runtime.dtype=bf16; with fp32 every cast below is a no-op):
* bf16 weights and matmuls: the tensor-parallel linears of attention and FFN (Megatron's
  `params_dtype`) and the token-wise `TokenLinear`s (U-skip fusions, inpainting projections).
  Each casts its input to its weight dtype; attention runs on the bf16 q / k / v.
* fp32 weights and math: LayerNorm / RMS QK-norm (computed in fp32), the timestep + pooled-text
  embedding, the AdaLN linears and the shift / scale / gate math, the patch embeddings, the
  caption projection and the output head. They are per-sample or tiny, so fp32 costs nothing.
* The residual streams are fp32: a bf16 attention / FFN output meets an fp32 gate, and type
  promotion makes the update fp32. Megatron's `Float16Module` is not used: it would cast every
  parameter (norms, AdaLN, embedders) and every input (timesteps up to 1000, whose bf16 spacing
  is 4) to bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megatron_video.parallel.plan import ParallelPlan, sum_grads_over_sequence_shards


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class RMSNorm(nn.Module):
    """RMS norm over the last dimension with a learned scale, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def timestep_sinusoid(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (float) timesteps, cos half first."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half
    angles = t_B.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepTextEmbedding(nn.Module):
    """temb = MLP(sinusoid(t)) + MLP(pooled text), in fp32: [B] and [B, P] -> [B, E]."""

    def __init__(self, embed_dim: int, pooled_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.timestep_embedder = MLPEmbedder(embed_dim, embed_dim)
        self.text_embedder = MLPEmbedder(pooled_dim, embed_dim)

    def forward(self, t_B: torch.Tensor, pooled_BP: torch.Tensor) -> torch.Tensor:
        t_emb = self.timestep_embedder(timestep_sinusoid(t_B, self.embed_dim))
        return t_emb + self.text_embedder(pooled_BP.float())


class PatchEmbed2D(nn.Module):
    """Frame-wise Conv2d patch embedding: [B, C, T, H, W] -> tokens [T*H/p*W/p, B, D]."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video_BCTHW.shape
        frames = video_BCTHW.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).to(self.proj.weight.dtype)
        emb = self.proj(frames)  # [B*T, D, h', w']
        d = emb.shape[1]
        emb = emb.reshape(b, t, d, -1).permute(1, 3, 0, 2)  # [T, h'w', B, D]
        return emb.reshape(-1, b, d)


class AdaLNModulation(nn.Module):
    """SiLU(temb) -> column-parallel Linear(E -> n*D), gathered: [B, E] -> n tensors [1, B, D], fp32.

    The linear is split over TP like every AdaLN linear of the released model (dim 0); its weights
    are fp32 in every run (`plan.conditioning_config`). The result meets sequence-split tokens, so
    its gradient is summed over the sequence shards.
    """

    def __init__(self, embed_dim: int, dim: int, chunks: int, plan: ParallelPlan):
        super().__init__()
        self.plan = plan
        self.chunks = chunks
        self.linear = ColumnParallelLinear(
            embed_dim,
            chunks * dim,
            config=plan.conditioning_config,
            init_method=plan.conditioning_config.init_method,
            bias=True,
            gather_output=True,
            tp_group=plan.tensor_parallel_group,
        )

    def forward(self, temb_BE: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mod, _ = self.linear(F.silu(temb_BE)[None])
        mod = sum_grads_over_sequence_shards(mod, self.plan)
        return mod.chunk(self.chunks, dim=-1)


def modulate(x_SBD: torch.Tensor, shift_1BD: torch.Tensor, scale_1BD: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift."""
    return x_SBD * (1 + scale_1BD) + shift_1BD


class TokenLinear(nn.Linear):
    """nn.Linear over tokens computed in its weight dtype, returning its input's dtype.

    Built with `dtype=params_dtype` it runs in bf16 inside the fp32 residual stream (U-skip fusions,
    inpainting projections).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class FeedForward(nn.Module):
    """Column-parallel Linear(D -> mult*D) -> tanh-GELU (fp32) -> row-parallel Linear, biased
    only with `bias` (SUV: none; the v1.2 / v1.3 DiT: both).

    Runs in the linears' dtype: the input is cast to it and the output is returned in it.
    """

    def __init__(self, dim: int, mult: int, plan: ParallelPlan, bias: bool = False):
        super().__init__()
        cfg = plan.linear_config
        self.linear_fc1 = ColumnParallelLinear(
            dim,
            dim * mult,
            config=cfg,
            init_method=cfg.init_method,
            bias=bias,
            tp_group=plan.tensor_parallel_group,
        )
        self.linear_fc2 = RowParallelLinear(
            dim * mult,
            dim,
            config=cfg,
            init_method=cfg.output_layer_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=plan.tensor_parallel_group,
        )

    def forward(self, x_SBD: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(x_SBD.to(self.linear_fc1.weight.dtype))
        h = F.gelu(h.float(), approximate="tanh").type_as(h)
        out, _ = self.linear_fc2(h)
        return out


# -- pipeline chunks and recompute ------------------------------------------------------------------


class PipelineChunkInput:
    """Mixin of a model that can be a pipeline chunk: Megatron's schedule hands it the previous
    chunk's output through `set_input_tensor` (None on the first chunk)."""

    input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's pipeline schedule hands in the previous chunk's output (None on the first)."""
        if isinstance(input_tensor, list):
            (input_tensor,) = input_tensor
        self.input_tensor = input_tensor


def run_maybe_recomputed(recompute: bool, block: nn.Module, tensors: tuple, *constants):
    """`block(*tensors, *constants)`; with `recompute`, its activations are recomputed in backward
    (Megatron's checkpoint). `constants` (masks, RoPE tables, flags) carry no gradient."""
    if not recompute:
        return block(*tensors, *constants)
    from megatron.core import tensor_parallel

    return tensor_parallel.checkpoint(lambda *t: block(*t, *constants), False, *tensors)
