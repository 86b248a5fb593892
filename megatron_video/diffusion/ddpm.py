"""DDPM objectives of Open-Sora-Plan v1.2 (epsilon) and v1.3 (v-prediction, zero terminal SNR).

Linear betas 1e-4 .. 0.02 over 1000 steps; with `zero_terminal_snr` they are rescaled so that
SNR(T) = 0 (Lin et al. 2023). x_t = sqrt(a) x0 + sqrt(1 - a) eps; targets eps or
v = sqrt(a) eps - sqrt(1 - a) x0. Min-SNR weighting with gamma: min(SNR, g) / SNR for eps,
min(SNR, g) / (SNR + 1) for v. Integer timesteps are drawn by stratified ("explicit uniform")
sampling across data-parallel ranks: rank r of n draws round(U[T r / n - 0.5, T (r + 1) / n - 0.5]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from megatron_video.diffusion.loss import Generators, NoisedInputs, draw, masked_mean


def linear_betas(steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """Linear beta schedule in float64."""
    return torch.linspace(start, end, steps, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR and the first is unchanged."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass
class DDPMObjective:
    """Discrete-time diffusion objective with epsilon or v prediction."""

    prediction: Literal["epsilon", "v_prediction"] = "v_prediction"
    zero_terminal_snr: bool = True
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    """Per-channel offset noise scale (v1.2 used 0.02)."""

    dp_rank: int = 0
    dp_size: int = 1
    alphas_bar: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        betas = linear_betas(self.num_steps, self.beta_start, self.beta_end)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_bar = torch.cumprod(1 - betas, 0)

    def sample_timesteps(self, batch: int, generator: Generators) -> torch.Tensor:
        """Stratified integer timesteps [B] for this data-parallel rank."""
        t = self.num_steps
        lo = t * self.dp_rank / self.dp_size - 0.5
        hi = t * (self.dp_rank + 1) / self.dp_size - 0.5
        u = lo + (hi - lo) * draw(generator, batch, (), "rand", torch.float64)
        return u.round().clamp(0, t - 1).long()

    def level(self, point: float) -> int:
        """The integer timestep at `point` in (0, 1) of the schedule."""
        return round(point * (self.num_steps - 1))

    def snr(self, t_B: torch.Tensor) -> torch.Tensor:
        """alpha_bar / (1 - alpha_bar) at integer timesteps."""
        a = self.alphas_bar[t_B]
        return a / (1 - a)

    def noised_inputs(self, x0_BCTHW: torch.Tensor, generator: Generators) -> NoisedInputs:
        """Draw timesteps, noise, then offset noise from `generator` (or one per sample); build x_t."""
        b = x0_BCTHW.shape[0]
        t = self.sample_timesteps(b, generator)
        noise = draw(generator, b, tuple(x0_BCTHW.shape[1:]))
        if self.noise_offset:
            noise = noise + self.noise_offset * draw(generator, b, (x0_BCTHW.shape[1], 1, 1, 1))
        return self.noised_inputs_at(x0_BCTHW, noise, t)

    def noised_inputs_at(self, x0_BCTHW: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> NoisedInputs:
        """x_t, timesteps, target and Min-SNR weight at given integer timesteps [B] and noise."""
        t = t.long().cpu()
        noise = noise.to(x0_BCTHW.device)
        a = self.alphas_bar[t].float().to(x0_BCTHW.device).view(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * x0_BCTHW.float() + (1 - a).sqrt() * noise
        if self.prediction == "epsilon":
            target = noise
        else:
            target = a.sqrt() * noise - (1 - a).sqrt() * x0_BCTHW.float()
        weight = None
        if self.snr_gamma is not None:
            snr = self.snr(t).float()
            clipped = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
            weight = clipped / snr if self.prediction == "epsilon" else clipped / (snr + 1)
            weight = torch.nan_to_num(weight, nan=0.0, posinf=0.0).to(x0_BCTHW.device)
        return NoisedInputs(x_t.to(x0_BCTHW.dtype), t.float().to(x0_BCTHW.device), target, weight)

    def loss(self, pred: torch.Tensor, inputs: NoisedInputs, loss_mask_BTHW=None) -> torch.Tensor:
        """Weighted (min-SNR) masked MSE of the epsilon or v prediction."""
        return masked_mean((pred.float() - inputs.target) ** 2, loss_mask_BTHW, inputs.weight)

    def training_loss(self, model, x0_BCTHW, cond: dict, generator: Generators, loss_mask_BTHW=None):
        """Weighted masked MSE of the epsilon or v prediction."""
        inputs = self.noised_inputs(x0_BCTHW, generator)
        pred = model(inputs.x_t, inputs.timesteps, **cond)
        return self.loss(pred, inputs, loss_mask_BTHW)
