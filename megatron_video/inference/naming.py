"""File names of sampled videos that carry their prompt: VBench's layout.

VBench's standard mode looks for `{prompt}-{index}.mp4` in one folder (index 0..4, or 0..24 for
temporal flickering), the prompt text verbatim; its custom mode reads the prompt back as the file
stem without the trailing `-<number>`. `video_file_name` writes exactly that for every prompt a
file name can hold, and escapes only what it cannot: `/`, NUL and other control characters, and `%`
itself (as `%XX`, so `prompt_from_file_name` inverts it exactly, punctuation and non-ASCII text
included). VBench's own prompts need no escape. A prompt whose name would pass the file-system limit
of 255 bytes is cut at a character boundary and tagged with a hash of the full prompt (`~` + 10 hex
digits); such a name no longer holds the whole prompt, so `write_manifest` records every file's
prompt, index and seed beside the videos.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

NAME_MAX_BYTES = 255
"""Longest file name (in bytes) of common Linux file systems (ext4, xfs, tmpfs)."""

_ESCAPE = re.compile(r"[%/\x00-\x1f\x7f]")
_TRUNCATED = re.compile(r"~[0-9a-f]{10}$")


def _escape(prompt: str) -> str:
    return _ESCAPE.sub(lambda m: f"%{ord(m.group()):02X}", prompt)


def video_file_name(prompt: str, index: int, suffix: str = ".mp4") -> str:
    """`{prompt}-{index}{suffix}` with the prompt escaped as the module says (cut and tagged when too long)."""
    if not prompt:
        raise ValueError("an empty prompt has no file name")
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    tail = f"-{index}{suffix}"
    stem = _escape(prompt)
    if len((stem + tail).encode()) <= NAME_MAX_BYTES and not _TRUNCATED.search(stem):
        return stem + tail
    tag = "~" + hashlib.sha256(prompt.encode()).hexdigest()[:10]
    budget = NAME_MAX_BYTES - len((tag + tail).encode())
    cut = stem
    while len(cut.encode()) > budget:
        cut = cut[:-1]
    cut = re.sub(r"%[0-9A-F]?$", "", cut)  # never end inside an escape
    return cut + tag + tail


def prompt_from_file_name(name: str) -> tuple[str, int]:
    """(prompt, index) of a name written by `video_file_name`; ValueError for a name that was cut
    (read its prompt from the manifest) or that has no `-<index>` ending."""
    match = re.fullmatch(r"(.*)-(\d+)(\.[A-Za-z0-9]+)?", Path(name).name, flags=re.DOTALL)
    if not match:
        raise ValueError(f"{name!r} does not end in -<index>")
    if _TRUNCATED.search(match.group(1)):
        raise ValueError(f"{name!r} holds a shortened prompt; read it from the manifest beside the videos")
    return unquote(match.group(1), errors="strict"), int(match.group(2))


def write_manifest(path: str | Path, records: Iterable[dict]) -> Path:
    """A JSON list of {"file", "prompt", "index", "seed"} records, one per written video."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
