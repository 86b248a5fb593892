"""Reading and writing media with PyAV (its wheel bundles FFmpeg with libx264) and Pillow.

* `read_video_frames(path, indices)` decodes only up to the last index asked for, converting only the
  frames asked for; when the first index is far into the file it seeks to the keyframe before it,
  numbering frames from the packets' timestamps. Frame i is the i-th frame the decoder outputs
  (presentation order) either way, so a file with a gap in its timestamps decodes the same frames
  whether or not the read seeks.
* `iter_video_frames(path)` streams every frame (for tools that re-encode whole videos).
* `probe_video(path)` reads the stream's frame rate; when the container does not state one it
  reports `FALLBACK_FPS` (30, as the reference's decord reader does) with `fps_known=False`.
* `read_image(path)` opens an image with Pillow as RGB.
* `write_video(path, frames, fps)` is the project's one video writer: H.264 (libx264, yuv420p) mp4.

Every failure to read (missing, corrupt, truncated, too few frames, bad crop, over the time limit)
raises `MediaReadError`; the dataset catches it and replaces the sample. Arrays are uint8
[T, H, W, 3] (THWC) unless a name says otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

FALLBACK_FPS = 30.0
"""Frame rate assumed when a video stream states none."""

SEEK_MIN_FRAME = 64
"""Seek (instead of decoding from the start) when the first frame asked for is at least this far in."""

Crop = tuple[int, int, int, int]
"""(x0, x1, y0, y1): keep columns [x0, x1) and rows [y0, y1), the annotation's `crop` order."""


class MediaReadError(RuntimeError):
    """A media file that cannot be read as asked; the message names the file and the cause."""


class DecodeTimeout(MediaReadError):
    """Reading took longer than its time limit."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream."""

    fps: float
    """Average frame rate, or FALLBACK_FPS when unknown."""

    fps_known: bool
    """False when `fps` is the fallback."""

    height: int
    width: int
    num_frames: int
    """Frame count stated by the container (0 when it does not state one; not decoded)."""


def _stream_fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame rate, size and stated frame count of a video, without decoding frames."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = _stream_fps(stream)
            return VideoInfo(
                fps=fps if fps is not None else FALLBACK_FPS,
                fps_known=fps is not None,
                height=stream.codec_context.height,
                width=stream.codec_context.width,
                num_frames=int(stream.frames or 0),
            )
    except (av.FFmpegError, OSError) as e:
        raise MediaReadError(f"{path}: cannot open video ({e})") from e


def _crop_array(frame_HWC: np.ndarray, crop: Crop | None, path) -> np.ndarray:
    if crop is None:
        return frame_HWC
    x0, x1, y0, y1 = crop
    h, w = frame_HWC.shape[:2]
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise MediaReadError(f"{path}: crop [x0, x1, y0, y1] = {list(crop)} does not fit a {h}x{w} frame")
    return frame_HWC[y0:y1, x0:x1]


def read_video_frames(
    path: str | os.PathLike,
    indices: Sequence[int],
    *,
    crop: Crop | None = None,
    timeout_s: float | None = None,
    seek: bool | None = None,
) -> np.ndarray:
    """Frames `indices` (presentation order, repeats allowed) of a video as uint8 [T, H, W, 3].

    crop: (x0, x1, y0, y1) applied to every frame. timeout_s: time limit for the whole read, checked
    after every decoded frame (a single libav call that hangs is not interrupted here; the dataset
    guards that with a thread). seek: None decides by SEEK_MIN_FRAME; True/False forces it.
    """
    if len(indices) == 0:
        raise ValueError("read_video_frames needs at least one frame index")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    wanted = sorted(set(int(i) for i in indices))
    if wanted[0] < 0:
        raise ValueError(f"negative frame index {wanted[0]} for {path}")
    use_seek = wanted[0] >= SEEK_MIN_FRAME if seek is None else seek
    try:
        frames = None
        if use_seek:
            frames = _decode_after_seek(path, wanted, crop, deadline)
        if frames is None:
            frames = _decode_from_start(path, wanted, crop, deadline)
    except MediaReadError:
        raise
    except (av.FFmpegError, OSError, EOFError) as e:
        raise MediaReadError(f"{path}: decoding failed ({type(e).__name__}: {e})") from e
    return np.stack([frames[i] for i in indices])


def _open(path):
    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise MediaReadError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _check_deadline(deadline, path, done: int, total: int) -> None:
    if deadline is not None and time.monotonic() > deadline:
        of = f" of {total}" if total >= 0 else ""
        raise DecodeTimeout(f"{path}: decoding exceeded its time limit after {done}{of} frames")


