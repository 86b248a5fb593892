"""Samplers: Euler for rectified flow (v1.5) and classifier-free guidance with rescale.

Flow schedule: sigmas = linspace(1, 0, N + 1) with a static shift (7.0 for v1.5), or the
linear-quadratic schedule; update x <- x + (sigma_{i+1} - sigma_i) * v.
CFG: v = v_u + s (v_c - v_u); guidance rescale r: v <- r * v * std(v_c) / std(v) + (1 - r) * v,
std over all non-batch dimensions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_video.diffusion.flow import shift_sigmas


def flow_sigmas(steps: int, shift: float = 7.0, linear_quadratic: bool = False) -> torch.Tensor:
    """Descending sigmas [steps + 1] from 1 to 0."""
    if linear_quadratic:
        return linear_quadratic_sigmas(steps)
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def linear_quadratic_sigmas(steps: int) -> torch.Tensor:
    """Mochi-style schedule (even `steps`): value i / M for the first steps / 2, then the quadratic
    through (steps / 2, steps / (2M)) and (steps, 1), M = min(max(10 steps, 250), 1000); sigma = 1 - value."""
    if steps % 2:
        raise ValueError(f"the linear-quadratic schedule needs an even number of steps, got {steps}")
    n = steps // 2
    total = min(max(10 * steps, 250), 1000)
    m = total / 2
    linear = [i / total for i in range(n)]
    a = (m - n) / (m * n * n)
    b = (5 * n - 4 * m) / (2 * m * n)
    c = (m - n) / m
    quad = [a * i * i + b * i + c for i in range(n, 2 * n)]
    values = torch.tensor(linear + quad + [1.0], dtype=torch.float64)
    return (1.0 - values).float()


def guided_velocity(
    v_cond: torch.Tensor, v_uncond: torch.Tensor | None, scale: float, rescale: float = 0.0
) -> torch.Tensor:
    """Classifier-free guidance with optional guidance rescale."""
    if v_uncond is None or scale == 1.0:
        return v_cond
    v = v_uncond + scale * (v_cond - v_uncond)
    if rescale > 0:
        dims = list(range(1, v.dim()))
        ratio = v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True)
        v = rescale * (v * ratio) + (1 - rescale) * v
    return v


@torch.no_grad()
def euler_flow_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise_BCTHW: torch.Tensor,
    sigmas: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigma = 1 (noise) to 0; `velocity(x, timestep_B)` returns v."""
    x = noise_BCTHW.float()
    b = x.shape[0]
    for i in range(len(sigmas) - 1):
        t = torch.full((b,), float(sigmas[i]) * 1000.0, device=x.device)
        v = velocity(x.to(noise_BCTHW.dtype), t).float()
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
        if progress is not None:
            progress(i + 1, len(sigmas) - 1)
    return x.to(noise_BCTHW.dtype)
