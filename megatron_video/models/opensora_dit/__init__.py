"""Open-Sora-Plan v1.2 / v1.3 DiT (AdaLN-single, self-attention with 3D RoPE and Skiparse, cross-attention
to the caption) and its inpainting variants: config.py (+ FLAVORS, VERSIONS), model.py, state_dict_adapter.py."""
