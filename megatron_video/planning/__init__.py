"""Know before you launch: memory, FLOPs and step time of a training stage, from its config alone.

Pure functions over the typed config (no process group, no model built): `devices` (peak and
achieved rates, memory, links), `params` (the exact parameter inventory per rank), `flops` (model
and hardware FLOPs per sample), `memory` (per-device memory broken down), `step` (communication
volume, predicted step time and MFU), `search` (layouts that fit, ranked by step time).
"""
