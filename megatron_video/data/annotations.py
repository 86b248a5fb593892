"""Reading the annotation lists (reference 6.1).

`data.txt` holds one `<media root>,<annotation file>` per line (blank lines and lines starting with
`#` are ignored; relative paths are read relative to the folder of `data.txt`). An annotation file is
a JSON list (`.json`) or one JSON object per line (`.jsonl`) of entries:

    {"path": "clips/a.mp4",            # joined to the media root; .mp4/.mov/.mkv/.avi/.webm = video,
                                       # .jpg/.jpeg/.png/.webp/.bmp = image
     "cap": "a caption" | ["one", "or several"],
     "resolution": {"height": 720, "width": 1280},   # of the file's frames
     "num_frames": 121,                # video: frames of the clip (default: end - start of `cut`)
     "fps": 24.0,                      # video, optional (DataConfig.default_fps when absent)
     "cut": [start, end],              # optional: the clip starts at frame `start`
     "crop": [x0, x1, y0, y1],         # optional: pixels kept, before any resize
     "aesthetic": 5.1}                 # optional (or "aes")

A malformed entry is logged with its file and index (JSON list position, 0-based; .jsonl line,
1-based) and skipped; so is an entry whose media file does not exist. Both are counted, and a
summary is logged. A `data.txt` line or annotation file that cannot be read at all raises
ConfigError: that is a setup mistake, found before training starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_video.errors import ConfigError

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_LOGGED_PROBLEMS = 20
"""Problems logged one by one per call; the rest are only counted."""


@dataclass(frozen=True)
class Entry:
    """One annotated video or image, validated."""

    path: str
    """Absolute (root-joined) media path."""

    captions: tuple[str, ...]
    """Every caption given (at least one)."""

    height: int
    """Height of the file's frames, in pixels."""

    width: int
    """Width of the file's frames, in pixels."""

    is_image: bool
    num_frames: int | None = None
    """Video: frames of the clip (after `cut`); None for images."""

    fps: float | None = None
    """Video frame rate as annotated; None when absent."""

    cut: tuple[int, int] | None = None
    """(start, end) source frames of the clip."""

    crop: tuple[int, int, int, int] | None = None
    """(x0, x1, y0, y1) pixels kept."""

    aesthetic: float | None = None
    """Aesthetic score, from `aesthetic` or `aes`."""

    location: str = ""
    """Where the entry came from: `file:index` (JSON list) or `file:line` (JSONL)."""


@dataclass
class AnnotationReport:
    """Counts of what was read and skipped, and the first problems in words."""

    counts: Counter = field(default_factory=Counter)
    """Keys: `entries` (read), `kept`, `malformed`, `bad_text`, `not_utf8`, `missing_file`."""

    problems: list[str] = field(default_factory=list)
    """`location: message` of the first malformed or missing entries."""

    def add_problem(self, kind: str, location: str, message: str) -> None:
        self.counts[kind] += 1
        line = f"{location}: {message}"
        if len(self.problems) < MAX_LOGGED_PROBLEMS:
            self.problems.append(line)
            logger.warning("skipping annotation entry %s", line)


class EntryError(ValueError):
    """An annotation entry that does not follow the format; the message says which field."""

    reason = "malformed"
    """The key it is counted under."""


class BadTextError(EntryError):
    """A path or caption holding a lone surrogate code point: not text any tokenizer or file system
    accepts (it would fail at the first batch), so the entry is rejected, not repaired."""

    reason = "bad_text"


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: str, name: str) -> None:
    """Raise BadTextError when `value` holds a lone surrogate (e.g. from a JSON escape "\\ud83d")."""
    found = None if value.isascii() else _SURROGATE.search(value)
    if found is not None:
        raise BadTextError(
            f"{name} holds the lone surrogate U+{ord(found.group()):04X} at character {found.start()} "
            "(half of a UTF-16 pair, not valid text); fix the annotation"
        )


