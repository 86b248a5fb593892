"""Stacking one-shape samples into a batch, with the latent-resolution video mask.

The bucket sampler gives every micro-batch one shape, so nothing is padded: the video mask
[B, T_lat, H_lat, W_lat] is all ones, T_lat = (T - 1) / vae_stride_t + 1, H_lat = H / vae_stride_hw,
W_lat = W / vae_stride_hw (the SUV model's `video_mask_BTHW`, 1 = valid). A batch of mixed shapes is
an error that names every sample's shape and path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def latent_shape(
    num_frames: int, height: int, width: int, vae_stride_t: int, vae_stride_hw: int
) -> tuple[int, int, int]:
    """(T_lat, H_lat, W_lat) of a causal VAE for a [T, H, W] pixel video; raises if it does not divide."""
    if (num_frames - 1) % vae_stride_t or height % vae_stride_hw or width % vae_stride_hw:
        raise ValueError(
            f"a {num_frames}x{height}x{width} video does not fit VAE strides t={vae_stride_t}, hw={vae_stride_hw}: "
            "frames must be 1 + a multiple of the temporal stride and sides multiples of the spatial one"
        )
    return (num_frames - 1) // vae_stride_t + 1, height // vae_stride_hw, width // vae_stride_hw


def collate_samples(
    samples: Sequence[dict[str, Any]], vae_stride_t: int, vae_stride_hw: int
) -> dict[str, Any]:
    """Dataset samples -> batch.

    Returns video [B, C, T, H, W] float, video_mask [B, T_lat, H_lat, W_lat] int64 ones, index [B]
    int64, and lists of length B for captions (each a list of raw captions), aesthetic, path, is_image; bucket
    (the one shape key) and load_failures (every replaced file of the batch, "path: reason").
    """
    if not samples:
        raise ValueError("collate got an empty batch")
    shapes = [tuple(s["video"].shape) for s in samples]
    if len(set(shapes)) != 1:
        listing = "; ".join(f"{s['path']}: {list(shape)}" for s, shape in zip(samples, shapes))
        raise ValueError(
            "collate needs one video shape per batch (use MegabatchBucketSampler, which guarantees it); "
            f"got {listing}"
        )
    _, t, h, w = shapes[0]
    t_lat, h_lat, w_lat = latent_shape(t, h, w, vae_stride_t, vae_stride_hw)
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "video_mask": torch.ones(len(samples), t_lat, h_lat, w_lat, dtype=torch.int64),
        "captions": [list(s["captions"]) for s in samples],
        "aesthetic": [s.get("aesthetic") for s in samples],
        "path": [s["path"] for s in samples],
        "is_image": [bool(s.get("is_image", False)) for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "bucket": samples[0]["bucket"],
        "load_failures": [f for s in samples for f in s.get("load_failures", [])],
    }


class VideoCollate:
    """Picklable `collate_fn` for DataLoader workers: `collate_samples` with fixed VAE strides."""

    def __init__(self, vae_stride_t: int, vae_stride_hw: int):
        self.vae_stride_t, self.vae_stride_hw = vae_stride_t, vae_stride_hw

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_samples(samples, self.vae_stride_t, self.vae_stride_hw)
