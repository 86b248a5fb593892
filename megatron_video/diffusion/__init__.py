"""Diffusion objectives and samplers, separate from the networks they train."""

from megatron_video.diffusion.ddpm import DDPMObjective
from megatron_video.diffusion.ddpm_samplers import DDPM_SAMPLERS, ddpm_sample
from megatron_video.diffusion.flow import FlowMatching, resolution_shift, shift_sigmas
from megatron_video.diffusion.samplers import euler_flow_sample, flow_sigmas, guided_velocity

__all__ = [
    "DDPM_SAMPLERS",
    "DDPMObjective",
    "FlowMatching",
    "ddpm_sample",
    "euler_flow_sample",
    "flow_sigmas",
    "guided_velocity",
    "resolution_shift",
    "shift_sigmas",
]
