"""Conditioning modules that turn a T2V denoiser into an I2V / inpainting one (inpaint.py)."""
