"""Video/image data pipeline: annotations -> frame and size plans -> bucketed, one-shape batches.

annotations.py  data.txt + .json/.jsonl entries, validated; bad entries reported and skipped
frames.py       which source frames a video sample gets (fps resampling, crop, VAE/CP snapping)
resolution.py   target sizes (force resolution, Min-Max tokens, five ratios) and their transforms
video_io.py     PyAV decoding of chosen frames, Pillow images, the one H.264 writer
dataset.py      VideoTextDataset (replaces unreadable files within the bucket), build_dataloader
sampler.py      MegabatchBucketSampler: one shape per micro-batch, split by data-parallel rank
collate.py      stacking plus the latent-resolution video mask
"""

from megatron_video.data.collate import VideoCollate, collate_samples, latent_shape
from megatron_video.data.config import DataConfig
from megatron_video.data.dataset import (
    VideoTextDataset,
    bucket_key,
    build_dataloader,
    parse_bucket_key,
    set_epoch,
)
from megatron_video.data.sampler import MegabatchBucketSampler
from megatron_video.data.video_io import (
    MediaReadError,
    read_image,
    read_video_frames,
    video_to_uint8,
    write_video,
)

__all__ = [
    "DataConfig",
    "MediaReadError",
    "MegabatchBucketSampler",
    "VideoCollate",
    "VideoTextDataset",
    "bucket_key",
    "build_dataloader",
    "collate_samples",
    "latent_shape",
    "parse_bucket_key",
    "read_image",
    "read_video_frames",
    "set_epoch",
    "video_to_uint8",
    "write_video",
]
