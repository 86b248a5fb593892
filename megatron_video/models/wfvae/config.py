"""WF-VAE (wavelet-driven energy-flow VAE) hyper-parameters and size presets.

The defaults are the released Open-Sora-Plan v1.5 WF-VAE-M (8x8x8, 32 latent channels). `FLAVORS`
maps a name to the fields that differ from those defaults; `WFVAEConfig.from_flavor("tiny")` builds
one. The released `config.json` spells the temporal compression as module names
(`l1_dowmsample_block`, ...); `state_dict_adapter.config_from_open_sora_plan` translates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from megatron_video.errors import ConfigError

# Latent statistics released with WF-VAE-M (`model_opensoraplan1_5.json`, ae.shift / ae.scale).
WFVAE_M_SHIFT = [
    -0.2129, 0.1226, 1.6328, 0.6211, -0.875, 0.6172, -0.5703, 0.1348,
    -0.2178, -0.9375, 0.3184, 0.3281, -0.0544, -0.1826, -0.2812, 0.4355,
    0.1621, -0.2578, 0.7148, -0.7422, -0.2295, -0.2324, -1.4922, 0.6328,
    1.125, -0.2578, -2.1094, 1.0391, 1.1797, -1.2422, -0.2988, -0.957,
]  # fmt: skip
WFVAE_M_SCALE = [
    0.7031, 0.7109, 1.5391, 1.2969, 0.7109, 1.4141, 1.3828, 2.1719,
    1.7266, 1.8281, 1.9141, 1.2031, 0.6875, 0.9609, 1.6484, 1.1875,
    1.5312, 1.1328, 0.8828, 0.6836, 0.8828, 0.9219, 1.6953, 1.4453,
    1.5312, 0.6836, 0.7656, 0.8242, 1.2344, 1.0312, 1.7266, 0.9492,
]  # fmt: skip


@dataclass
class WFVAEConfig:
    """Geometry, latent statistics and chunking defaults of a WF-VAE."""

    flavor: str = "wfvae_8x8x8_d32"
    """Name of the size preset the other fields start from (a key of `FLAVORS`)."""

    temporal_compression: Literal[4, 8] = 8
    """Frames per latent frame after the first: 8 (v1.5, the level-1 wavelet and down/upsampling are
    3D) or 4 (v1.3, they are 2D). Spatial compression is always 8."""

    latent_dim: int = 32
    """Latent channels Z (the posterior has 2Z: mean and log-variance)."""

    base_channels: int = 160
    """C0: width of the first encoder level; later levels use 2*C0 and 4*C0."""

    encoder_num_resblocks: int = 2
    """ResNet blocks in each of the encoder's two levels (down1, down2)."""

    decoder_num_resblocks: int = 2
    """ResNet blocks in each of the decoder's two levels (up2, up1) before their upsampler."""

    encoder_energy_flow_hidden_size: int = 128
    """E_enc: width the level-1 and level-2 wavelet bands are projected to before joining the encoder."""

    decoder_energy_flow_hidden_size: int = 128
    """E_dec: decoder channels split off to predict the level-2 and level-1 wavelet bands."""

    connect_res_layer_num: int = 1
    """ResNet blocks in each decoder energy-flow branch before its Conv2d to wavelet bands."""

    use_attention: bool = True
    """Per-frame single-head self-attention in the encoder and decoder middle blocks."""

    norm_type: Literal["layernorm", "groupnorm"] = "layernorm"
    """Channel-last LayerNorm (released; makes temporal chunking exact) or GroupNorm(32 groups),
    whose statistics span every frame of a 3D block, so chunked passes only approximate it."""

    t_interpolation: Literal["trilinear", "nearest"] = "trilinear"
    """Temporal interpolation of the decoder's 2x time upsamplers (v1.5 trilinear, v1.3 nearest)."""

    dropout: float = 0.0
    """Dropout inside ResNet blocks (training only)."""

    shift: list[float] = field(default_factory=lambda: list(WFVAE_M_SHIFT))
    """Per-channel latent shift: normalised latents are (z - shift) * scale."""

    scale: list[float] = field(default_factory=lambda: list(WFVAE_M_SCALE))
    """Per-channel latent scale (see `shift`)."""

    chunked: bool = True
    """Encode and decode in temporal chunks with causal caches (exact with layernorm, bounded memory)."""

    encode_chunk_frames: int | None = None
    """Pixel frames per encoder chunk after the first frame (a multiple of the temporal compression);
    None picks it from the video length as Open-Sora-Plan v1.5 does."""

    decode_chunk_latents: int | None = None
    """Latent frames per decoder chunk after the first one; None picks it as v1.5 does."""

    @property
    def temporal_stride(self) -> int:
        """Pixel frames per latent frame (after the first)."""
        return self.temporal_compression

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel along height and width."""
        return 8

    @classmethod
    def from_flavor(cls, name: str, **overrides) -> WFVAEConfig:
        """The preset `name` with `overrides` applied on top."""
        if name not in FLAVORS:
            raise ConfigError(f"unknown WF-VAE flavor '{name}'; choose one of {sorted(FLAVORS)}")
        return dataclasses.replace(cls(), flavor=name, **{**FLAVORS[name], **overrides})

    def validate(self) -> None:
        """Raise ConfigError when the VAE cannot be built or run as configured."""
        if self.temporal_compression not in (4, 8):
            raise ConfigError(
                f"vae.temporal_compression={self.temporal_compression}: WF-VAE compresses time by 4 "
                "(v1.3, 2D level-1 wavelet) or 8 (v1.5, 3D level-1 wavelet)"
            )
        for name in (
            "latent_dim",
            "base_channels",
            "encoder_num_resblocks",
            "decoder_num_resblocks",
            "encoder_energy_flow_hidden_size",
            "decoder_energy_flow_hidden_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"vae.{name} must be >= 1, got {getattr(self, name)}")
        if self.connect_res_layer_num < 0:
            raise ConfigError(f"vae.connect_res_layer_num must be >= 0, got {self.connect_res_layer_num}")
        if self.norm_type not in ("layernorm", "groupnorm"):
            raise ConfigError(f"vae.norm_type='{self.norm_type}'; choose 'layernorm' or 'groupnorm'")
        if self.t_interpolation not in ("trilinear", "nearest"):
            raise ConfigError(
                f"vae.t_interpolation='{self.t_interpolation}'; choose 'trilinear' or 'nearest'"
            )
        if self.norm_type == "groupnorm":
            c0, e_enc, e_dec = (
                self.base_channels,
                self.encoder_energy_flow_hidden_size,
                self.decoder_energy_flow_hidden_size,
            )
            widths = {c0, 2 * c0, 4 * c0, 2 * c0 + e_enc, 4 * c0 + e_dec, e_dec}
            bad = sorted(w for w in widths if w % 32)
            if bad:
                raise ConfigError(
                    f"vae.norm_type=groupnorm uses 32 groups, but these widths are not multiples of 32: "
                    f"{bad} (from base_channels={c0} and the energy-flow sizes); use layernorm or change them"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"vae.dropout must be in [0, 1), got {self.dropout}")
        for name in ("shift", "scale"):
            if len(getattr(self, name)) != self.latent_dim:
                raise ConfigError(
                    f"vae.{name} has {len(getattr(self, name))} values but latent_dim={self.latent_dim}; "
                    "give one per latent channel"
                )
        if any(s == 0 for s in self.scale):
            raise ConfigError("vae.scale must not contain 0 (latents are divided by it when decoding)")
        if self.encode_chunk_frames is not None and (
            self.encode_chunk_frames < 1 or self.encode_chunk_frames % self.temporal_stride
        ):
            raise ConfigError(
                f"vae.encode_chunk_frames={self.encode_chunk_frames} must be a positive multiple of the "
                f"temporal compression {self.temporal_stride}"
            )
        if self.decode_chunk_latents is not None and self.decode_chunk_latents < 1:
            raise ConfigError(f"vae.decode_chunk_latents must be >= 1, got {self.decode_chunk_latents}")


FLAVORS: dict[str, dict] = {
    # Tests and the CPU demo. 8x8x8 like v1.5: the VAE itself costs about the same either way (one
    # forward+backward at 17x64x64 on one CPU thread: 1.0 s for 8x8x8, 0.9 s for 4x8x8), but a
    # 17-frame clip becomes 3 latent frames instead of 5, so every denoiser step trains on 40% fewer
    # video tokens. latent_dim 8 matches the tiny SUV's in_channels.
    "tiny": dict(
        temporal_compression=8,
        latent_dim=8,
        base_channels=8,
        encoder_num_resblocks=1,
        decoder_num_resblocks=1,
        encoder_energy_flow_hidden_size=8,
        decoder_energy_flow_hidden_size=8,
        connect_res_layer_num=1,
        shift=[0.0] * 8,
        scale=[1.0] * 8,
    ),
    # Open-Sora-Plan v1.3 WF-VAE-S (`WFVAEModel_D8_4x8x8`, mindspeed-mm model_opensoraplan1_3.json).
    # Its shift/scale live only in the Hugging Face config.json (not in git); these are the code
    # defaults, and loading the released folder replaces them with the released values.
    "wfvae_4x8x8_d8": dict(
        temporal_compression=4,
        latent_dim=8,
        base_channels=128,
        encoder_energy_flow_hidden_size=64,
        decoder_energy_flow_hidden_size=128,
        connect_res_layer_num=1,
        t_interpolation="nearest",
        shift=[0.0] * 8,
        scale=[0.18215] * 8,
    ),
    # Open-Sora-Plan v1.5 WF-VAE-M (wfvae_888_dim32.ckpt).
    "wfvae_8x8x8_d32": dict(),
}
