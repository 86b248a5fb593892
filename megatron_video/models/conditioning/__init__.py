"""Conditioning modules that turn a T2V denoiser into an I2V / inpainting one."""

from megatron_video.models.conditioning.inpaint import InpaintConditioning

__all__ = ["InpaintConditioning"]
