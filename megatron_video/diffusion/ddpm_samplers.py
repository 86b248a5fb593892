"""Samplers for discrete-time DDPM models (Open-Sora-Plan v1.2 epsilon, v1.3 v-prediction).

Open-Sora-Plan v1.3 sampled with HuggingFace diffusers schedulers built from their default config
plus `prediction_type`, `rescale_betas_zero_snr` and `timestep_spacing` ("trailing" with zero
terminal SNR, else "leading"; `steps_offset` 0). These samplers reproduce those schedulers step for
step, in the same fp32 arithmetic, so a checkpoint samples as it did there:

* timesteps, T training steps, N inference steps: leading t_i = (N - 1 - i) (T // N) + offset;
  trailing t_i = round(T - i T / N) - 1 (numpy arange, as diffusers computes it).
* Euler family (EulerDiscrete, EulerAncestralDiscrete): sigma_t = sqrt((1 - a_t) / a_t) with
  alpha_bar a; zero terminal SNR sets a_{T-1} = 2^-24 here (sigma ~ 4096). The state is
  x = x0 + sigma eps, starts at noise * sigma_0 (trailing) or * sqrt(sigma_0^2 + 1) (leading), and
  the model sees x / sqrt(sigma^2 + 1). x0 = x - sigma eps (epsilon) or
  x0 = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1) (v); Euler step x <- x + (x - x0) / sigma
  (sigma' - sigma). Ancestral: sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2), sigma_down =
  sqrt(s'^2 - sigma_up^2), x <- x + (x - x0) / s (sigma_down - s) + sigma_up z.
* DDIM (eta 0, set_alpha_to_one, clip_sample off): previous timestep t - T // N (alpha_bar 1 below
  zero), x <- sqrt(a') x0 + sqrt(1 - a') eps.
* DDPM (fixed_small variance, clip_sample off): previous timestep is the next in the list,
  x <- sqrt(a') b / (1 - a) x0 + sqrt(a / a') (1 - a') / (1 - a) x + sqrt(var) z for t > 0, with
  b = 1 - a / a', var = max((1 - a') / (1 - a) b, 1e-20).

The ancestral noise z of every step (the last included, as diffusers draws it) comes from the
caller's CPU generator in fp32, so a seed gives the same video on any device. The sampling state is
kept in fp32; the model is called in the dtype of the initial noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from megatron_video.diffusion.ddpm import DDPMObjective

DDPM_SAMPLERS = ("euler_ancestral", "euler", "ddim", "ddpm")
"""EulerAncestralDiscrete (the v1.3 recommendation), EulerDiscrete, DDIM, DDPM."""

STOCHASTIC_SAMPLERS = ("euler_ancestral", "ddpm")

Spacing = Literal["leading", "trailing"]


def ddpm_timesteps(num_train_steps: int, steps: int, spacing: Spacing, steps_offset: int = 0) -> torch.Tensor:
    """Descending integer timesteps [steps] in [0, num_train_steps) of diffusers' `set_timesteps`.

    For the few step counts where diffusers' float arange yields one spurious extra timestep (-1,
    e.g. 61 of 1000 trailing), the first `steps` are kept.
    """
    if not 0 < steps <= num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {steps}")
    if spacing == "leading":
        t = np.arange(steps)[::-1] * (num_train_steps // steps) + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(num_train_steps, 0, -num_train_steps / steps)).astype(np.int64)[:steps] - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose 'leading' or 'trailing'")
    if t.max() >= num_train_steps:
        raise ValueError(f"steps_offset {steps_offset} puts timestep {t.max()} past {num_train_steps - 1}")
    return torch.from_numpy(t.astype(np.int64).copy())


def euler_sigmas(alphas_bar: torch.Tensor, timesteps: torch.Tensor, zero_terminal_snr: bool) -> torch.Tensor:
    """fp32 sigmas [len(timesteps) + 1] of the Euler schedulers, sqrt((1 - a) / a) then a final 0.

    With zero terminal SNR the last alpha_bar is replaced by 2^-24 (sigma ~ 4096), as in diffusers.
    """
    a = alphas_bar.float().clone()
    if zero_terminal_snr:
        a[-1] = 2**-24
    sigmas = ((1 - a) / a) ** 0.5
    return torch.cat([sigmas[timesteps], torch.zeros(1)])


@torch.no_grad()
def ddpm_sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise_BCTHW: torch.Tensor,
    objective: DDPMObjective,
    steps: int,
    sampler: str = "euler_ancestral",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    spacing: Spacing | None = None,
    steps_offset: int = 0,
) -> torch.Tensor:
    """Clean latents [B, C, T, H, W] from standard-normal `noise_BCTHW` in `steps` model calls.

    `model_fn(x, timestep_B)` returns the model's epsilon or v prediction (`objective.prediction`,
    classifier-free guidance already applied); timesteps are float training steps in [0, T).
    `spacing` defaults to trailing with zero terminal SNR and leading otherwise, as in v1.3.
    `generator` (CPU) draws the noise of the stochastic samplers (euler_ancestral, ddpm); a list
    gives one generator per sample.
    """
    if sampler not in DDPM_SAMPLERS:
        raise ValueError(f"unknown DDPM sampler {sampler!r}; choose one of {', '.join(DDPM_SAMPLERS)}")
    if sampler in STOCHASTIC_SAMPLERS and generator is None:
        raise ValueError(f"sampler {sampler!r} draws noise at every step; pass a torch.Generator")
    spacing = spacing or ("trailing" if objective.zero_terminal_snr else "leading")
    timesteps = ddpm_timesteps(objective.num_steps, steps, spacing, steps_offset)
    if (
        sampler in ("ddim", "ddpm")
        and objective.prediction == "epsilon"
        and objective.alphas_bar[timesteps[0]] == 0
    ):
        raise ValueError(
            f"{sampler} cannot recover x0 from epsilon at a zero-SNR timestep ({int(timesteps[0])}); "
            "use v_prediction, an Euler sampler or leading spacing"
        )
    if sampler == "ddim":
        return _ddim(model_fn, noise_BCTHW, objective, timesteps, progress)
    if sampler == "ddpm":
        return _ddpm(model_fn, noise_BCTHW, objective, timesteps, generator, progress)
    ancestral = sampler == "euler_ancestral"
    return _euler(model_fn, noise_BCTHW, objective, timesteps, spacing, ancestral, generator, progress)


def _call(model_fn, x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The model's prediction at integer timestep `t` for the whole batch, in fp32."""
    t_B = torch.full((x.shape[0],), float(t), device=x.device)
    return model_fn(x.to(dtype), t_B).float()


