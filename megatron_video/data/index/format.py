"""Layout of a sample index folder, its columns and its manifest.

A built index is a folder:

    manifest.json   format version, source files (size, mtime), counts kept / skipped / fixed by reason,
                    columns with their dtypes, build options, row count. Written last: a folder
                    without a valid manifest is not an index.
    samples.arrow   Arrow IPC file, uncompressed, ONE record batch holding the numeric columns below,
                    so each column memory-maps as one zero-copy numpy array (all ranks of a node share
                    the pages through the page cache).
    strings.arrow   Arrow IPC file, several record batches (one per build chunk): `path` (string, as
                    in the annotation, relative to its media root) and `captions` (list<string>, every
                    caption of the entry). Rows follow samples.arrow; read only per loaded sample.
    skipped.jsonl   one line per entry left out: {"file", "position", "reason", "message"}.

`position` is the 1-based line of a .jsonl file or the 0-based list index of a .json file, as in
the locations that log lines print (`file:position`).

Numeric columns use sentinels, never nulls (nulls would cost a validity bitmap and a copy):
-1 for an absent integer (images have num_frames -1, entries without cut or crop have -1 there),
NaN for an absent float (fps, aesthetic).

A build happens in `<folder>.partial/` (plan.json, parts/NNNNNN.arrow + .skipped.jsonl + .done.json
per chunk) and is renamed to `<folder>` when complete; a killed build resumes from its done chunks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from megatron_video.errors import ConfigError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLES = "samples.arrow"
STRINGS = "strings.arrow"
SKIPPED = "skipped.jsonl"
PARTIAL_SUFFIX = ".partial"

NUMERIC_COLUMNS: dict[str, str] = {
    "num_frames": "int32",
    "fps": "float64",
    "height": "int32",
    "width": "int32",
    "cut_start": "int32",
    "cut_end": "int32",
    "crop_x0": "int32",
    "crop_x1": "int32",
    "crop_y0": "int32",
    "crop_y1": "int32",
    "aesthetic": "float64",
    "is_image": "uint8",
    "source": "int32",
    "position": "int64",
    "flags": "uint8",
}
"""Numeric columns and their numpy dtypes. fps and aesthetic stay float64 so the rules compare the
same values as the annotation's JSON numbers; `source` indexes manifest["sources"]."""

STRING_COLUMNS = ("path", "captions")

FLAG_FPS_PROBED = 1
"""fps was absent and read from the file."""
FLAG_RESOLUTION_CORRECTED = 2
"""The annotated resolution contradicted the file and was replaced by the file's."""
FLAG_CJK_ONLY_CAPTION = 4
"""Some caption holds only CJK text (kept; see text.clean_caption)."""
FLAG_NUM_FRAMES_PROBED = 8
"""num_frames was absent (and no cut) and read from the file."""


class SampleIndexError(ConfigError):
    """A sample index folder that cannot be used; the message says why and how to fix it."""


def empty_columns() -> dict[str, list]:
    """One list per numeric column, to append rows to while reading a chunk."""
    return {name: [] for name in NUMERIC_COLUMNS}


def as_arrays(columns: dict[str, list]) -> dict[str, np.ndarray]:
    """Numeric column lists -> numpy arrays of their declared dtypes."""
    return {name: np.asarray(columns[name], dtype=NUMERIC_COLUMNS[name]) for name in NUMERIC_COLUMNS}


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete index folder; SampleIndexError (naming the folder) otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
        hint = (
            f" ({partial} exists: its build did not finish; run tools/build_index.py again to resume it)"
            if partial.is_dir()
            else " (build it with tools/build_index.py DATA_TXT OUT_DIR)"
        )
        raise SampleIndexError(f"data.index: {folder} is not a folder{hint}")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SampleIndexError(
            f"data.index: {folder} has no {MANIFEST}, so it is not a complete index; rebuild it with "
            "tools/build_index.py"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleIndexError(f"data.index: {path} is not valid JSON ({e}); rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise SampleIndexError(
            f"data.index: {path} has format_version {got!r}; this code reads version {FORMAT_VERSION}. "
            "Rebuild the index with tools/build_index.py"
        )
    for key in ("rows", "sources", "roots", "counts", "columns"):
        if key not in manifest:
            raise SampleIndexError(f"data.index: {path} lacks '{key}'; rebuild the index")
    for name in (SAMPLES, STRINGS):
        if not (folder / name).is_file():
            raise SampleIndexError(f"data.index: {folder} lacks {name}; rebuild the index")
    return manifest
