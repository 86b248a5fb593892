"""CausalVideoVAE (Open-Sora-Plan v1.2, 4x8x8, 4 latent channels): config.py (+ FLAVORS), model.py,
state_dict_adapter.py."""