def iter_video_frames(
    path: str | os.PathLike, *, size: tuple[int, int] | None = None, timeout_s: float | None = None
):
    """Yield every frame of a video in presentation order as uint8 [H, W, 3], decoding as it goes.

    size: (height, width) to scale to in FFmpeg's scaler (area filter) while converting to RGB; for
    tools that re-encode whole videos (training resizes with `resolution.py` instead).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    scale = {} if size is None else {"height": size[0], "width": size[1], "interpolation": "AREA"}
    try:
        container, stream = _open(path)
        with container:
            for decoded, frame in enumerate(container.decode(stream)):
                _check_deadline(deadline, path, decoded, -1)
                yield frame.to_ndarray(format="rgb24", **scale)
    except (av.FFmpegError, OSError, EOFError) as e:
        raise MediaReadError(f"{path}: decoding failed ({type(e).__name__}: {e})") from e


def _decode_from_start(path, wanted: list[int], crop, deadline) -> dict[int, np.ndarray]:
    need = set(wanted)
    last = wanted[-1]
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    container, stream = _open(path)
    with container:
        for frame in container.decode(stream):
            if decoded in need:
                frames[decoded] = _crop_array(frame.to_ndarray(format="rgb24"), crop, path)
            decoded += 1
            _check_deadline(deadline, path, len(frames), len(need))
            if decoded > last:
                break
    if len(frames) < len(need):
        missing = sorted(need - frames.keys())
        raise MediaReadError(
            f"{path}: video ended after {decoded} frames; frame {missing[0]} "
            f"was asked for ({len(missing)} of {len(need)} missing: truncated or shorter than annotated)"
        )
    return frames


def _frame_numbers(path, last: int) -> dict[int, int] | None:
    """Presentation-order frame number of each timestamp, for the first `last` + 32 frames, from the
    packets' timestamps (demuxed, not decoded); None when a packet has no timestamp.

    Frame i is the i-th frame the decoder outputs, so a stream whose timestamps have a gap (an AVI
    that skips a timestamp) is numbered by count, as the sequential reader numbers it."""
    stamps = []
    container, stream = _open(path)
    with container:
        for packet in container.demux(stream):
            if packet.size == 0:  # empty (skip) packets produce no frame
                continue
            if packet.pts is None:
                return None
            stamps.append(packet.pts)
            if len(stamps) > last + 32:  # margin for frames reordered after `last`
                break
    return {pts: i for i, pts in enumerate(sorted(stamps))}


def _decode_after_seek(path, wanted: list[int], crop, deadline) -> dict[int, np.ndarray] | None:
    """Seek to the keyframe before wanted[0] and number frames by `_frame_numbers`; None when unusable."""
    need = set(wanted)
    numbers = _frame_numbers(path, wanted[-1])
    if numbers is None:
        return None
    first_pts = next((pts for pts, i in numbers.items() if i == wanted[0]), None)
    if first_pts is None:
        return None
    frames: dict[int, np.ndarray] = {}
    container, stream = _open(path)
    with container:
        container.seek(first_pts, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            i = None if frame.pts is None else numbers.get(frame.pts)
            if i is None:
                return None
            if not frames and i > wanted[0]:
                return None  # landed after the first frame asked for
            if i in need:
                frames[i] = _crop_array(frame.to_ndarray(format="rgb24"), crop, path)
            _check_deadline(deadline, path, len(frames), len(need))
            if i >= wanted[-1]:
                break
    if len(frames) < len(need):
        return None  # let the sequential reader decide (and report) what is missing
    return frames


def read_image(path: str | os.PathLike, *, crop: Crop | None = None) -> np.ndarray:
    """An image as uint8 [1, H, W, 3] (RGB; grey and alpha images are converted)."""
    try:
        with Image.open(path) as im:
            array = np.array(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    return _crop_array(array, crop, path)[None]


def _as_fraction(fps: float | Fraction) -> Fraction:
    if isinstance(fps, Fraction):
        return fps
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray,
    fps: float | Fraction,
    *,
    layout: str | None = None,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Write uint8 frames as an H.264 (libx264, yuv420p) mp4 and return the path.

    frames: [T, C, H, W] or [T, H, W, C] with C = 3 (RGB) or 1 (grey); `layout` ("TCHW" / "THWC")
    settles shapes where both readings are possible. Odd heights or widths get one replicated
    row / column (yuv420p needs even sizes). crf: x264 quality (0 lossless, 18 visually lossless,
    23 x264's default); preset: x264 speed/size trade-off ("veryfast" ... "veryslow"). Parent
    folders are created.
    """
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8:
        raise TypeError(
            f"write_video takes uint8 frames, got {array.dtype}; convert model outputs in [-1, 1] with "
            "video_to_uint8(...) first"
        )
    if array.ndim != 4:
        raise ValueError(f"write_video takes [T, C, H, W] or [T, H, W, C] frames, got shape {array.shape}")
    if layout is None:
        channels_first, channels_last = array.shape[1] in (1, 3), array.shape[3] in (1, 3)
        if channels_first == channels_last:
            raise ValueError(
                f"cannot tell TCHW from THWC for shape {array.shape}; pass layout='TCHW' or 'THWC'"
            )
        layout = "TCHW" if channels_first else "THWC"
    if layout == "TCHW":
        array = array.transpose(0, 2, 3, 1)
    elif layout != "THWC":
        raise ValueError(f"layout must be 'TCHW' or 'THWC', got {layout!r}")
    if array.shape[3] == 1:
        array = np.repeat(array, 3, axis=3)
    if array.shape[3] != 3:
        raise ValueError(f"write_video takes 1 or 3 channels, got {array.shape[3]}")
    t, h, w, _ = array.shape
    if h % 2 or w % 2:
        array = np.pad(array, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=_as_fraction(fps))
        stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame_HWC in array:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HWC), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_to_uint8(video_CTHW: torch.Tensor) -> torch.Tensor:
    """A float video [C, T, H, W] in [-1, 1] (the model's range) -> uint8 [T, H, W, C] for write_video."""
    return (
        ((video_CTHW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    )
