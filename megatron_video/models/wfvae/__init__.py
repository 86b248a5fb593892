"""WF-VAE (Open-Sora-Plan v1.3 WF-VAE-S 4x8x8 and v1.5 WF-VAE-M 8x8x8)."""

from megatron_video.models.wfvae.config import FLAVORS, WFVAEConfig
from megatron_video.models.wfvae.model import WFVAE, DiagonalGaussian, TemporalCache

__all__ = ["FLAVORS", "WFVAE", "DiagonalGaussian", "TemporalCache", "WFVAEConfig"]
