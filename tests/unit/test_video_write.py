"""inference.pipeline.write_videos: H.264 mp4 files that PyAV decodes back to what was written.

The test pattern is smooth in space (ramps and a product) and moves in time, as sampled videos
do. H.264 at the writer's CRF 18 with 4:2:0 chroma and BT.601 limited-range colour conversion is
not lossless: even a flat grey frame comes back one level off. On this pattern the mean absolute
error per pixel and channel is about 1.5 levels of 255 (measured), so the bound is 3 levels; the
frame order is checked by requiring every decoded frame to be nearest to its own written frame.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

MEAN_ABS_ERROR_MAX = 3.0
"""Mean |decoded - written| over all pixels and channels, in uint8 levels (0..255)."""


def _pattern(batch: int, frames: int, height: int, width: int) -> torch.Tensor:
    """A smooth moving video [B, 3, T, H, W] in [-1, 1]; each batch entry drifts its own way."""
    t = torch.linspace(-0.5, 0.5, frames).view(frames, 1, 1)
    y = torch.linspace(-1, 1, height).view(1, height, 1)
    x = torch.linspace(-1, 1, width).view(1, 1, width)
    videos = []
    for b in range(batch):
        sign = 1 - 2 * (b % 2)
        channels = [0.5 * x + 0.4 * sign * t, 0.5 * y - 0.4 * sign * t, 0.4 * x * y + 0.1 * b]
        videos.append(torch.stack([c.expand(frames, height, width) for c in channels]))
    return torch.stack(videos).clamp(-1, 1)


def _decode(path) -> tuple[dict, np.ndarray]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = {
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": stream.average_rate,
        }
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return info, frames


@pytest.mark.parametrize("fps", [8.0, 30000 / 1001])
def test_written_videos_decode_to_what_was_written(tmp_path, fps):
    from megatron_video.data.video_io import video_to_uint8
    from megatron_video.inference.pipeline import write_videos

    batch, frames, height, width = 2, 9, 48, 80
    videos = _pattern(batch, frames, height, width)
    paths = write_videos(videos, [tmp_path / "a.mp4", tmp_path / "sub" / "b.mp4"], fps=fps)
    assert [p.name for p in paths] == ["a.mp4", "b.mp4"]

    for video, path in zip(videos, paths):
        info, decoded = _decode(path)
        assert info == {
            "codec": "h264",
            "width": width,
            "height": height,
            "fps": Fraction(fps).limit_denominator(1001),
        }
        assert decoded.shape == (frames, height, width, 3)
        written = video_to_uint8(video).numpy().astype(np.float64)  # [T, H, W, C]
        error = np.abs(decoded.astype(np.float64) - written)
        assert error.mean() <= MEAN_ABS_ERROR_MAX, error.mean()
        # Frame k decodes nearest to written frame k (order and count kept).
        per_pair = np.abs(decoded[:, None].astype(np.float64) - written[None]).mean(axis=(2, 3, 4))
        assert (per_pair.argmin(axis=1) == np.arange(frames)).all()
