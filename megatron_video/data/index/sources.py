"""Streaming the annotation files of a data list into columns, one chunk at a time.

No annotation file is ever read whole: a .jsonl file is split into byte ranges at line starts (the
chunks of a parallel build), and a .json list is decoded one entry at a time by `iter_json_list`
(one chunk per .json file: split very large lists into several files, or write .jsonl, to build
them in parallel). Bytes are decoded as UTF-8 whatever the locale.

Each entry gets one counted outcome, named by `file:position` (1-based line of a .jsonl, 0-based
index of a .json list):
- skipped: `malformed` (not JSON, or a field against the format), `not_utf8` (a byte that is not
  UTF-8), `bad_text` (a lone surrogate in the path or a caption), `missing_file`,
  `unreadable_media` (probing failed), `crop_outside_frame` (a crop that does not fit the file's
  real frame);
- fixed (kept): `fps_probed` (no fps in the annotation: the file's own rate), `num_frames_probed`,
  `resolution_corrected` (the annotated size contradicted the file: the file's size wins);
- noted (kept): `fps_missing` (no fps and not probed: the rules use data.default_fps),
  `cjk_only_caption` (a caption of CJK text only; cleaning keeps it, see text.clean_caption).
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_video.data.annotations import (
    IMAGE_EXTENSIONS,
    Entry,
    EntryError,
    not_utf8_message,
    parse_entry,
    read_data_list,
)
from megatron_video.data.index.format import (
    FLAG_CJK_ONLY_CAPTION,
    FLAG_FPS_PROBED,
    FLAG_NUM_FRAMES_PROBED,
    FLAG_RESOLUTION_CORRECTED,
    as_arrays,
    empty_columns,
)
from megatron_video.errors import ConfigError

logger = logging.getLogger(__name__)

SKIP_REASONS = ("malformed", "not_utf8", "bad_text", "missing_file", "unreadable_media", "crop_outside_frame")
FIX_REASONS = ("fps_probed", "num_frames_probed", "resolution_corrected")
NOTE_REASONS = ("fps_missing", "cjk_only_caption")
MAX_LOGGED = 10
"""Problems logged one by one per chunk; every one is counted and written to the skip report."""

ProbeMode = Literal["none", "missing", "all"]


@dataclass(frozen=True)
class BuildOptions:
    """How entries are checked while reading."""

    check_files: bool = True
    """Stat every media file; skip (count) the missing ones."""

    probe: ProbeMode = "missing"
    """"all": open every media file (fps, frame count, size; fills what the annotation lacks, corrects a
    contradicting resolution, skips unreadable files); "missing": only videos without fps or frame
    count; "none": never."""

    def to_dict(self) -> dict[str, Any]:
        return {"check_files": self.check_files, "probe": self.probe}


@dataclass(frozen=True)
class Chunk:
    """A unit of work: a byte range of a .jsonl file, or a whole .json file."""

    source: int
    """Index of the annotation file in the data list's order."""

    start: int
    end: int
    """Byte range [start, end) (a .json chunk covers the file)."""

    first_position: int
    """Line number of the first line at `start` (.jsonl) or 0 (.json)."""


