"""3D rotary position embedding over a (t, h, w) token grid.

The head dimension is split into three contiguous parts, by default t: 4/16, h: 6/16, w: 6/16 of
head_dim (SUV, v1.5); `axis_dims` gives another split (the v1.2 / v1.3 DiT uses equal thirds).
For an axis with sub-dimension D_a, inv_freq_i = base^(-2i / D_a), angle = position / scale *
inv_freq, and the cos / sin tables are the angles repeated twice (cat(f, f)); the rotation uses
`rotate_half` on the two contiguous halves of each part. Angles are computed in fp64 and the
tables returned in fp32; with `angle_dtype` the angles are computed in fp32 as Open-Sora-Plan
v1.2 / v1.3 do and cast to `angle_dtype` before cos / sin (their bf16 / fp16 inference quirk).
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
    positions: torch.Tensor, dim: int, base: float, scale: float, angle_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if angle_dtype is not None:
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
        angles = ((positions.float() / scale)[:, None] * inv_freq[None, :]).to(angle_dtype)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float(), angles.sin().float()
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
    axis_dims: tuple[int, int, int] | None = None,
    angle_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [N, head_dim] for the time-major flattened grid (N = t * h * w).

    `axis_dims` (channels per t, h, w axis; default `rope_axis_dims`) and `angle_dtype` (see the
    module docstring) select the v1.2 / v1.3 variant.
    """
    t, h, w = grid_thw
    dims = rope_axis_dims(head_dim) if axis_dims is None else axis_dims
    idx = torch.arange(t * h * w, device=device)
    coords = (idx // (h * w), (idx // w) % h, idx % w)
    tables = [_axis_table(pos, d, base, s, angle_dtype) for pos, d, s in zip(coords, dims, scales)]
    cos = torch.cat([c for c, _ in tables], dim=-1)
    sin = torch.cat([s for _, s in tables], dim=-1)
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_3d(
    x_SBhd: torch.Tensor,
    cos_Sd: torch.Tensor,
    sin_Sd: torch.Tensor,
    axis_dims: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Rotate [S, B, h, d] by per-token tables [S, d], axis by axis, in fp32."""
    dims = rope_axis_dims(x_SBhd.shape[-1]) if axis_dims is None else axis_dims
    xf = x_SBhd.float()
    cos = cos_Sd[:, None, None, :]
    sin = sin_Sd[:, None, None, :]
    parts, start = [], 0
    for d in dims:
        sl = slice(start, start + d)
        parts.append(xf[..., sl] * cos[..., sl] + _rotate_half(xf[..., sl]) * sin[..., sl])
        start += d
    return torch.cat(parts, dim=-1).type_as(x_SBhd)
