"""3D rotary position embedding over a (t, h, w) token grid.

The head dimension is split into three contiguous parts, t: 4/16, h: 6/16, w: 6/16 of head_dim.
For an axis with sub-dimension D_a, inv_freq_i = base^(-2i / D_a), angle = position / scale *
inv_freq, and the cos / sin tables are the angles repeated twice (cat(f, f)); the rotation uses
`rotate_half` on the two contiguous halves of each part. Computed in fp32.
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of head_dim given to the t, h and w axes."""
    if head_dim % 16 != 0:
        raise ValueError(f"3D RoPE needs head_dim divisible by 16, got {head_dim}")
    unit = head_dim // 16
    return 4 * unit, 6 * unit, 6 * unit


def _axis_table(
    positions: torch.Tensor, dim: int, base: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
    angles = (positions.to(torch.float64) / scale)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rope_3d_tables(
    grid_thw: tuple[int, int, int],
    head_dim: int,
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
    base: float = 10000.0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [N, head_dim] for the time-major flattened grid (N = t * h * w)."""
    t, h, w = grid_thw
    dims = rope_axis_dims(head_dim)
    idx = torch.arange(t * h * w, device=device)
    coords = (idx // (h * w), (idx // w) % h, idx % w)
    tables = [_axis_table(pos, d, base, s) for pos, d, s in zip(coords, dims, scales)]
    cos = torch.cat([c for c, _ in tables], dim=-1)
    sin = torch.cat([s for _, s in tables], dim=-1)
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_3d(x_SBhd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """Rotate [S, B, h, d] by per-token tables [S, d], axis by axis, in fp32."""
    dims = rope_axis_dims(x_SBhd.shape[-1])
    xf = x_SBhd.float()
    cos = cos_Sd[:, None, None, :]
    sin = sin_Sd[:, None, None, :]
    parts, start = [], 0
    for d in dims:
        sl = slice(start, start + d)
        parts.append(xf[..., sl] * cos[..., sl] + _rotate_half(xf[..., sl]) * sin[..., sl])
        start += d
    return torch.cat(parts, dim=-1).type_as(x_SBhd)
