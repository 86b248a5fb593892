"""The frozen encoders of a training run: the VAE and the text encoder(s)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_video.models.causal_vae.config import CausalVAEConfig
from megatron_video.models.wfvae.config import WFVAEConfig


@dataclass
class VAESection:
    """Which VAE maps pixels to latents, and from which weights."""

    kind: Literal["wfvae", "causal_vae"] = "wfvae"
    """WF-VAE (v1.3 4x8x8 / v1.5 8x8x8) or the v1.2 CausalVideoVAE."""

    flavor: str = "wfvae_8x8x8_d32"
    """Size preset of the chosen VAE (its FLAVORS dict)."""

    checkpoint: str | None = None
    """Weights: a flat export of ours (.safetensors beside a .json), an Open-Sora-Plan folder
    (config.json + weights) or training .ckpt; None keeps the random initialisation (tests only)."""

    use_ema: bool = True
    """Prefer EMA weights when the checkpoint has them."""

    chunked: bool = True
    """Encode / decode with exact causal-cache temporal chunking (bounded memory)."""

    sample_posterior: bool = True
    """Train on posterior samples (as released) rather than posterior means."""

    def model_config(self) -> WFVAEConfig | CausalVAEConfig:
        """The VAE's geometry from its flavor (a flat export's own config may refine it at load)."""
        if self.kind == "causal_vae":
            return CausalVAEConfig.from_flavor(self.flavor)
        return WFVAEConfig.from_flavor(self.flavor, chunked=self.chunked)

    @property
    def latent_channels(self) -> int:
        """Channels of the configured VAE's latents (what the denoiser's in_channels must be)."""
        c = self.model_config()
        return c.latent_channels if isinstance(c, CausalVAEConfig) else c.latent_dim

    @property
    def strides(self) -> tuple[int, int]:
        """(temporal, spatial) compression of the configured VAE."""
        c = self.model_config()
        return c.temporal_stride, c.spatial_stride
