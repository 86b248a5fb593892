"""CausalVideoVAE: the 4x8x8 video VAE of Open-Sora-Plan v1.2.

Shape legend
    B batch, C channels, T/H/W frames/height/width. Pixel video is [B, 3, T, H, W] in [-1, 1] with
    T = 1 + k * s_t (s_t = temporal stride, 4 released); latents are [B, Z, 1 + k, H/8, W/8].

An SD-style encoder/decoder (levels of ResNet blocks, a ResNet-attention-ResNet middle) with causal
3D convs (frame 0 replicated in front) and GroupNorm (released; main's code also offers LayerNorm).
GroupNorm statistics span every frame of a 3D block, so frame 0's latent depends on later frames
and temporal chunking cannot be exact; this model runs whole clips (optionally in blended spatial
tiles, approximate). The module tree
mirrors the released checkpoint, so `state_dict_adapter.py` only checks and files keys. The layers
are WF-VAE's (same released modules), imported from `models/wfvae/model.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_video.models.causal_vae.config import CausalVAEConfig
from megatron_video.models.wfvae.model import (
    AttnBlock,
    CausalConv3d,
    DiagonalGaussian,
    Downsample2D,
    Downsample3D,
    FrameConv2d,
    ResnetBlock2D,
    ResnetBlock3D,
    Upsample3D,
    decode_spatial_tiles,
    frame_count_error,
    make_norm,
)


class SpatialUpsample2x(nn.Module):
    """Frame-wise 2x nearest spatial upsampling, then a causal (1, 3, 3) conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, (1, 3, 3), padding=1)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BCTHW, scale_factor=(1, 2, 2), mode="nearest"))


def _resnet(kind: str, c_in: int, c_out: int, norm: str, dropout: float) -> nn.Module:
    return (ResnetBlock2D if kind == "ResnetBlock2D" else ResnetBlock3D)(c_in, c_out, norm, dropout)


def _downsampler(kind: str, channels: int) -> nn.Module:
    return (Downsample2D if kind == "Downsample" else Downsample3D)(channels, channels)


def _upsampler(kind: str, channels: int) -> nn.Module:
    if kind == "SpatialUpsample2x":
        return SpatialUpsample2x(channels, channels)
    return Upsample3D(channels, channels, "trilinear", joint=True)


