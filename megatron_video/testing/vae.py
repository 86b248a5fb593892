"""Small VAEs with seeded weights and inputs, for tests, golden fixtures and benchmarks."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_video.models.causal_vae.config import CausalVAEConfig
from megatron_video.models.causal_vae.model import CausalVAE
from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.model import WFVAE


def randomize_vae(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fill every parameter from a seeded generator; return the full state dict (buffers included).

    Conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), norm scales 1 + N(0, 0.1^2) and norm
    shifts N(0, 0.1^2), so every path carries signal of order one. Parameters are visited in
    sorted-name order, so a seed gives the same weights in every process. Buffers (the fixed Haar
    filters) are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
        for p in ("weight", "bias")
    }
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name in norms:
                p.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif p.dim() > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(noise * 0.05)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_wfvae(seed: int = 0, **overrides) -> WFVAE:
    """The tiny WF-VAE flavor (8x8x8 unless `temporal_compression=4`) with seeded weights, eval mode."""
    model = WFVAE(WFVAEConfig.from_flavor("tiny", **overrides))
    randomize_vae(model, seed)
    return model.eval()


def tiny_causal_vae(seed: int = 0, **overrides) -> CausalVAE:
    """The tiny CausalVAE flavor with seeded weights, eval mode."""
    model = CausalVAE(CausalVAEConfig.from_flavor("tiny", **overrides))
    randomize_vae(model, seed)
    return model.eval()


def random_video(batch: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth-ish random RGB video [B, 3, T, H, W] in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, frames, height, width, generator=gen) * 2 - 1
    drift = torch.linspace(-0.3, 0.3, frames).reshape(1, 1, frames, 1, 1)
    return (0.8 * base + drift).clamp(-1, 1)
