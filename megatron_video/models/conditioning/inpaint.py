"""Inpainting (I2V) conditioning: masked-video latents and the compressed mask as extra tokens.

As in Open-Sora-Plan's inpainting models, the conditions are not concatenated to the input
channels; each goes through its own patch embedding followed by a zero-initialised
Linear(D, D, no bias), and the results are added to the video tokens. A T2V model extended with
this module therefore computes exactly what it computed before, until training moves the
zero-initialised linears.

Shapes: masked latents [B, C, T, H, W]; mask [B, M, T, H, W] with M = VAE temporal stride (the
stride pixel frames of each latent step as channels); tokens [T*H/p*W/p, B, D].

Precision: the patch embeddings are fp32; the two D x D projections run over every token, so they
take the transformer linears' dtype (`dtype`, bf16 under runtime.dtype=bf16) and return fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_video.models.common.layers import PatchEmbed2D, TokenLinear


class InpaintConditioning(nn.Module):
    """Sum of two zero-initialised embeddings of (masked latents, mask)."""

    def __init__(
        self,
        latent_channels: int,
        mask_channels: int,
        dim: int,
        patch: int,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.masked_video_embed = PatchEmbed2D(latent_channels, dim, patch)
        self.masked_video_proj = TokenLinear(dim, dim, bias=False, dtype=dtype)
        self.mask_embed = PatchEmbed2D(mask_channels, dim, patch)
        self.mask_proj = TokenLinear(dim, dim, bias=False, dtype=dtype)
        nn.init.zeros_(self.masked_video_proj.weight)
        nn.init.zeros_(self.mask_proj.weight)

    def forward(self, masked_latents_BCTHW: torch.Tensor, mask_BMTHW: torch.Tensor) -> torch.Tensor:
        """Tokens [N, B, D] to add to the patch-embedded noisy latents."""
        video = self.masked_video_proj(self.masked_video_embed(masked_latents_BCTHW))
        mask = self.mask_proj(self.mask_embed(mask_BMTHW.to(masked_latents_BCTHW.dtype)))
        return video + mask
