"""WF-VAE: the wavelet-driven energy-flow video VAE of Open-Sora-Plan v1.3 (4x8x8) and v1.5 (8x8x8).

Shape legend
    B batch, C channels, T/H/W frames/height/width. Pixel video is [B, 3, T, H, W] in [-1, 1] with
    T = 1 + k * s_t (s_t = temporal stride 4 or 8); latents are [B, Z, 1 + k, H/8, W/8].
    Wavelet coefficients are subband-major: channel = subband * C + c, subbands ordered
    [LLL, LLH, LHL, LHH, HLL, HLH, HHL, HHH] (3D, time-height-width) or [LL, LH, HL, HH] (2D), so
    `coeffs[:, :3]` is the low-pass band of an RGB input.

Causality and chunking
    Every temporal operator sees only current and past frames, and frame 0 is handled alone (an
    image is a 1-frame video). A chunked pass feeds the frames in pieces with a `TemporalCache`:
    each causal layer keeps the frames its next outputs still need; the decoder's temporal
    upsamplers hold back the one output that depends on the next latent frame (trilinear
    interpolation looks ahead) until that frame arrives or the last chunk flushes it; where two
    streams meet, the one that is ahead waits. Every output frame is therefore computed from
    exactly the inputs of the unchunked pass (exact up to float summation order) with
    channel-last LayerNorm. GroupNorm statistics span all frames of a chunk, so with
    `norm_type="groupnorm"` chunked passes approximate the full one, as in the original.

The module tree mirrors the released checkpoints (`encoder.down1.0`, `decoder.up2.2.conv.conv`,
...) except the fixed Haar filters, which are one `kernels` buffer per transform here;
`state_dict_adapter.py` converts.

Numerics: outputs match the original code to about 1e-6 relative in fp32
(`tests/unit/test_vae_fidelity.py`). Only rounding differs, where the same value is computed another
way: main's SiLU is x * sigmoid(x), v1.5 attention is a fused NPU kernel, and the 3D Haar runs as one
8-filter conv instead of eight 1-filter convs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.platform.attention import attention

HAAR_3D_COEFF = 0.3536
"""Haar filter magnitude of the released code (not exactly 1/sqrt(8)); released weights were trained with it."""

# Sign patterns over (t, h, w) of the 3D Haar filters, in subband order LLL, LLH, LHL, LHH, HLL, HLH, HHL, HHH.
_HAAR_3D_SIGNS = (
    ((1, 1), (1, 1), (1, 1), (1, 1)),
    ((1, -1), (1, -1), (1, -1), (1, -1)),
    ((1, 1), (-1, -1), (1, 1), (-1, -1)),
    ((1, -1), (-1, 1), (1, -1), (-1, 1)),
    ((1, 1), (1, 1), (-1, -1), (-1, -1)),
    ((1, -1), (1, -1), (-1, 1), (-1, 1)),
    ((1, 1), (-1, -1), (-1, -1), (1, 1)),
    ((1, -1), (-1, 1), (-1, 1), (1, -1)),
)
# 2D Haar filters over (h, w) in subband order LL, LH, HL, HH, magnitude 1/2.
_HAAR_2D_SIGNS = (((1, 1), (1, 1)), ((1, 1), (-1, -1)), ((1, -1), (1, -1)), ((1, -1), (-1, 1)))


def haar_3d_kernels(coefficient: float = HAAR_3D_COEFF) -> torch.Tensor:
    """The 8 fixed 2x2x2 Haar filters, [8, 1, 2, 2, 2] (conv weight layout)."""
    signs = torch.tensor(_HAAR_3D_SIGNS, dtype=torch.float32).reshape(8, 1, 2, 2, 2)
    return signs * coefficient


def haar_2d_kernels() -> torch.Tensor:
    """The 4 fixed 2x2 Haar filters, [4, 1, 2, 2]."""
    return torch.tensor(_HAAR_2D_SIGNS, dtype=torch.float32).reshape(4, 1, 2, 2) / 2


# --------------------------------------------------------------------------------------------------
# Causal streaming state
# --------------------------------------------------------------------------------------------------


class TemporalCache:
    """What each causal layer carries from one chunk of a chunked pass to the next.

    Make one per encode or decode pass, give it to every chunk in order, and set `last = True`
    before the final chunk (the decoder's upsamplers then emit the frames they held back).
    Layers key their entries by themselves, so one cache serves one model at a time.
    """

    def __init__(self) -> None:
        self.last = False
        self.state: dict[object, object] = {}


def causal_window(
    x: torch.Tensor, kernel_t: int, stride_t: int, cache: TemporalCache | None, owner
) -> torch.Tensor:
    """The frames a causal temporal kernel convolves for input x [B, C, T, H, W].

    First chunk (or no cache): kernel_t - 1 copies of frame 0 in front. Later chunks: the frames of
    the previous chunk that later outputs still need. With a cache, those frames are stored and
    only whole output windows are returned.
    """
    if kernel_t == 1 and stride_t == 1:
        return x
    pending = None if cache is None else cache.state.get(owner)
    if pending is None:
        pending = x[:, :, :1].repeat(1, 1, kernel_t - 1, 1, 1)
    x = torch.cat([pending, x], dim=2)
    if cache is None:
        return x
    n_out = (x.shape[2] - kernel_t) // stride_t + 1
    if n_out < 1:
        raise ValueError(
            f"a chunk left a causal layer (kernel {kernel_t}, stride {stride_t}) with no complete "
            "window; encoder chunks must be multiples of the temporal stride"
        )
    cache.state[owner] = x[:, :, n_out * stride_t :].clone()
    return x[:, :, : (n_out - 1) * stride_t + kernel_t]


def join_streams(a: torch.Tensor, b: torch.Tensor, cache: TemporalCache | None, owner):
    """Equal-length leading frames of two streams that meet; the surplus of the one ahead waits."""
    if cache is None:
        return a, b
    queued_a, queued_b = cache.state.get(owner, (a[:, :, :0], b[:, :, :0]))
    a, b = torch.cat([queued_a, a], dim=2), torch.cat([queued_b, b], dim=2)
    n = min(a.shape[2], b.shape[2])
    cache.state[owner] = (a[:, :, n:].clone(), b[:, :, n:].clone())
    return a[:, :, :n], b[:, :, :n]


def run_layers(layers: Iterable[nn.Module], x: torch.Tensor, cache: TemporalCache | None) -> torch.Tensor:
    """Apply `layers` in order, each as layer(x, cache)."""
    for layer in layers:
        x = layer(x, cache)
    return x


def _to_frames(x_BCTHW: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x_BCTHW.shape
    return x_BCTHW.transpose(1, 2).reshape(b * t, c, h, w)


def _from_frames(x_NCHW: torch.Tensor, b: int) -> torch.Tensor:
    n, c, h, w = x_NCHW.shape
    return x_NCHW.reshape(b, n // b, c, h, w).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Conv3d over current and past frames only (replicate-padded by frame 0 in front)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * 3
        s = stride if isinstance(stride, tuple) else (stride,) * 3
        p = padding if isinstance(padding, tuple) else (padding,) * 3
        self.conv = nn.Conv3d(in_channels, out_channels, k, stride=s, padding=(0, p[1], p[2]), bias=bias)

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        window = causal_window(x_BCTHW, self.conv.kernel_size[0], self.conv.stride[0], cache, self)
        return self.conv(window)


class FrameConv2d(nn.Conv2d):
    """Conv2d applied to every frame of a video."""

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        return _from_frames(super().forward(_to_frames(x_BCTHW)), x_BCTHW.shape[0])


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at every (frame, pixel), eps 1e-6 (the released `LayerNorm` wrapper)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def make_norm(channels: int, norm_type: str) -> nn.Module:
    """Channel-last LayerNorm, or GroupNorm(32 groups, eps 1e-6) over (channels/group, T, H, W)."""
    if norm_type == "layernorm":
        return ChannelLayerNorm(channels)
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock2D(nn.Module):
    """Frame-wise ResNet block: norm, SiLU, conv3x3, norm, SiLU, dropout, conv3x3, (1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, norm_type: str, dropout: float = 0.0):
        super().__init__()
        self.norm1 = make_norm(in_channels, norm_type)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = make_norm(out_channels, norm_type)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        x = _to_frames(x_BCTHW)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return _from_frames(x + h, x_BCTHW.shape[0])


class ResnetBlock3D(nn.Module):
    """ResNet block with causal 3x3x3 convs and a causal 1x1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, norm_type: str, dropout: float = 0.0):
        super().__init__()
        self.norm1 = make_norm(in_channels, norm_type)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = make_norm(out_channels, norm_type)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1)

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCTHW)), cache)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))), cache)
        x = self.nin_shortcut(x_BCTHW, cache) if hasattr(self, "nin_shortcut") else x_BCTHW
        return x + h


class AttnBlock(nn.Module):
    """Per-frame single-head self-attention over the H*W pixels, 1x1x1 projections, residual."""

    def __init__(self, channels: int, norm_type: str, backend: str = "sdpa"):
        super().__init__()
        self.backend = backend
        self.norm = make_norm(channels, norm_type)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        h = self.norm(x_BCTHW)
        b, c, t, hh, ww = h.shape

        def heads(y_BCTHW):  # -> [B*T, 1 head, H*W, C]
            return y_BCTHW.permute(0, 2, 3, 4, 1).reshape(b * t, 1, hh * ww, c)

        out = attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)), None, c**-0.5, self.backend)
        out = out.reshape(b, t, hh, ww, c).permute(0, 4, 1, 2, 3)
        return x_BCTHW + self.proj_out(out)


class Downsample2D(nn.Module):
    """Frame-wise 2x spatial downsampling: zero-pad right/bottom by 1, conv3x3 stride 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2)

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        x = F.pad(_to_frames(x_BCTHW), (0, 1, 0, 1))
        return _from_frames(self.conv(x), x_BCTHW.shape[0])