class _Middle(nn.Module):
    def __init__(self, channels: int, norm: str, attn_norm: str, dropout: float, backend: str):
        super().__init__()
        self.block_1 = ResnetBlock3D(channels, channels, norm, dropout)
        self.attn_1 = AttnBlock(channels, attn_norm, backend)
        self.block_2 = ResnetBlock3D(channels, channels, norm, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Video [B, 3, T, H, W] -> encoder output [B, 2 * z_channels, T_lat, H/8, W/8]."""

    def __init__(self, cfg: CausalVAEConfig, backend: str = "sdpa"):
        super().__init__()
        hs, mult = cfg.hidden_size, cfg.hidden_size_mult
        if cfg.encoder_conv_in == "Conv2d":
            self.conv_in = FrameConv2d(3, hs, 3, padding=1)
        else:
            self.conv_in = CausalConv3d(3, hs, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = hs
        for m, kind, down in zip(mult, cfg.encoder_resnet_blocks, cfg.encoder_spatial_downsample):
            level = nn.Module()
            c_out = hs * m
            level.block = nn.ModuleList(
                _resnet(kind, c_in if j == 0 else c_out, c_out, cfg.norm_type, cfg.dropout)
                for j in range(cfg.num_res_blocks)
            )
            if down:
                level.downsample = _downsampler(down, c_out)
            self.down.append(level)
            c_in = c_out
        # The original passes no norm type to the encoder's middle attention: it is always GroupNorm.
        self.mid = _Middle(c_in, cfg.norm_type, "groupnorm", cfg.dropout, backend)
        self.norm_out = make_norm(c_in, cfg.norm_type)
        self.conv_out = CausalConv3d(c_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        # 1. Levels: ResNet blocks, then the level's downsampler (2x space, and time where 3D).
        h = self.conv_in(video_BCTHW)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        # 2. Middle (ResNet, per-frame attention, ResNet) and the output conv.
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Decoder input [B, z_channels, T_lat, H, W] -> video [B, 3, 1 + (T_lat-1)*s_t, 8H, 8W]."""

    def __init__(self, cfg: CausalVAEConfig, backend: str = "sdpa"):
        super().__init__()
        hs, mult = cfg.hidden_size, cfg.hidden_size_mult
        c_in = hs * mult[-1]
        self.conv_in = CausalConv3d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _Middle(c_in, cfg.norm_type, cfg.norm_type, cfg.dropout, backend)
        levels = [nn.Module() for _ in mult]
        for i in reversed(range(len(mult))):  # built from the deepest level, as released
            c_out = hs * mult[i]
            levels[i].block = nn.ModuleList(
                ResnetBlock3D(c_in if j == 0 else c_out, c_out, cfg.norm_type, cfg.dropout)
                for j in range(cfg.num_res_blocks + 1)
            )
            if cfg.decoder_spatial_upsample[i]:
                levels[i].upsample = _upsampler(cfg.decoder_spatial_upsample[i], c_out)
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = make_norm(c_in, cfg.norm_type)
        self.conv_out = CausalConv3d(c_in, 3, 3, padding=1)

    def forward(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        # 1. Input conv and middle at latent resolution.
        h = self.mid(self.conv_in(z_BCTHW))
        # 2. Levels from the deepest: ResNet blocks, then the level's upsampler.
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        # 3. Output: norm, SiLU, causal conv to RGB.
        return self.conv_out(F.silu(self.norm_out(h)))


class CausalVAE(nn.Module):
    """Open-Sora-Plan v1.2 CausalVideoVAE with the released latent scaling (z * 0.18215)."""

    def __init__(self, cfg: CausalVAEConfig, attention_backend: str = "sdpa"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg, attention_backend)
        self.decoder = Decoder(cfg, attention_backend)
        if cfg.use_quant_layer:
            self.quant_conv = CausalConv3d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
            self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def temporal_stride(self) -> int:
        """Pixel frames per latent frame after the first (4 released)."""
        return self.cfg.temporal_stride

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel (8 released)."""
        return self.cfg.spatial_stride

    @property
    def latent_channels(self) -> int:
        """Latent channels (4 released)."""
        return self.cfg.latent_channels

    def valid_num_frames(self, num_frames: int) -> bool:
        """Whether a video of `num_frames` frames can be encoded (1 + k * temporal_stride)."""
        return num_frames >= 1 and (num_frames - 1) % self.temporal_stride == 0

    def _check_video(self, video_BCTHW: torch.Tensor) -> None:
        if video_BCTHW.dim() != 5 or video_BCTHW.shape[1] != 3:
            raise ValueError(f"expected an RGB video [B, 3, T, H, W], got shape {tuple(video_BCTHW.shape)}")
        t, h, w = video_BCTHW.shape[2:]
        if not self.valid_num_frames(t):
            raise frame_count_error(f"CausalVAE {self.temporal_stride}x8x8", t, self.temporal_stride)
        if h % self.spatial_stride or w % self.spatial_stride:
            raise ValueError(
                f"video height and width must be multiples of {self.spatial_stride}, got {h}x{w}"
            )

    def encode(self, video_BCTHW: torch.Tensor) -> DiagonalGaussian:
        """Posterior of a video in [-1, 1], [B, 3, T, H, W] -> moments [B, 2Z, T_lat, H/8, W/8]."""
        self._check_video(video_BCTHW)
        h = self.encoder(video_BCTHW)
        if self.cfg.use_quant_layer:
            h = self.quant_conv(h)
        return DiagonalGaussian(h)

    def decode(
        self, z_BCTHW: torch.Tensor, tile_size: int | None = None, tile_overlap: float = 0.25
    ) -> torch.Tensor:
        """Video [B, 3, 1 + (T_lat-1)*s_t, 8H, 8W] from raw latents [B, Z, T_lat, H, W].

        `tile_size` (latent pixels) decodes overlapping spatial tiles and blends them: APPROXIMATE
        near tile borders (GroupNorm statistics and receptive fields differ per tile).
        """
        if z_BCTHW.dim() != 5 or z_BCTHW.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents [B, {self.latent_channels}, T, H, W], got shape {tuple(z_BCTHW.shape)}"
            )

        def run(z: torch.Tensor) -> torch.Tensor:
            if self.cfg.use_quant_layer:
                z = self.post_quant_conv(z)
            return self.decoder(z)

        if tile_size is None:
            return run(z_BCTHW)
        return decode_spatial_tiles(run, z_BCTHW, tile_size, tile_overlap, self.spatial_stride)

    def encode_latents(
        self, video_BCTHW: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised latents z * scaling_factor, z sampled from the posterior (or its mean)."""
        posterior = self.encode(video_BCTHW)
        z = posterior.sample(generator) if sample else posterior.mean
        return z * self.cfg.scaling_factor

    def decode_latents(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        """Video from normalised latents: decode(latents / scaling_factor)."""
        return self.decode(latents_BCTHW / self.cfg.scaling_factor)

    def forward(
        self, video_BCTHW: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (the training forward)."""
        posterior = self.encode(video_BCTHW)
        z = posterior.sample(generator) if sample else posterior.mean
        return self.decode(z), posterior
