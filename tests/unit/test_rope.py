"""3D RoPE against its formula, written out per token and channel."""

from __future__ import annotations

import math

import torch

from megatron_video.models.common.rope import apply_rope_3d, rope_3d_tables, rope_axis_dims


def test_axis_split():
    assert rope_axis_dims(128) == (32, 48, 48)
    assert rope_axis_dims(64) == (16, 24, 24)


def test_rope_matches_formula():
    t, h, w, hd = 3, 4, 5, 32
    scales = (1.0, 2.0, 0.5)
    cos, sin = rope_3d_tables((t, h, w), hd, scales)
    torch.manual_seed(0)
    x = torch.randn(t * h * w, 1, 2, hd, dtype=torch.float64)
    out = apply_rope_3d(x, cos, sin)
    dims = rope_axis_dims(hd)
    for n in range(t * h * w):
        pos = (n // (h * w), (n // w) % h, n % w)
        start = 0
        for axis, da in enumerate(dims):
            half = da // 2
            for i in range(half):
                theta = pos[axis] / scales[axis] * 10000 ** (-2 * i / da)
                a, b = x[n, 0, :, start + i], x[n, 0, :, start + half + i]
                exp_a = a * math.cos(theta) - b * math.sin(theta)
                exp_b = b * math.cos(theta) + a * math.sin(theta)
                torch.testing.assert_close(out[n, 0, :, start + i], exp_a, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(out[n, 0, :, start + half + i], exp_b, rtol=1e-6, atol=1e-6)
            start += da


def test_rope_preserves_norm_per_axis():
    cos, sin = rope_3d_tables((2, 3, 3), 64)
    x = torch.randn(18, 2, 4, 64)
    out = apply_rope_3d(x, cos, sin)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[1:], x[1:])
    torch.testing.assert_close(out[0], x[0])  # position (0, 0, 0) is not rotated
