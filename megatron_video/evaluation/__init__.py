"""Image and video quality metrics used by the evaluation tools (tools/eval_vae.py, tools/eval_samples.py)."""