def read_data_list(data_txt: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(media root, annotation file) pairs of a data.txt, relative paths resolved against its folder."""
    data_txt = Path(data_txt)
    if not data_txt.is_file():
        raise ConfigError(f"data list {data_txt} does not exist (data.data_list)")
    base = data_txt.resolve().parent
    pairs = []
    for lineno, line in enumerate(data_txt.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "," not in line:
            raise ConfigError(f"{data_txt}:{lineno}: expected '<media root>,<annotation file>', got {line!r}")
        root, annotation = (part.strip() for part in line.rsplit(",", 1))
        root_path, annotation_path = base / root, base / annotation
        if not annotation_path.is_file():
            raise ConfigError(f"{data_txt}:{lineno}: annotation file {annotation_path} does not exist")
        pairs.append((root_path, annotation_path))
    if not pairs:
        raise ConfigError(f"{data_txt} names no annotation files")
    return pairs


def iter_raw_entries(annotation: str | os.PathLike, report: AnnotationReport):
    """Yield (location, raw entry) from a .json list or a .jsonl file; bad JSONL lines are reported."""
    annotation = Path(annotation)
    if annotation.suffix == ".jsonl":
        with open(annotation, "rb") as f:
            for lineno, raw_line in enumerate(f, start=1):
                if not raw_line.strip():
                    continue
                location = f"{annotation}:{lineno}"
                try:
                    yield location, json.loads(raw_line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    report.counts["entries"] += 1
                    report.add_problem("not_utf8", location, not_utf8_message(raw_line, e))
                except json.JSONDecodeError as e:
                    report.counts["entries"] += 1
                    report.add_problem("malformed", location, f"not valid JSON ({e.msg} at column {e.colno})")
    elif annotation.suffix == ".json":
        try:
            with open(annotation, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{annotation}: byte {e.start} (0x{e.object[e.start]:02x}) is not valid UTF-8; annotation "
                "files must be UTF-8"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{annotation}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from e
        if not isinstance(data, list):
            raise ConfigError(f"{annotation}: a .json annotation file must hold a list of entries")
        for index, raw in enumerate(data):
            yield f"{annotation}:{index}", raw
    else:
        raise ConfigError(f"{annotation}: annotation files must end in .json or .jsonl")


def not_utf8_message(line: bytes, error: UnicodeDecodeError) -> str:
    """Words for a line that is not UTF-8: the byte and its column."""
    return (
        f"byte 0x{line[error.start]:02x} at column {error.start + 1} is not valid UTF-8 "
        "(annotation files must be UTF-8)"
    )


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise EntryError(f"'{name}' must be an integer, got {value!r}")
    if value < minimum:
        raise EntryError(f"'{name}' must be >= {minimum}, got {value!r}")
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EntryError(f"'{name}' must be a finite number, got {value!r}")
    return float(value)


def parse_entry(raw: Any, root: str | os.PathLike, location: str = "") -> Entry:
    """Validate one raw entry and join its path to `root`; raises EntryError naming the field."""
    if not isinstance(raw, dict):
        raise EntryError(f"entry must be an object, got {type(raw).__name__}")
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        raise EntryError(f"'path' must be a non-empty string, got {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
        raise EntryError(
            f"'path' {path!r}: unknown extension; videos {VIDEO_EXTENSIONS}, images {IMAGE_EXTENSIONS}"
        )
    is_image = suffix in IMAGE_EXTENSIONS
    cap = raw.get("cap")
    captions = [cap] if isinstance(cap, str) else cap
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise EntryError(f"'cap' must be a string or a non-empty list of strings, got {cap!r}")
    check_text(path, "'path'")
    for i, caption in enumerate(captions):
        check_text(caption, f"'cap'[{i}]")
    resolution = raw.get("resolution")
    if not isinstance(resolution, dict):
        raise EntryError(f"'resolution' must be an object with height and width, got {resolution!r}")
    height = _int(resolution.get("height"), "resolution.height", 1)
    width = _int(resolution.get("width"), "resolution.width", 1)
    num_frames = fps = cut = None
    if not is_image:
        if raw.get("cut") is not None:
            c = raw["cut"]
            if not isinstance(c, (list, tuple)) or len(c) != 2:
                raise EntryError(f"'cut' must be [start, end], got {c!r}")
            start = _int(c[0], "cut[0]", 0)
            end = _int(c[1], "cut[1]", start + 1)
            cut = (start, end)
        if raw.get("num_frames") is None and cut is not None:
            num_frames = cut[1] - cut[0]
        else:
            num_frames = _int(raw.get("num_frames"), "num_frames", 1)
        if raw.get("fps") is not None:
            fps = _number(raw["fps"], "fps")
            if fps <= 0:
                raise EntryError(f"'fps' must be > 0, got {fps}")
    crop = None
    if raw.get("crop") is not None:
        c = raw["crop"]
        if not isinstance(c, (list, tuple)) or len(c) != 4:
            raise EntryError(f"'crop' must be [x0, x1, y0, y1], got {c!r}")
        x0, x1, y0, y1 = (_int(v, f"crop[{i}]", 0) for i, v in enumerate(c))
        if not (x0 < x1 <= width and y0 < y1 <= height):
            raise EntryError(
                f"'crop' {list(c)} must satisfy x0 < x1 <= width and y0 < y1 <= height ({width}x{height})"
            )
        crop = (x0, x1, y0, y1)
    aes = raw.get("aesthetic", raw.get("aes"))
    aesthetic = None if aes is None else _number(aes, "aesthetic")
    return Entry(
        path=os.path.join(root, path),
        captions=tuple(captions),
        height=height,
        width=width,
        is_image=is_image,
        num_frames=num_frames,
        fps=fps,
        cut=cut,
        crop=crop,
        aesthetic=aesthetic,
        location=location,
    )


def load_annotations(
    data_txt: str | os.PathLike, *, check_files_exist: bool = True
) -> tuple[list[Entry], AnnotationReport]:
    """Every valid entry of every annotation file a data.txt names, and what was skipped."""
    report = AnnotationReport()
    entries: list[Entry] = []
    for root, annotation in read_data_list(data_txt):
        for location, raw in iter_raw_entries(annotation, report):
            report.counts["entries"] += 1
            try:
                entry = parse_entry(raw, root, location)
            except EntryError as e:
                report.add_problem(e.reason, location, str(e))
                continue
            if check_files_exist and not os.path.isfile(entry.path):
                report.add_problem("missing_file", location, f"media file {entry.path} does not exist")
                continue
            entries.append(entry)
    report.counts["kept"] = len(entries)
    logger.info(
        "annotations from %s: %d entries, %d kept, %d malformed, %d missing files",
        data_txt,
        report.counts["entries"],
        report.counts["kept"],
        report.counts["malformed"],
        report.counts["missing_file"],
    )
    return entries, report
