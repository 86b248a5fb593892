"""Contact sheets: a PNG with one row per prompt showing a few frames of each video.

A row shows, left to right, the condition image (I2V, when given) and evenly spaced frames of the
generated video; a reference clip's frames (e.g. the training clip with that caption) may sit above
them. Each row is labelled with its prompt and free figure text ("PSNR 21.3 dB"). PIL only.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

FIGURE_COLOR = (40, 90, 160)
"""Colour of the figure text under each label."""

MIN_TEXT_WIDTH = 480
"""Narrowest sheet, in pixels, so that labels of short strips (single images) stay readable."""

Frames = np.ndarray | torch.Tensor
"""Video frames [T, H, W, 3] uint8 (what `data.video_io.video_to_uint8` returns), or one image [H, W, 3]."""


@dataclass
class SheetRow:
    """One prompt of a contact sheet."""

    label: str
    """The prompt (wrapped to the sheet's width)."""

    generated: Frames
    """The generated video's frames [T, H, W, 3] uint8."""

    reference: Frames | None = None
    """A reference clip's frames [T, H, W, 3] uint8, drawn above the generated frames (resized to their size)."""

    condition: Frames | None = None
    """I2V: the condition image [H, W, 3] (or [1, H, W, 3]) uint8, drawn first in the generated strip."""

    figures: str = ""
    """Figure text under the label, e.g. "PSNR 21.3 dB | nearest clip: bikes_post"."""


def evenly_spaced(count: int, wanted: int) -> list[int]:
    """`wanted` frame indices spread from the first to the last of `count` (all of them when fewer)."""
    if wanted >= count:
        return list(range(count))
    if wanted == 1:
        return [0]
    return [round(i * (count - 1) / (wanted - 1)) for i in range(wanted)]


def _as_frames(frames: Frames) -> np.ndarray:
    """[T, H, W, 3] uint8 numpy; an image [H, W, 3] becomes one frame."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 [T, H, W, 3] (or one image [H, W, 3]), got {array.dtype} {array.shape}"
        )
    return array


def _strip(frames: list[np.ndarray], size: tuple[int, int], gap: int) -> Image.Image:
    """Frames side by side, each resized to size (w, h), `gap` pixels apart."""
    w, h = size
    strip = Image.new("RGB", (len(frames) * w + (len(frames) - 1) * gap, h), "white")
    for i, frame in enumerate(frames):
        strip.paste(Image.fromarray(frame).resize((w, h), Image.NEAREST), (i * (w + gap), 0))
    return strip


def contact_sheet(
    rows: Sequence[SheetRow], frames_per_row: int = 5, scale: int = 2, title: str | None = None
) -> Image.Image:
    """The sheet as a PIL image: per row the label, the figures, then the reference strip (when given)
    above the generated strip (condition image first); frames enlarged `scale` times (nearest)."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    font = ImageFont.load_default()
    gap, pad, line_h = 4, 8, 12
    strips = []
    for row in rows:
        generated = _as_frames(row.generated)
        frame_h, frame_w = generated.shape[1] * scale, generated.shape[2] * scale
        picked = [generated[i] for i in evenly_spaced(len(generated), frames_per_row)]
        shown = ([_as_frames(row.condition)[0]] if row.condition is not None else []) + picked
        parts = []
        if row.reference is not None:
            reference = _as_frames(row.reference)
            ref = [reference[i] for i in evenly_spaced(len(reference), frames_per_row)]
            # The reference frames sit above the generated ones they compare with (after the condition slot).
            offset = len(shown) - len(picked)
            parts.append((_strip(ref, (frame_w, frame_h), gap), offset * (frame_w + gap)))
        parts.append((_strip(shown, (frame_w, frame_h), gap), 0))
        strips.append((row, parts))
    width = max(MIN_TEXT_WIDTH, *(x + s.width for _, parts in strips for s, x in parts))
    chars = max(20, (width + 2 * pad) // 6)
    blocks = []
    for row, parts in strips:
        label = textwrap.wrap(row.label, chars) or [""]
        figures = textwrap.wrap(row.figures, chars) if row.figures else []
        blocks.append(
            ([(line, "black") for line in label] + [(line, FIGURE_COLOR) for line in figures], parts)
        )
    height = pad + (line_h + pad if title else 0)
    for lines, parts in blocks:
        height += len(lines) * line_h + gap + sum(s.height + gap for s, _ in parts) + pad
    sheet = Image.new("RGB", (width + 2 * pad, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    if title:
        draw.text((pad, y), title, fill="black", font=font)
        y += line_h + pad
    for lines, parts in blocks:
        for line, color in lines:
            draw.text((pad, y), line, fill=color, font=font)
            y += line_h
        y += gap
        for strip, x in parts:
            sheet.paste(strip, (pad + x, y))
            y += strip.height + gap
        y += pad
    return sheet


def write_contact_sheet(
    path: str | Path,
    rows: Sequence[SheetRow],
    frames_per_row: int = 5,
    scale: int = 2,
    title: str | None = None,
) -> Path:
    """Write `contact_sheet(rows, ...)` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows, frames_per_row, scale, title).save(path)
    return path
