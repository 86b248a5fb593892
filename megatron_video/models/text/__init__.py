"""Frozen text encoders (T5, mT5, CLIP, MiniLM) behind one interface: config.py, encoders.py."""