def _randn(shape: torch.Size, generator, device: torch.device) -> torch.Tensor:
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    # One generator per sample: each sample's noise is independent of the others in its batch.
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator]).to(
        device
    )


def _x0_from(prediction: str, pred: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x0 from an epsilon or v prediction at x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    if prediction == "epsilon":
        return (x - (1 - a) ** 0.5 * pred) / a**0.5
    return a**0.5 * x - (1 - a) ** 0.5 * pred


def _euler(model_fn, noise, objective, timesteps, spacing, ancestral, generator, progress):
    sigmas = euler_sigmas(objective.alphas_bar, timesteps, objective.zero_terminal_snr)
    init_sigma = sigmas[0] if spacing == "trailing" else (sigmas[0] ** 2 + 1) ** 0.5
    x = noise.float() * init_sigma
    for i, t in enumerate(timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        pred = _call(model_fn, x / ((s**2 + 1) ** 0.5), t, noise.dtype)
        if objective.prediction == "epsilon":
            x0 = x - s * pred
        else:
            x0 = pred * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)
        derivative = (x - x0) / s
        if ancestral:
            s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
            s_down = (s_next**2 - s_up**2) ** 0.5
            x = x + derivative * (s_down - s) + _randn(x.shape, generator, x.device) * s_up
        else:
            x = x + derivative * (s_next - s)
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x.to(noise.dtype)


def _ddim(model_fn, noise, objective, timesteps, progress):
    alphas_bar = objective.alphas_bar.float()
    stride = objective.num_steps // len(timesteps)
    x = noise.float()
    for i, t in enumerate(timesteps):
        a = alphas_bar[t]
        a_prev = alphas_bar[t - stride] if t - stride >= 0 else torch.tensor(1.0)
        pred = _call(model_fn, x, t, noise.dtype)
        x0 = _x0_from(objective.prediction, pred, x, a)
        eps = pred if objective.prediction == "epsilon" else a**0.5 * pred + (1 - a) ** 0.5 * x
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x.to(noise.dtype)


def _ddpm(model_fn, noise, objective, timesteps, generator, progress):
    alphas_bar = objective.alphas_bar.float()
    x = noise.float()
    for i, t in enumerate(timesteps):
        a = alphas_bar[t]
        a_prev = alphas_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        beta = 1 - a / a_prev
        pred = _call(model_fn, x, t, noise.dtype)
        x0 = _x0_from(objective.prediction, pred, x, a)
        x = (a_prev**0.5 * beta) / (1 - a) * x0 + (a / a_prev) ** 0.5 * (1 - a_prev) / (1 - a) * x
        if t > 0:
            variance = torch.clamp((1 - a_prev) / (1 - a) * beta, min=1e-20)
            x = x + variance**0.5 * _randn(x.shape, generator, x.device)
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x.to(noise.dtype)