class Downsample3D(nn.Module):
    """2x space-time downsampling: zero-pad right/bottom by 1, causal conv3x3x3 stride 2 (T: 1+2m -> 1+m)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, 3, stride=2)

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        return self.conv(F.pad(x_BCTHW, (0, 1, 0, 1)), cache)


class Upsample2D(nn.Module):
    """Frame-wise 2x nearest spatial upsampling followed by a conv3x3."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        x = F.interpolate(_to_frames(x_BCTHW), scale_factor=2.0, mode="nearest")
        return _from_frames(self.conv(x), x_BCTHW.shape[0])


class Upsample3D(nn.Module):
    """2x space-time upsampling (T: 1+m -> 1+2m), then a causal conv3x3x3.

    Frame 0 is upsampled in space only (trilinear); frames 1.. are interpolated to twice as many in
    time (`t_interpolation`, edges clamped) and then in space. `joint=True` interpolates time and
    space in one trilinear call (the v1.2 CausalVAE layer); otherwise time first (WF-VAE).
    In a chunked pass the last output of a chunk, which interpolates towards the next frame, is
    held back and emitted with the next chunk (or clamped on the last chunk).
    """

    def __init__(self, in_channels: int, out_channels: int, t_interpolation: str = "trilinear", joint=False):
        super().__init__()
        self.t_interpolation, self.joint = t_interpolation, joint
        self.conv = CausalConv3d(in_channels, out_channels, 3, padding=1)

    def _space(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear")

    def _time(self, x: torch.Tensor) -> torch.Tensor:
        mode = "trilinear" if self.joint else self.t_interpolation
        return F.interpolate(x, scale_factor=(2, 2, 2) if self.joint else (2, 1, 1), mode=mode)

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        dtype = x_BCTHW.dtype
        x = x_BCTHW.float()
        state = None if cache is None else cache.state.get(self)
        parts = []
        if state is None:  # first chunk: frame 0 alone
            parts.append(self._space(x[:, :, :1]))
            x, prev = x[:, :, 1:], x[:, :, :0]
        else:
            prev = state
        if x.shape[2] > 0:
            window = torch.cat([prev, x], dim=2)
            up = self._time(window)
            # Drop the outputs already emitted for `prev`; hold the last one unless this chunk is last.
            stop = up.shape[2] if cache is None or cache.last else up.shape[2] - 1
            up = up[:, :, prev.shape[2] : stop]
            parts.append(up if self.joint else self._space(up))
            prev = window[:, :, -1:]
        if cache is not None:
            cache.state[self] = prev.clone()
        return self.conv(torch.cat(parts, dim=2).to(dtype), cache)


class HaarWavelet3D(nn.Module):
    """Causal 3D Haar transform per channel: [B, C, 1+2m, H, W] -> [B, 8C, 1+m, H/2, W/2].

    The first frame is paired with a copy of itself, so an image maps to one coefficient frame.
    """

    def __init__(self, coefficient: float = HAAR_3D_COEFF):
        super().__init__()
        self.register_buffer("kernels", haar_3d_kernels(coefficient))

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        b, c = x_BCTHW.shape[:2]
        x = x_BCTHW.reshape(b * c, 1, *x_BCTHW.shape[2:])
        y = F.conv3d(causal_window(x, 2, 2, cache, self), self.kernels.to(x.dtype), stride=2)
        return y.reshape(b, c, 8, *y.shape[2:]).transpose(1, 2).reshape(b, 8 * c, *y.shape[2:])


class InverseHaarWavelet3D(nn.Module):
    """Inverse of `HaarWavelet3D` (up to 8 * coefficient^2): [B, 8C, 1+m, H, W] -> [B, C, 1+2m, 2H, 2W]."""

    def __init__(self, coefficient: float = HAAR_3D_COEFF):
        super().__init__()
        self.register_buffer("kernels", haar_3d_kernels(coefficient))

    def forward(self, coeffs_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        b, c8, t, h, w = coeffs_BCTHW.shape
        c = c8 // 8
        x = coeffs_BCTHW.reshape(b, 8, c, t, h, w).transpose(1, 2).reshape(b * c, 8, t, h, w)
        y = F.conv_transpose3d(x, self.kernels.to(x.dtype), stride=2)
        if cache is None or self not in cache.state:  # the first frame's pair is one frame
            y = y[:, :, 1:]
            if cache is not None:
                cache.state[self] = True
        return y.reshape(b, c, *y.shape[2:])


class HaarWavelet2D(nn.Module):
    """Frame-wise 2D Haar transform: [B, C, T, H, W] -> [B, 4C, T, H/2, W/2]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernels", haar_2d_kernels())

    def forward(self, x_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x_BCTHW.shape
        x = x_BCTHW.permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
        y = F.conv2d(x, self.kernels.to(x.dtype), stride=2)  # [(b t c), 4, h/2, w/2]
        y = y.reshape(b, t, c, 4, h // 2, w // 2).permute(0, 3, 2, 1, 4, 5)
        return y.reshape(b, 4 * c, t, h // 2, w // 2)


class InverseHaarWavelet2D(nn.Module):
    """Inverse of `HaarWavelet2D`: [B, 4C, T, H, W] -> [B, C, T, 2H, 2W]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernels", haar_2d_kernels())

    def forward(self, coeffs_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        b, c4, t, h, w = coeffs_BCTHW.shape
        c = c4 // 4
        x = coeffs_BCTHW.reshape(b, 4, c, t, h, w).permute(0, 3, 2, 1, 4, 5).reshape(b * t * c, 4, h, w)
        y = F.conv_transpose2d(x, self.kernels.to(x.dtype), stride=2)
        return y.reshape(b, t, c, 2 * h, 2 * w).transpose(1, 2)


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments [B, 2Z, T, H, W]; logvar clamped to [-30, 20]."""

    def __init__(self, moments_BCTHW: torch.Tensor):
        self.moments = moments_BCTHW
        self.mean, logvar = torch.chunk(moments_BCTHW, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, noise from `generator` (the global RNG when None)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The mean."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) per sample, [B], summed over channels, frames and pixels.

        (The original sums over dims 1-3 only and leaves W; summing that over W gives this.)
        """
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3, 4])


# --------------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Video [B, 3, T, H, W] -> posterior moments [B, 2Z, 1 + (T-1)/s_t, H/8, W/8]."""

    def __init__(self, cfg: WFVAEConfig, backend: str = "sdpa"):
        super().__init__()
        c0, e, n, norm = (
            cfg.base_channels,
            cfg.encoder_energy_flow_hidden_size,
            cfg.encoder_num_resblocks,
            cfg.norm_type,
        )
        three_d = cfg.temporal_compression == 8
        self.down1 = nn.ModuleList(
            [
                FrameConv2d(24, c0, 3, padding=1),
                *[ResnetBlock2D(c0, c0, norm, cfg.dropout) for _ in range(n)],
                Downsample3D(c0, c0) if three_d else Downsample2D(c0, c0),
            ]
        )
        self.down2 = nn.ModuleList(
            [
                FrameConv2d(c0 + e, 2 * c0, 3, padding=1),
                *[ResnetBlock3D(2 * c0, 2 * c0, norm, cfg.dropout) for _ in range(n)],
                Downsample3D(2 * c0, 2 * c0),
            ]
        )
        self.connect_l1 = FrameConv2d(24 if three_d else 12, e, 3, padding=1)
        self.connect_l2 = FrameConv2d(24, e, 3, padding=1)
        mid = [ResnetBlock3D(2 * c0 + e, 4 * c0, norm, cfg.dropout)]
        if cfg.use_attention:
            mid.append(AttnBlock(4 * c0, norm, backend))
        mid.append(ResnetBlock3D(4 * c0, 4 * c0, norm, cfg.dropout))
        self.mid = nn.ModuleList(mid)
        self.norm_out = make_norm(4 * c0, norm)
        self.conv_out = CausalConv3d(4 * c0, 2 * cfg.latent_dim, 3, padding=1)
        self.wavelet_transform_in = HaarWavelet3D()
        self.wavelet_transform_l1 = HaarWavelet3D() if three_d else HaarWavelet2D()
        self.wavelet_transform_l2 = HaarWavelet3D()

    def forward(self, video_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        # 1. Haar 3D of the RGB video: 24 channels at half the frames (frame 0 alone) and half the size.
        coeffs = self.wavelet_transform_in(video_BCTHW, cache)

        # 2. Energy-flow inputs: level 1 = wavelet of the low band, level 2 = 3D wavelet of its low band.
        l1_coeffs = self.wavelet_transform_l1(coeffs[:, :3], cache)
        l1 = self.connect_l1(l1_coeffs)
        l2 = self.connect_l2(self.wavelet_transform_l2(l1_coeffs[:, :3], cache))

        # 3. Main path: down1 on all 24 bands, join level 1, down2, join level 2.
        h = run_layers(self.down1, coeffs, cache)
        h, l1 = join_streams(h, l1, cache, (self, "l1"))
        h = run_layers(self.down2, torch.cat([h, l1], dim=1), cache)
        h, l2 = join_streams(h, l2, cache, (self, "l2"))
        h = run_layers(self.mid, torch.cat([h, l2], dim=1), cache)

        # 4. Moments: norm, SiLU, causal conv to 2Z channels.
        return self.conv_out(F.silu(self.norm_out(h)), cache)


class Decoder(nn.Module):
    """Latents [B, Z, 1+m, H, W] -> video [B, 3, 1 + m*s_t, 8H, 8W]."""

    def __init__(self, cfg: WFVAEConfig, backend: str = "sdpa"):
        super().__init__()
        c0, e, n, norm, t_interp = (
            cfg.base_channels,
            cfg.decoder_energy_flow_hidden_size,
            cfg.decoder_num_resblocks,
            cfg.norm_type,
            cfg.t_interpolation,
        )
        three_d = cfg.temporal_compression == 8
        self.energy_flow = e
        self.conv_in = CausalConv3d(cfg.latent_dim, 4 * c0, 3, padding=1)
        mid = [ResnetBlock3D(4 * c0, 4 * c0, norm, cfg.dropout)]
        if cfg.use_attention:
            mid.append(AttnBlock(4 * c0, norm, backend))
        mid.append(ResnetBlock3D(4 * c0, 4 * c0 + e, norm, cfg.dropout))
        self.mid = nn.ModuleList(mid)
        self.up2 = nn.ModuleList(
            [
                *[ResnetBlock3D(4 * c0, 4 * c0, norm, cfg.dropout) for _ in range(n)],
                Upsample3D(4 * c0, 4 * c0, t_interp),
                ResnetBlock3D(4 * c0, 4 * c0 + e, norm, cfg.dropout),
            ]
        )
        self.up1 = nn.ModuleList(
            [
                *[ResnetBlock3D(4 * c0 if i == 0 else 2 * c0, 2 * c0, norm, cfg.dropout) for i in range(n)],
                Upsample3D(2 * c0, 2 * c0, t_interp) if three_d else Upsample2D(2 * c0, 2 * c0),
                ResnetBlock3D(2 * c0, 2 * c0, norm, cfg.dropout),
            ]
        )
        self.layer = nn.ModuleList(
            [ResnetBlock3D(2 * c0, c0, norm, cfg.dropout), ResnetBlock3D(c0, c0, norm, cfg.dropout)]
        )
        r = cfg.connect_res_layer_num
        self.connect_l1 = nn.ModuleList(
            [
                *[ResnetBlock3D(e, e, norm, cfg.dropout) for _ in range(r)],
                FrameConv2d(e, 24 if three_d else 12, 3, padding=1),
            ]
        )
        self.connect_l2 = nn.ModuleList(
            [*[ResnetBlock3D(e, e, norm, cfg.dropout) for _ in range(r)], FrameConv2d(e, 24, 3, padding=1)]
        )
        self.norm_out = make_norm(c0, norm)
        self.conv_out = FrameConv2d(c0, 24, 3, padding=1)
        self.inverse_wavelet_transform_out = InverseHaarWavelet3D()
        self.inverse_wavelet_transform_l1 = InverseHaarWavelet3D() if three_d else InverseHaarWavelet2D()
        self.inverse_wavelet_transform_l2 = InverseHaarWavelet3D()

    def forward(self, z_BCTHW: torch.Tensor, cache: TemporalCache | None = None) -> torch.Tensor:
        e = self.energy_flow
        # 1. Latents -> 4*C0 (+E) channels at latent resolution.
        h = run_layers(self.mid, self.conv_in(z_BCTHW, cache), cache)

        # 2. Level-2 energy flow: the last E channels predict 24 Haar bands -> 3 channels at 2x frames.
        l2 = self.inverse_wavelet_transform_l2(run_layers(self.connect_l2, h[:, -e:], cache), cache)

        # 3. up2 (2x space-time); its last E channels predict the level-1 bands, low band += level 2.
        h = run_layers(self.up2, h[:, :-e], cache)
        l1_coeffs = run_layers(self.connect_l1, h[:, -e:], cache)
        l1_coeffs, l2 = join_streams(l1_coeffs, l2, cache, (self, "l2"))
        l1_coeffs = torch.cat([l1_coeffs[:, :3] + l2, l1_coeffs[:, 3:]], dim=1)
        l1 = self.inverse_wavelet_transform_l1(l1_coeffs, cache)

        # 4. up1 (2x space, and time for 8x8x8), two more blocks, 24 output bands.
        h = run_layers(self.up1, h[:, :-e], cache)
        h = run_layers(self.layer, h, cache)
        h = self.conv_out(F.silu(self.norm_out(h)))

        # 5. Low band += level 1, inverse Haar 3D to RGB.
        h, l1 = join_streams(h, l1, cache, (self, "l1"))
        h = torch.cat([h[:, :3] + l1, h[:, 3:]], dim=1)
        return self.inverse_wavelet_transform_out(h, cache)


# --------------------------------------------------------------------------------------------------
# Chunk schedules and spatial tiles
# --------------------------------------------------------------------------------------------------


def chunk_bounds(num_frames: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges: frame 0 alone, then runs of `chunk` frames (the last may be shorter)."""
    bounds, start = [(0, 1)], 1
    while start < num_frames:
        end = min(num_frames, start + chunk)
        bounds.append((start, end))
        start = end
    return bounds


def auto_chunk_sizes(num_frames: int, temporal_stride: int) -> tuple[int, int]:
    """(pixel frames per encoder chunk, latent frames per decoder chunk), chosen as v1.5 does.

    Start from (temporal stride, 2) and double the decoder chunk while the last latent chunk would
    hold a single frame, and the encoder chunk where an intermediate frame count would leave a
    single-frame remainder. Any size is exact here; the rule only reproduces the released sizes.
    """
    levels = int(math.log2(temporal_stride))
    enc, dec = temporal_stride, 2
    while dec < num_frames and enc < num_frames:
        counts = [num_frames]
        for _ in range(levels):
            counts.append((counts[-1] - 1) // 2 + 1)
        if (counts[-1] - 1) % dec == 1:
            dec *= 2
            continue
        for n in counts[:-1]:
            if (n - 1) % 2 != 0 or ((n - 1) % enc == 1 and (n - 1) / enc > 1):
                enc *= 2
        break
    return enc, dec


def _tile_starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(length: int, fade: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    w = torch.ones(length)
    if fade > 0:
        r = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
        if fade_in:
            w[:fade] = torch.minimum(w[:fade], r)
        if fade_out:
            w[-fade:] = torch.minimum(w[-fade:], r.flip(0))
    return w


def decode_spatial_tiles(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    z_BCTHW: torch.Tensor,
    tile: int,
    overlap: float,
    upscale: int,
) -> torch.Tensor:
    """Decode overlapping `tile` x `tile` latent tiles and blend them (APPROXIMATE).

    Each tile is decoded on its own, so pixels near tile borders differ from a full decode; the
    outputs are averaged with weights that ramp linearly across the overlap (`overlap` is a
    fraction of the tile). Use it only when a full-frame decode does not fit in memory.
    """
    b, _, t, h, w = z_BCTHW.shape
    fade = int(round(tile * overlap))
    step = max(1, tile - fade)
    rows, cols = _tile_starts(h, tile, step), _tile_starts(w, tile, step)
    if len(rows) == 1 and len(cols) == 1:
        return decode_fn(z_BCTHW)
    out = weight = None
    for i in rows:
        for j in cols:
            part = decode_fn(z_BCTHW[:, :, :, i : i + tile, j : j + tile])
            ph, pw = part.shape[-2:]
            wh = _ramp(ph, fade * upscale, i > 0, i + tile < h)
            ww = _ramp(pw, fade * upscale, j > 0, j + tile < w)
            wt = (wh[:, None] * ww[None, :]).to(part)
            if out is None:
                out = part.new_zeros(*part.shape[:3], h * upscale, w * upscale)
                weight = part.new_zeros(h * upscale, w * upscale)
            ys, xs = slice(i * upscale, i * upscale + ph), slice(j * upscale, j * upscale + pw)
            out[..., ys, xs] += part * wt
            weight[ys, xs] += wt
    return out / weight


def frame_count_error(name: str, num_frames: int, stride: int) -> ValueError:
    """The ValueError for a pixel frame count that is not 1 + k * stride, naming valid counts."""
    lower = 1 + max(0, (num_frames - 1) // stride) * stride
    examples = ", ".join(str(1 + k * stride) for k in range(5))
    return ValueError(
        f"{name} takes 1 + k * {stride} frames ({examples}, ...); got {num_frames}. "
        f"Nearest valid counts: {lower} and {lower + stride}"
    )


# --------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------


class WFVAE(nn.Module):
    """WF-VAE with causal-cache temporal chunking and per-channel latent normalisation."""

    def __init__(self, cfg: WFVAEConfig, attention_backend: str = "sdpa"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg, attention_backend)
        self.decoder = Decoder(cfg, attention_backend)
        self.register_buffer("shift", torch.tensor(cfg.shift).reshape(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(cfg.scale).reshape(1, -1, 1, 1, 1), persistent=False)

    @property
    def temporal_stride(self) -> int:
        """Pixel frames per latent frame after the first (4 or 8)."""
        return self.cfg.temporal_stride

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel (8)."""
        return self.cfg.spatial_stride

    @property
    def latent_channels(self) -> int:
        """Latent channels Z."""
        return self.cfg.latent_dim

    def valid_num_frames(self, num_frames: int) -> bool:
        """Whether a video of `num_frames` frames can be encoded (1 + k * temporal_stride)."""
        return num_frames >= 1 and (num_frames - 1) % self.temporal_stride == 0

    def latent_num_frames(self, num_frames: int) -> int:
        """Latent frames of a valid `num_frames`-frame video."""
        self._check_frames(num_frames)
        return 1 + (num_frames - 1) // self.temporal_stride

    def _check_frames(self, num_frames: int) -> None:
        if not self.valid_num_frames(num_frames):
            raise frame_count_error(f"WF-VAE {self.temporal_stride}x8x8", num_frames, self.temporal_stride)

    def _check_video(self, video_BCTHW: torch.Tensor) -> None:
        if video_BCTHW.dim() != 5 or video_BCTHW.shape[1] != 3:
            raise ValueError(f"expected an RGB video [B, 3, T, H, W], got shape {tuple(video_BCTHW.shape)}")
        self._check_frames(video_BCTHW.shape[2])
        h, w = video_BCTHW.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f"video height and width must be multiples of 8, got {h}x{w}")

    def encode(
        self, video_BCTHW: torch.Tensor, chunked: bool | None = None, chunk_frames: int | None = None
    ) -> DiagonalGaussian:
        """Posterior of a video in [-1, 1], [B, 3, T, H, W] -> moments [B, 2Z, T_lat, H/8, W/8].

        `chunked` (default `cfg.chunked`) streams the frames through causal caches in chunks of
        `chunk_frames` pixel frames after the first (default `cfg.encode_chunk_frames`, else
        chosen from T as v1.5 does); the result equals the unchunked pass.
        """
        self._check_video(video_BCTHW)
        t = video_BCTHW.shape[2]
        if not (self.cfg.chunked if chunked is None else chunked):
            return DiagonalGaussian(self.encoder(video_BCTHW))
        size = chunk_frames or self.cfg.encode_chunk_frames or auto_chunk_sizes(t, self.temporal_stride)[0]
        if size % self.temporal_stride:
            raise ValueError(
                f"encoder chunk of {size} frames: use a multiple of the temporal stride {self.temporal_stride}"
            )
        cache, parts = TemporalCache(), []
        bounds = chunk_bounds(t, size)
        for i, (start, end) in enumerate(bounds):
            cache.last = i == len(bounds) - 1
            parts.append(self.encoder(video_BCTHW[:, :, start:end], cache))
        return DiagonalGaussian(torch.cat(parts, dim=2))

    def decode(
        self,
        z_BCTHW: torch.Tensor,
        chunked: bool | None = None,
        chunk_latents: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
    ) -> torch.Tensor:
        """Video [B, 3, 1 + (T_lat-1)*s_t, 8H, 8W] from raw (unnormalised) latents [B, Z, T_lat, H, W].

        `chunked` / `chunk_latents` as in `encode` (latent frames per chunk; exact). `tile_size`
        (latent pixels) additionally decodes overlapping spatial tiles and blends them, which is
        APPROXIMATE near tile borders; leave it None unless a full frame does not fit in memory.
        """
        if z_BCTHW.dim() != 5 or z_BCTHW.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents [B, {self.latent_channels}, T, H, W], got shape {tuple(z_BCTHW.shape)}"
            )
        use_chunks = self.cfg.chunked if chunked is None else chunked

        def decode_time(z: torch.Tensor) -> torch.Tensor:
            if not use_chunks:
                return self.decoder(z)
            t = z.shape[2]
            size = (
                chunk_latents
                or self.cfg.decode_chunk_latents
                or auto_chunk_sizes(1 + (t - 1) * self.temporal_stride, self.temporal_stride)[1]
            )
            cache, parts = TemporalCache(), []
            bounds = chunk_bounds(t, size)
            for i, (start, end) in enumerate(bounds):
                cache.last = i == len(bounds) - 1
                parts.append(self.decoder(z[:, :, start:end], cache))
            return torch.cat(parts, dim=2)

        if tile_size is None:
            return decode_time(z_BCTHW)
        return decode_spatial_tiles(decode_time, z_BCTHW, tile_size, tile_overlap, self.spatial_stride)

    def encode_latents(
        self, video_BCTHW: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised latents (z - shift) * scale, z sampled from the posterior (or its mean)."""
        posterior = self.encode(video_BCTHW)
        z = posterior.sample(generator) if sample else posterior.mean
        return (z - self.shift.to(z)) * self.scale.to(z)

    def decode_latents(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        """Video from normalised latents: decode(latents / scale + shift)."""
        z = latents_BCTHW / self.scale.to(latents_BCTHW) + self.shift.to(latents_BCTHW)
        return self.decode(z)

    def forward(
        self, video_BCTHW: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (the training forward)."""
        posterior = self.encode(video_BCTHW)
        z = posterior.sample(generator) if sample else posterior.mean
        return self.decode(z), posterior
