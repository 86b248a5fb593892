"""Per-frame PSNR and SSIM of frames in [0, 1], without heavy imports.

SSIM follows Wang et al. (2004) with torchmetrics' defaults, so its figures compare with published ones
computed that way: an 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, local statistics per
channel at every pixel of the frame reflect-padded by 5 pixels (variances clamped at 0), averaged over
channels and pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(pred_NCHW: torch.Tensor, target_NCHW: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each of the N frames, [N]."""
    mse = (pred_NCHW.double() - target_NCHW.double()).pow(2).mean(dim=(1, 2, 3))
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def _gaussian_window(size: int, sigma: float, channels: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    pred_NCHW: torch.Tensor,
    target_NCHW: torch.Tensor,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """SSIM of each of the N frames, [N]; frames must be at least `window` pixels on each side."""
    if min(pred_NCHW.shape[-2:]) < window:
        raise ValueError(
            f"SSIM needs frames of at least {window}x{window} pixels, got {tuple(pred_NCHW.shape[-2:])}"
        )
    pad = (window - 1) // 2
    x = F.pad(pred_NCHW.double(), (pad,) * 4, mode="reflect")
    y = F.pad(target_NCHW.double(), (pad,) * 4, mode="reflect")
    c = x.shape[1]
    w = _gaussian_window(window, sigma, c, x.dtype)
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), w, groups=c)
    mx, my, xx, yy, xy = stats.chunk(5)
    vx, vy, cov = (xx - mx * mx).clamp(min=0), (yy - my * my).clamp(min=0), xy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()
