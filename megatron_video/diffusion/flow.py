"""Rectified flow (Open-Sora-Plan v1.5): x_sigma = sigma * noise + (1 - sigma) * x0, target noise - x0.

Timesteps fed to the model are sigma * 1000 (float). Training sigmas are drawn logit-normal (or
"mode" / uniform) and shifted: sigma' = s * sigma / (1 + (s - 1) * sigma), with s either fixed or
resolution dependent, s = exp(a * L + b), L = latent tokens per frame, Flux constants
a = (1.15 - 0.5) / (4096 - 256), b = 0.5 - 256 a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_video.diffusion.loss import Generators, NoisedInputs, draw, masked_mean

_SHIFT_A = (1.15 - 0.5) / (4096 - 256)
_SHIFT_B = 0.5 - 256 * _SHIFT_A


def resolution_shift(latent_h: int, latent_w: int, patch: int = 2) -> float:
    """Flux dynamic shift for a latent frame of latent_h x latent_w (tokens per frame = h*w / patch^2)."""
    tokens = (latent_h * latent_w) // (patch * patch)
    return math.exp(_SHIFT_A * tokens + _SHIFT_B)


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s * sigma / (1 + (s - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass
class FlowMatching:
    """The v1.5 training objective and its sigma distribution."""

    weighting: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | None = None
    """Fixed shift; None uses the resolution-dependent shift of each batch."""

    patch_size: int = 2
    sigma_eps: float = 0.0
    """Lower bound on sigma (0 disables)."""

    def sample_sigmas(self, batch: int, latent_hw: tuple[int, int], generator: Generators) -> torch.Tensor:
        """Training sigmas [B] in (0, 1), shifted."""
        if self.weighting == "logit_normal":
            u = torch.sigmoid(self.logit_mean + self.logit_std * draw(generator, batch, ()))
        elif self.weighting == "mode":
            u = draw(generator, batch, (), "rand")
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            u = draw(generator, batch, (), "rand")
        shift = self.shift if self.shift is not None else resolution_shift(*latent_hw, self.patch_size)
        sigma = shift_sigmas(u, shift)
        if self.sigma_eps > 0:
            sigma = sigma.clamp(min=self.sigma_eps)
        return sigma

    def noisy_input(self, x0: torch.Tensor, noise: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
        """x_sigma for x0 [B, ...] in fp32."""
        s = sigma_B.float().view(-1, *([1] * (x0.dim() - 1)))
        return s * noise.float() + (1 - s) * x0.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
        """Velocity target noise - x0."""
        return noise.float() - x0.float()

    def timesteps(self, sigma_B: torch.Tensor) -> torch.Tensor:
        """Model timestep sigma * 1000."""
        return sigma_B.float() * 1000

    def noised_inputs(self, x0_BCTHW: torch.Tensor, generator: Generators) -> NoisedInputs:
        """Draw sigma, then noise, from `generator` (or one generator per sample) and build x_sigma.

        Ranks seeded alike draw identical samples.
        """
        b = x0_BCTHW.shape[0]
        sigma = self.sample_sigmas(b, tuple(x0_BCTHW.shape[-2:]), generator).to(x0_BCTHW.device)
        noise = draw(generator, b, tuple(x0_BCTHW.shape[1:])).to(x0_BCTHW.device)
        return self.noised_inputs_at(x0_BCTHW, noise, sigma)

    def noised_inputs_at(
        self, x0_BCTHW: torch.Tensor, noise: torch.Tensor, sigma_B: torch.Tensor
    ) -> NoisedInputs:
        """x_sigma, timesteps and target at given sigmas [B] and noise (fixed-level evaluation)."""
        sigma_B = sigma_B.to(x0_BCTHW.device)
        x_t = self.noisy_input(x0_BCTHW, noise, sigma_B).to(x0_BCTHW.dtype)
        return NoisedInputs(x_t, self.timesteps(sigma_B), self.target(x0_BCTHW, noise, sigma_B))

    def level(self, point: float) -> float:
        """The sigma at `point` in (0, 1) of the noise range (unshifted)."""
        return float(point)

    def loss(
        self, pred: torch.Tensor, inputs: NoisedInputs, loss_mask_BTHW: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Masked MSE between the prediction and the velocity target noise - x0."""
        return masked_mean((pred.float() - inputs.target) ** 2, loss_mask_BTHW, inputs.weight)

    def training_loss(
        self,
        model,
        x0_BCTHW: torch.Tensor,
        cond: dict,
        generator: Generators,
        loss_mask_BTHW: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked MSE between model(x_sigma, sigma*1000, **cond) and noise - x0."""
        inputs = self.noised_inputs(x0_BCTHW, generator)
        pred = model(inputs.x_t, inputs.timesteps, **cond)
        return self.loss(pred, inputs, loss_mask_BTHW)
