"""CausalVideoVAE (Open-Sora-Plan v1.2) hyper-parameters and size presets.

The defaults are the released v1.2 layout (`LanguageBind/Open-Sora-Plan-v1.2.0/vae`, also
mindspeed-mm `examples/opensoraplan1.2/model_opensoraplan1_2.json`): 4x8x8, 4 latent channels,
GroupNorm everywhere, latents scaled by 0.18215. Level layouts are given by the released module
names so a `config.json` maps onto the fields one to one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from megatron_video.errors import ConfigError

ENCODER_BLOCKS = ("ResnetBlock2D", "ResnetBlock3D")
DOWNSAMPLERS = ("", "Downsample", "Spatial2xTime2x3DDownsample")
DECODER_BLOCKS = ("ResnetBlock3D",)
UPSAMPLERS = ("", "SpatialUpsample2x", "Spatial2xTime2x3DUpsample")


@dataclass
class CausalVAEConfig:
    """Geometry of a v1.2 CausalVideoVAE."""

    flavor: str = "causal_vae_4x8x8_d4"
    """Name of the size preset the other fields start from (a key of `FLAVORS`)."""

    hidden_size: int = 128
    """Width of the first level; level i uses hidden_size * hidden_size_mult[i]."""

    hidden_size_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    """Width multiplier per level (encoder order; the decoder mirrors it)."""

    z_channels: int = 4
    """Channels of the encoder output / decoder input (before the quant convs)."""

    embed_dim: int = 4
    """Latent channels after `quant_conv` (the posterior's channels)."""

    num_res_blocks: int = 2
    """ResNet blocks per encoder level; decoder levels have one more."""

    use_quant_layer: bool = True
    """1x1x1 causal convs between encoder and posterior (quant_conv) and latents and decoder."""

    dropout: float = 0.0
    """Dropout inside ResNet blocks (training only)."""

    encoder_conv_in: str = "Conv2d"
    """First encoder conv: frame-wise 'Conv2d' (released) or 'CausalConv3d'."""

    encoder_resnet_blocks: list[str] = field(
        default_factory=lambda: ["ResnetBlock2D", "ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D"]
    )
    """ResNet block kind per encoder level ('ResnetBlock2D' is frame-wise)."""

    encoder_spatial_downsample: list[str] = field(
        default_factory=lambda: [
            "Downsample",
            "Spatial2xTime2x3DDownsample",
            "Spatial2xTime2x3DDownsample",
            "",
        ]
    )
    """Downsampler after each encoder level: '' (none), 'Downsample' (2x space, frame-wise) or
    'Spatial2xTime2x3DDownsample' (2x space and time, causal)."""

    decoder_spatial_upsample: list[str] = field(
        default_factory=lambda: [
            "",
            "SpatialUpsample2x",
            "Spatial2xTime2x3DUpsample",
            "Spatial2xTime2x3DUpsample",
        ]
    )
    """Upsampler after each decoder level, indexed like the encoder levels (the decoder runs them
    from the last index down): '', 'SpatialUpsample2x' or 'Spatial2xTime2x3DUpsample'."""

    norm_type: Literal["groupnorm", "layernorm"] = "groupnorm"
    """Norm of the ResNet blocks, the decoder's middle attention and both output norms: GroupNorm
    (32 groups, released) or channel-last LayerNorm. As in the original code, the encoder's middle
    attention uses GroupNorm either way."""

    scaling_factor: float = 0.18215
    """Latent scale: normalised latents are z * scaling_factor (v1.2 wrapper)."""

    @property
    def temporal_stride(self) -> int:
        """Pixel frames per latent frame after the first."""
        return 2 ** sum(d == "Spatial2xTime2x3DDownsample" for d in self.encoder_spatial_downsample)

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel."""
        return 2 ** sum(bool(d) for d in self.encoder_spatial_downsample)

    @property
    def latent_channels(self) -> int:
        """Channels of the posterior and of the latents the decoder takes."""
        return self.embed_dim if self.use_quant_layer else self.z_channels

    @classmethod
    def from_flavor(cls, name: str, **overrides) -> CausalVAEConfig:
        """The preset `name` with `overrides` applied on top."""
        if name not in FLAVORS:
            raise ConfigError(f"unknown CausalVAE flavor '{name}'; choose one of {sorted(FLAVORS)}")
        return dataclasses.replace(cls(), flavor=name, **{**FLAVORS[name], **overrides})

    def validate(self) -> None:
        """Raise ConfigError when the VAE cannot be built as configured."""
        n = len(self.hidden_size_mult)
        for name in ("encoder_resnet_blocks", "encoder_spatial_downsample", "decoder_spatial_upsample"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"vae.{name} has {len(getattr(self, name))} entries but hidden_size_mult has {n} levels"
                )
        for name, allowed in (
            ("encoder_resnet_blocks", ENCODER_BLOCKS),
            ("encoder_spatial_downsample", DOWNSAMPLERS),
            ("decoder_spatial_upsample", UPSAMPLERS),
        ):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ConfigError(f"vae.{name} has unsupported entries {bad}; choose from {allowed}")
        if self.encoder_conv_in not in ("Conv2d", "CausalConv3d"):
            raise ConfigError(
                f"vae.encoder_conv_in='{self.encoder_conv_in}'; choose 'Conv2d' or 'CausalConv3d'"
            )
        for name in ("hidden_size", "z_channels", "embed_dim", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vae.{name} must be >= 1, got {getattr(self, name)}")
        if self.norm_type not in ("groupnorm", "layernorm"):
            raise ConfigError(f"vae.norm_type='{self.norm_type}'; choose 'groupnorm' or 'layernorm'")
        if self.norm_type == "groupnorm":
            widths = sorted({self.hidden_size * m for m in self.hidden_size_mult})
        else:  # only the encoder's middle attention keeps GroupNorm
            widths = [self.hidden_size * self.hidden_size_mult[-1]]
        if any(w % 32 for w in widths):
            raise ConfigError(
                f"vae widths {widths} must be multiples of 32 (GroupNorm with 32 groups); "
                "change hidden_size or hidden_size_mult"
            )
        up_t = 2 ** sum(u == "Spatial2xTime2x3DUpsample" for u in self.decoder_spatial_upsample)
        up_s = 2 ** sum(bool(u) for u in self.decoder_spatial_upsample)
        if (up_t, up_s) != (self.temporal_stride, self.spatial_stride):
            raise ConfigError(
                f"decoder upsamples {up_t}x in time and {up_s}x in space but the encoder downsamples "
                f"{self.temporal_stride}x and {self.spatial_stride}x; make them mirror each other"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"vae.dropout must be in [0, 1), got {self.dropout}")
        if self.scaling_factor == 0:
            raise ConfigError("vae.scaling_factor must not be 0 (latents are divided by it when decoding)")


FLAVORS: dict[str, dict] = {
    # Tests: the released layout at the smallest GroupNorm-compatible width (32 at every level).
    "tiny": dict(hidden_size=32, hidden_size_mult=[1, 1, 1, 1], num_res_blocks=1),
    # The released v1.2 CausalVideoVAE (`CausalVAEModel_D4_4x8x8`).
    "causal_vae_4x8x8_d4": dict(),
}