@dataclass
class ChunkResult:
    """The columns of a chunk's kept entries and what happened to the others."""

    columns: dict[str, Any]
    paths: list[str]
    captions: list[list[str]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def plan_chunks(sources: list[Path], chunk_bytes: int) -> list[Chunk]:
    """Chunks of every annotation file, in data-list order; .jsonl files split near `chunk_bytes`."""
    chunks: list[Chunk] = []
    for source, path in enumerate(sources):
        size = path.stat().st_size
        if path.suffix != ".jsonl":
            chunks.append(Chunk(source, 0, size, 0))
            continue
        start, line = 0, 1
        with open(path, "rb") as f:
            while start < size:
                f.seek(min(start + chunk_bytes, size))
                if f.tell() < size:
                    f.readline()  # to the start of the next line
                end = f.tell()
                f.seek(start)
                newlines, left = 0, end - start
                while left > 0:
                    block = f.read(min(left, 1 << 24))
                    newlines += block.count(b"\n")
                    left -= len(block)
                chunks.append(Chunk(source, start, end, line))
                start, line = end, line + newlines
    return chunks


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def iter_json_list(path: Path, block_chars: int = 1 << 20):
    """Yield (index, raw entry, has_bad_bytes) of a .json list, decoding one entry at a time.

    Bytes that are not UTF-8 are kept as escape code points (surrogateescape) so only the entry
    holding them is lost; `has_bad_bytes` says so. Invalid JSON raises ConfigError naming the entry.
    """
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False
        escapes = False  # the buffer holds an escaped (non-UTF-8) byte: only then search entries

        def more() -> None:
            nonlocal buf, pos, eof, escapes
            data = f.read(block_chars)
            eof = not data
            new = text.decode(data, final=eof)
            buf = buf[pos:] + new
            pos = 0
            if not escapes and not new.isascii():
                try:
                    new.encode("utf-8")  # fails only on escape code points
                except UnicodeEncodeError:
                    escapes = True

        def skip_space() -> None:
            nonlocal pos
            while True:
                pos = _WHITESPACE.match(buf, pos).end()
                if pos < len(buf) or eof:
                    return
                more()

        skip_space()
        if buf[pos : pos + 1] != "[":
            raise ConfigError(f"{path}: a .json annotation file must hold a list of entries")
        pos += 1
        index = 0
        while True:
            skip_space()
            if pos >= len(buf):
                raise ConfigError(f"{path}: the list ends without ']' after entry {index - 1}")
            if buf[pos] == "]":
                return
            if index > 0:
                if buf[pos] != ",":
                    raise ConfigError(
                        f"{path}: entry {index}: expected ',' between entries, got {buf[pos]!r}"
                    )
                pos += 1
                skip_space()
            while True:
                try:
                    raw, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    truncated = e.pos >= len(buf) - 64 or e.msg.startswith("Unterminated")
                    if eof or not truncated:
                        raise ConfigError(f"{path}: entry {index}: not valid JSON ({e.msg})") from None
                    more()
            yield index, raw, escapes and _ESCAPED_BYTE.search(buf, pos, end) is not None
            pos, index = end, index + 1
            if pos > block_chars:
                buf, pos = buf[pos:], 0


def iter_jsonl(path: Path, chunk: Chunk):
    """Yield (line number, raw entry or None, problem (reason, message) or None) of a .jsonl chunk."""
    with open(path, "rb") as f:
        f.seek(chunk.start)
        line_no = chunk.first_position
        while f.tell() < chunk.end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                try:
                    yield line_no, json.loads(line.decode("utf-8")), None
                except UnicodeDecodeError as e:
                    yield line_no, None, ("not_utf8", not_utf8_message(line, e))
                except json.JSONDecodeError as e:
                    yield line_no, None, ("malformed", f"not valid JSON ({e.msg} at column {e.colno})")
            line_no += 1


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD_OUTSIDE_CJK = re.compile(r"[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def is_cjk_only(caption: str) -> bool:
    """True for a caption with CJK ideographs and no other letter or digit."""
    if caption.isascii():
        return False
    return _CJK.search(caption) is not None and _WORD_OUTSIDE_CJK.search(caption) is None


class _Probe:
    """What a media file says about itself (PyAV for videos, the image header for images)."""

    def __init__(self, path: str, is_image: bool):
        if is_image:
            from PIL import Image

            with Image.open(path) as im:
                self.width, self.height = im.size
            self.fps, self.num_frames = None, 0
        else:
            from megatron_video.data.video_io import probe_video

            info = probe_video(path)
            self.height, self.width = info.height, info.width
            self.fps = info.fps if info.fps_known else None
            self.num_frames = info.num_frames


def _probe_fixes(raw: dict, root: Path, options: BuildOptions) -> tuple[dict, int, list[tuple[str, str]]]:
    """The raw entry with what probing fills or corrects, its flags and the fixes in words.

    Raises EntryError("unreadable_media") when a probe asked for by probe="all" fails."""
    path = raw.get("path")
    if not isinstance(path, str) or not path or options.probe == "none":
        return raw, 0, []
    is_image = os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
    lacks_fps = raw.get("fps") is None
    lacks_frames = raw.get("num_frames") is None and raw.get("cut") is None
    if options.probe == "missing" and (is_image or not (lacks_fps or lacks_frames)):
        return raw, 0, []
    full = os.path.join(root, path)
    try:
        probe = _Probe(full, is_image)
    except Exception as e:  # a file that cannot be opened: skipped under probe="all", else left as is
        if options.probe == "all" and os.path.exists(full):
            error = EntryError(f"cannot probe {full}: {type(e).__name__}: {e}")
            error.reason = "unreadable_media"
            raise error from None
        return raw, 0, []
    raw, flags, fixes = dict(raw), 0, []
    if not is_image and lacks_fps and probe.fps is not None:
        raw["fps"] = probe.fps
        flags |= FLAG_FPS_PROBED
        fixes.append(("fps_probed", f"no fps annotated; the file's rate is {probe.fps:.3f}"))
    if not is_image and lacks_frames and probe.num_frames > 0:
        raw["num_frames"] = probe.num_frames
        flags |= FLAG_NUM_FRAMES_PROBED
        fixes.append(("num_frames_probed", f"no num_frames annotated; the file has {probe.num_frames}"))
    res = raw.get("resolution")
    annotated = (res.get("height"), res.get("width")) if isinstance(res, dict) else None
    if probe.height > 0 and probe.width > 0 and annotated != (probe.height, probe.width):
        raw["resolution"] = {"height": probe.height, "width": probe.width}
        flags |= FLAG_RESOLUTION_CORRECTED
        fixes.append(
            (
                "resolution_corrected",
                f"annotated resolution {annotated} (height, width) contradicts the file's "
                f"{(probe.height, probe.width)}; the file's is used",
            )
        )
    return raw, flags, fixes


def _with_checked_crop(raw: dict) -> None:
    """A crop that no longer fits the corrected resolution is a skip of its own."""
    crop, res = raw.get("crop"), raw["resolution"]
    if isinstance(crop, (list, tuple)) and len(crop) == 4 and all(isinstance(v, int) for v in crop):
        x0, x1, y0, y1 = crop
        if not (x1 <= res["width"] and y1 <= res["height"]):
            error = EntryError(
                f"crop {list(crop)} does not fit the file's {res['height']}x{res['width']} frame"
            )
            error.reason = "crop_outside_frame"
            raise error


class ChunkReader:
    """Turns raw entries into column rows, counting and reporting every entry left out or fixed."""

    def __init__(self, source_file: Path, source: int, root: Path, options: BuildOptions):
        self.file, self.source, self.root, self.options = source_file, source, root, options
        self.columns = empty_columns()
        self.paths: list[str] = []
        self.captions: list[list[str]] = []
        self.skipped: list[dict[str, Any]] = []
        self.counts: Counter = Counter()
        self._logged = 0

    def _say(self, reason: str, position: int, message: str, skip: bool) -> None:
        self.counts[reason] += 1
        if skip:
            self.skipped.append(
                {"file": str(self.file), "position": position, "reason": reason, "message": message}
            )
        if self._logged < MAX_LOGGED:
            self._logged += 1
            action = "skipping" if skip else "keeping"
            logger.warning("%s %s:%d (%s): %s", action, self.file, position, reason, message)

    def skip(self, position: int, reason: str, message: str) -> None:
        self.counts["entries"] += 1
        self._say(reason, position, message, skip=True)

    def add(self, position: int, raw: Any) -> None:
        """Check one raw entry and append it, or count why not."""
        self.counts["entries"] += 1
        location = f"{self.file}:{position}"
        try:
            flags, fixes = 0, []
            if isinstance(raw, dict):
                path = raw.get("path")
                checked = self.options.check_files and isinstance(path, str) and path
                if checked and not os.path.isfile(os.path.join(self.root, path)):
                    self._say("missing_file", position, f"media file {self.root / path} does not exist", True)
                    return
                raw, flags, fixes = _probe_fixes(raw, self.root, self.options)
                if flags & FLAG_RESOLUTION_CORRECTED:
                    _with_checked_crop(raw)
            entry = parse_entry(raw, "", location)
        except EntryError as e:
            self._say(e.reason, position, str(e), skip=True)
            return
        for reason, message in fixes:
            self._say(reason, position, message, skip=False)
        if not entry.is_image and entry.fps is None:
            self.counts["fps_missing"] += 1
        if any(is_cjk_only(c) for c in entry.captions):
            flags |= FLAG_CJK_ONLY_CAPTION
            self._say("cjk_only_caption", position, "a caption holds only CJK text; it is kept as is", False)
        self._append(entry, position, flags)

    def _append(self, entry: Entry, position: int, flags: int) -> None:
        c = self.columns
        c["num_frames"].append(-1 if entry.num_frames is None else entry.num_frames)
        c["fps"].append(float("nan") if entry.fps is None else entry.fps)
        c["height"].append(entry.height)
        c["width"].append(entry.width)
        cut = entry.cut or (-1, -1)
        c["cut_start"].append(cut[0])
        c["cut_end"].append(cut[1])
        crop = entry.crop or (-1, -1, -1, -1)
        for name, value in zip(("crop_x0", "crop_x1", "crop_y0", "crop_y1"), crop):
            c[name].append(value)
        c["aesthetic"].append(float("nan") if entry.aesthetic is None else entry.aesthetic)
        c["is_image"].append(int(entry.is_image))
        c["source"].append(self.source)
        c["position"].append(position)
        c["flags"].append(flags)
        self.paths.append(entry.path)
        self.captions.append(list(entry.captions))

    def result(self) -> ChunkResult:
        self.counts["kept"] += len(self.paths)
        return ChunkResult(as_arrays(self.columns), self.paths, self.captions, self.skipped, self.counts)


def read_chunk(sources: list[tuple[Path, Path]], chunk: Chunk, options: BuildOptions) -> ChunkResult:
    """Read one chunk; `sources` are the (media root, annotation file) pairs of the data list."""
    root, annotation = sources[chunk.source]
    reader = ChunkReader(annotation, chunk.source, root, options)
    if annotation.suffix == ".jsonl":
        for line, raw, problem in iter_jsonl(annotation, chunk):
            if problem is not None:
                reader.skip(line, *problem)
            else:
                reader.add(line, raw)
    elif annotation.suffix == ".json":
        for index, raw, bad_bytes in iter_json_list(annotation):
            if bad_bytes:
                reader.skip(index, "not_utf8", "the entry holds bytes that are not valid UTF-8")
            else:
                reader.add(index, raw)
    else:
        raise ConfigError(f"{annotation}: annotation files must end in .json or .jsonl")
    return reader.result()


def data_list_sources(data_txt: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(media root, annotation file) pairs of a data.txt (ConfigError for a broken list)."""
    return read_data_list(data_txt)
