"""CausalVideoVAE (Open-Sora-Plan v1.2, 4x8x8, 4 latent channels)."""

from megatron_video.models.causal_vae.config import FLAVORS, CausalVAEConfig
from megatron_video.models.causal_vae.model import CausalVAE

__all__ = ["FLAVORS", "CausalVAE", "CausalVAEConfig"]
