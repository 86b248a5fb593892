"""WF-VAE (Open-Sora-Plan v1.3 WF-VAE-S 4x8x8 and v1.5 WF-VAE-M 8x8x8): config.py (+ FLAVORS), model.py,
state_dict_adapter.py."""
