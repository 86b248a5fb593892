"""Loss reductions and the noised model inputs shared by the objectives."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoisedInputs:
    """What an objective drew for one micro-batch: the model's inputs and what its output is scored against.

    `objective.noised_inputs(x0, generator)` makes it; `objective.loss(model(x_t, timesteps, **cond),
    inputs, loss_mask)` scores the prediction. A pipeline stage without the output head needs only
    `x_t` and `timesteps`.
    """

    x_t: torch.Tensor
    """Noisy latents [B, C, T, H, W] in the dtype of x0: the model input."""

    timesteps: torch.Tensor
    """Model timesteps [B] (float) on x0's device."""

    target: torch.Tensor
    """Regression target [B, C, T, H, W] in fp32."""

    weight: torch.Tensor | None = None
    """Per-sample loss weight [B] (fp32), or None for uniform weighting."""


def masked_mean(
    err_BCTHW: torch.Tensor, mask_BTHW: torch.Tensor | None, weight_B: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of `err` over valid latent positions (mask 1) of the whole batch, each sample weighted.

    With no mask (or an all-ones mask) this is the plain mean of the weighted error.
    """
    if weight_B is not None:
        err_BCTHW = err_BCTHW * weight_B.to(err_BCTHW.dtype).view(-1, *([1] * (err_BCTHW.dim() - 1)))
    if mask_BTHW is None:
        return err_BCTHW.mean()
    m = mask_BTHW.to(err_BCTHW.dtype).unsqueeze(1).expand_as(err_BCTHW)
    return (err_BCTHW * m).sum() / m.sum().clamp(min=1)


Generators = torch.Generator | list[torch.Generator]


def draw(
    generator: Generators, batch: int, sample_shape: tuple[int, ...], kind: str = "randn", dtype=torch.float32
):
    """Random tensor [batch, *sample_shape]: from one generator, or one generator per sample.

    Per-sample generators make a sample's noise independent of how the batch is split over
    micro-batches and data-parallel ranks.
    """
    fn = torch.randn if kind == "randn" else torch.rand
    if isinstance(generator, torch.Generator):
        return fn((batch, *sample_shape), generator=generator, dtype=dtype)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch}")
    return torch.cat([fn((1, *sample_shape), generator=g, dtype=dtype) for g in generator])
