"""`SampleTable`: the rows of a sample index as numpy columns plus per-row strings.

`open_index(folder)` memory-maps samples.arrow and strings.arrow (`pyarrow.memory_map`): numeric
columns are zero-copy numpy views of the file, so every rank of a node shares their pages through
the page cache, and a process pays private memory only for what it derives from them. Paths and
captions are read one row at a time, for the samples a process loads. The in-memory table of a
small data list (`build.table_from_data_list`) has the same interface.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from megatron_video.data.annotations import Entry
from megatron_video.data.index.format import (
    NUMERIC_COLUMNS,
    SAMPLES,
    SKIPPED,
    STRINGS,
    SampleIndexError,
    read_manifest,
)


class StringColumns:
    """`path` and `captions` of every row, held as Arrow record batches (row i in batch searchsorted)."""

    def __init__(self, batches: list[pa.RecordBatch]):
        self.batches = [b for b in batches if b.num_rows]
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, row: int) -> tuple[pa.RecordBatch, int]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range [0, {len(self)})")
        b = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.batches[b], row - int(self.starts[b])

    def path(self, row: int) -> str:
        batch, i = self._locate(row)
        return batch.column(0)[i].as_py()

    def captions(self, row: int) -> list[str]:
        batch, i = self._locate(row)
        return batch.column(1)[i].as_py()


class SampleTable:
    """Rows of annotated media: numeric columns (`NUMERIC_COLUMNS`) and per-row strings."""

    def __init__(
        self,
        columns: dict[str, np.ndarray],
        strings: StringColumns,
        *,
        roots: list[str],
        sources: list[str],
        counts: Counter | dict,
        skipped: list[dict] | None = None,
        origin: str = "",
        folder: Path | None = None,
    ):
        self.columns = columns
        self.strings = strings
        self.roots, self.sources = roots, sources
        self.counts = Counter(counts)
        """Entries read, kept, skipped / fixed / noted by reason (see sources.py)."""
        self.skipped_examples = skipped or []
        """The first skip records (file, position, reason, message); a folder keeps all in skipped.jsonl."""
        self.origin, self.folder = origin, folder
        n = len(columns["num_frames"])
        if len(strings) != n or any(len(c) != n for c in columns.values()):
            raise SampleIndexError(f"{origin}: columns of different lengths; rebuild the index")

    def __len__(self) -> int:
        return len(self.columns["num_frames"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def path(self, row: int) -> str:
        """Media path of a row (joined to its media root)."""
        root = self.roots[int(self.columns["source"][row])]
        return os.path.join(root, self.strings.path(row))

    def location(self, row: int) -> str:
        """`annotation file:position` of a row."""
        return f"{self.sources[int(self.columns['source'][row])]}:{int(self.columns['position'][row])}"

    def entry(self, row: int) -> Entry:
        """The row as an annotations.Entry (reads its strings)."""
        c = {name: self.columns[name][row] for name in NUMERIC_COLUMNS}
        is_image = bool(c["is_image"])
        cut = None if c["cut_start"] < 0 else (int(c["cut_start"]), int(c["cut_end"]))
        crop = (
            None
            if c["crop_x0"] < 0
            else tuple(int(c[k]) for k in ("crop_x0", "crop_x1", "crop_y0", "crop_y1"))
        )
        return Entry(
            path=self.path(row),
            captions=tuple(self.strings.captions(row)),
            height=int(c["height"]),
            width=int(c["width"]),
            is_image=is_image,
            num_frames=None if is_image else int(c["num_frames"]),
            fps=None if np.isnan(c["fps"]) else float(c["fps"]),
            cut=cut,
            crop=crop,
            aesthetic=None if np.isnan(c["aesthetic"]) else float(c["aesthetic"]),
            location=self.location(row),
        )

    def skip_report(self, limit: int = 20) -> list[dict[str, Any]]:
        """The first `limit` skip records."""
        if self.folder is None:
            return self.skipped_examples[:limit]
        records = []
        with open(self.folder / SKIPPED, encoding="utf-8") as f:
            for line in f:
                if len(records) >= limit:
                    break
                records.append(json.loads(line))
        return records


def _numeric_view(array: pa.Array | pa.ChunkedArray, name: str, path: Path) -> np.ndarray:
    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks != 1:
            raise SampleIndexError(
                f"{path}: column {name} is split in {array.num_chunks} chunks; rebuild the index"
            )
        array = array.chunk(0)
    if array.null_count:
        raise SampleIndexError(f"{path}: column {name} has nulls; rebuild the index")
    return array.to_numpy(zero_copy_only=True)


def open_index(folder: str | os.PathLike) -> SampleTable:
    """The table of a built index folder, memory-mapped (SampleIndexError for an incomplete folder)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    samples = pa.ipc.open_file(pa.memory_map(str(folder / SAMPLES))).read_all()
    columns = {}
    for name, dtype in NUMERIC_COLUMNS.items():
        if name not in samples.column_names:
            raise SampleIndexError(f"{folder / SAMPLES}: no column {name}; rebuild the index")
        columns[name] = _numeric_view(samples.column(name), name, folder / SAMPLES)
        if columns[name].dtype != np.dtype(dtype):
            raise SampleIndexError(f"{folder / SAMPLES}: column {name} is {columns[name].dtype}, not {dtype}")
    reader = pa.ipc.open_file(pa.memory_map(str(folder / STRINGS)))
    strings = StringColumns([reader.get_batch(i) for i in range(reader.num_record_batches)])
    if len(columns["num_frames"]) != manifest["rows"]:
        raise SampleIndexError(
            f"{folder}: samples.arrow has {len(columns['num_frames'])} rows, the manifest {manifest['rows']}"
        )
    return SampleTable(
        columns,
        strings,
        roots=manifest["roots"],
        sources=[s["file"] for s in manifest["sources"]],
        counts=manifest["counts"],
        origin=str(folder),
        folder=folder,
    )
