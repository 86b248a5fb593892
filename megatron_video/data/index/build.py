"""Building a sample index: in memory for a small data list, or into a folder for a real corpus.

Both go through `sources.read_chunk`, chunk by chunk in data-list order, so a folder index and the
in-memory table of the same list hold the same rows.

Folder builds (`build_index`) run in `<out>.partial/`: plan.json fixes the chunks (and the source
files' sizes and mtimes, so a changed file restarts the build); each chunk is written to
parts/NNNNNN.arrow with its skip report, then a done marker. Chunks are shared over launcher ranks
(RANK / WORLD_SIZE: rank r takes chunks r, r + W, ...) and, inside a rank, over `workers` processes.
A killed build started again skips the chunks with a done marker. When every marker exists, rank 0
concatenates the parts into samples.arrow / strings.arrow / skipped.jsonl, writes manifest.json
last and renames the folder to `<out>`; other ranks return once their share is done.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from megatron_video.data.index.format import (
    FORMAT_VERSION,
    MANIFEST,
    NUMERIC_COLUMNS,
    PARTIAL_SUFFIX,
    SAMPLES,
    SKIPPED,
    STRINGS,
    SampleIndexError,
    atomic_write_json,
    read_manifest,
)
from megatron_video.data.index.read import SampleTable, StringColumns
from megatron_video.data.index.sources import (
    BuildOptions,
    Chunk,
    ChunkResult,
    data_list_sources,
    plan_chunks,
    read_chunk,
)

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 << 20
"""Bytes of a .jsonl file per chunk (the unit of parallel work and of resume)."""

MAX_SKIPS_IN_MEMORY = 1000
"""Skip records an in-memory table keeps (all are counted)."""


def _string_batch(result: ChunkResult) -> pa.RecordBatch:
    return pa.record_batch(
        [pa.array(result.paths, pa.string()), pa.array(result.captions, pa.list_(pa.string()))],
        names=["path", "captions"],
    )


def _sources_record(sources: list[tuple[Path, Path]]) -> tuple[list[str], list[str], list[dict]]:
    roots = [str(root) for root, _ in sources]
    files = []
    for _, annotation in sources:
        st = annotation.stat()
        files.append({"file": str(annotation), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return roots, [str(a) for _, a in sources], files


def table_from_data_list(
    data_txt: str | os.PathLike, options: BuildOptions, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> SampleTable:
    """The sample table of a data list, built in this process (for lists small enough to read at start)."""
    sources = data_list_sources(data_txt)
    counts: Counter = Counter()
    columns: list[dict[str, np.ndarray]] = []
    strings: list[pa.RecordBatch] = []
    skipped: list[dict] = []
    for chunk in plan_chunks([a for _, a in sources], chunk_bytes):
        result = read_chunk(sources, chunk, options)
        counts.update(result.counts)
        columns.append(result.columns)
        strings.append(_string_batch(result))
        skipped.extend(result.skipped[: MAX_SKIPS_IN_MEMORY - len(skipped)])
    numeric = {name: np.concatenate([c[name] for c in columns]) for name in NUMERIC_COLUMNS}
    roots, files, _ = _sources_record(sources)
    return SampleTable(
        numeric,
        StringColumns(strings),
        roots=roots,
        sources=files,
        counts=counts,
        skipped=skipped,
        origin=str(data_txt),
    )


# -- folder builds -----------------------------------------------------------------------------------


def _part(partial: Path, k: int, suffix: str) -> Path:
    return partial / "parts" / f"{k:06d}{suffix}"


def _run_chunk(args: tuple) -> tuple[int, dict]:
    """Worker: read chunk k and write its part, skip report and done marker (in that order)."""
    partial, sources, k, chunk, options = args
    start = time.perf_counter()
    result = read_chunk(sources, chunk, options)
    table = pa.Table.from_batches(
        [
            pa.record_batch(
                [pa.array(result.columns[n]) for n in NUMERIC_COLUMNS] + list(_string_batch(result).columns),
                names=[*NUMERIC_COLUMNS, "path", "captions"],
            )
        ]
    )
    arrow = _part(partial, k, ".arrow")
    tmp = arrow.with_suffix(".arrow.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, arrow)
    skipped = _part(partial, k, ".skipped.jsonl")
    skipped.write_text(
        "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result.skipped), encoding="utf-8"
    )
    done = {"rows": len(result.paths), "counts": dict(result.counts), "seconds": time.perf_counter() - start}
    atomic_write_json(_part(partial, k, ".done.json"), done)
    return k, done


def _plan(partial: Path, data_txt: Path, options: BuildOptions, chunk_bytes: int, rank: int) -> dict:
    """plan.json of the partial folder: written by rank 0 (kept when it matches), read by the others."""
    sources = data_list_sources(data_txt)
    roots, files, records = _sources_record(sources)
    wanted = {
        "format_version": FORMAT_VERSION,
        "data_list": str(Path(data_txt).resolve()),
        "roots": roots,
        "sources": records,
        "options": options.to_dict(),
        "chunk_bytes": chunk_bytes,
    }
    plan_path = partial / "plan.json"
    if rank != 0:
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            if plan_path.is_file():
                plan = json.loads(plan_path.read_text(encoding="utf-8"))
                if {k: plan.get(k) for k in wanted} == wanted:
                    return plan
            time.sleep(1.0)
        raise SampleIndexError(f"{plan_path}: rank 0 did not write a matching build plan within an hour")
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        if {k: plan.get(k) for k in wanted} == wanted:
            return plan
        logger.warning(
            "%s: the data list, its files or the options changed; starting the build again", partial
        )
        shutil.rmtree(partial)
    (partial / "parts").mkdir(parents=True, exist_ok=True)
    chunks = plan_chunks([a for _, a in sources], chunk_bytes)
    plan = {**wanted, "chunks": [asdict(c) for c in chunks], "files": files}
    atomic_write_json(plan_path, plan)
    return plan


def build_index(
    data_txt: str | os.PathLike,
    out: str | os.PathLike,
    options: BuildOptions,
    *,
    workers: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    rank: int = 0,
    world_size: int = 1,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    wait_timeout_s: float = 24 * 3600,
) -> dict[str, Any] | None:
    """Build (or resume) the index of `data_txt` into folder `out`; returns the manifest on rank 0."""
    out = Path(out)
    say = progress or (lambda _msg: None)
    if (out / MANIFEST).is_file():
        if not overwrite:
            raise SampleIndexError(f"{out} already holds an index; pass --overwrite to rebuild it")
        if rank == 0:
            shutil.rmtree(out)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if rank == 0:
        partial.mkdir(parents=True, exist_ok=True)
    plan = _plan(partial, Path(data_txt), options, chunk_bytes, rank)
    sources = [(Path(r), Path(s["file"])) for r, s in zip(plan["roots"], plan["sources"])]
    chunks = [Chunk(**c) for c in plan["chunks"]]
    mine = [k for k in range(rank, len(chunks), world_size) if not _part(partial, k, ".done.json").is_file()]
    say(
        f"rank {rank}: {len(mine)} of {len(chunks)} chunks to read ({len(chunks) - len(mine)} done earlier or by other ranks)"
    )
    start = time.perf_counter()
    tasks = [(partial, sources, k, chunks[k], options) for k in mine]
    rows = 0
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for n, (_, done) in enumerate(pool.imap_unordered(_run_chunk, tasks), start=1):
                rows += done["rows"]
                say(
                    f"rank {rank}: chunk {n}/{len(tasks)} done, {rows} rows, {time.perf_counter() - start:.1f} s"
                )
    else:
        for n, task in enumerate(tasks, start=1):
            rows += _run_chunk(task)[1]["rows"]
            say(f"rank {rank}: chunk {n}/{len(tasks)} done, {rows} rows, {time.perf_counter() - start:.1f} s")
    if rank != 0:
        return None
    deadline = time.monotonic() + wait_timeout_s
    while not all(_part(partial, k, ".done.json").is_file() for k in range(len(chunks))):
        if time.monotonic() > deadline:
            raise SampleIndexError(f"{partial}: other ranks did not finish their chunks in time")
        time.sleep(2.0)
    manifest = _finalise(partial, out, plan, chunks)
    say(f"index of {manifest['rows']} rows written to {out} in {time.perf_counter() - start:.1f} s")
    return manifest


def _finalise(partial: Path, out: Path, plan: dict, chunks: list[Chunk]) -> dict[str, Any]:
    """Concatenate the parts, write manifest.json last, rename `<out>.partial` to `<out>`."""
    counts: Counter = Counter()
    seconds = 0.0
    numeric: dict[str, list[np.ndarray]] = {name: [] for name in NUMERIC_COLUMNS}
    strings_path = partial / STRINGS
    string_schema = pa.schema([("path", pa.string()), ("captions", pa.list_(pa.string()))])
    with (
        pa.OSFile(str(strings_path), "wb") as sink,
        pa.ipc.new_file(sink, string_schema) as strings,
        open(partial / SKIPPED, "w", encoding="utf-8") as skipped,
    ):
        for k in range(len(chunks)):
            done = json.loads(_part(partial, k, ".done.json").read_text(encoding="utf-8"))
            counts.update(done["counts"])
            seconds += done["seconds"]
            with pa.memory_map(str(_part(partial, k, ".arrow"))) as source:
                part = pa.ipc.open_file(source).read_all().combine_chunks()
            for name in NUMERIC_COLUMNS:
                numeric[name].append(part.column(name).to_numpy().copy())
            strings.write_batch(
                pa.record_batch(
                    [part.column("path").combine_chunks(), part.column("captions").combine_chunks()],
                    schema=string_schema,
                )
            )
            skipped.write(_part(partial, k, ".skipped.jsonl").read_text(encoding="utf-8"))
    arrays = {name: np.concatenate(numeric[name]) for name in NUMERIC_COLUMNS}
    rows = len(arrays["num_frames"])
    batch = pa.record_batch([pa.array(arrays[n]) for n in NUMERIC_COLUMNS], names=list(NUMERIC_COLUMNS))
    with pa.OSFile(str(partial / SAMPLES), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    del arrays, numeric, batch
    manifest = {
        "format_version": FORMAT_VERSION,
        "rows": rows,
        "data_list": plan["data_list"],
        "roots": plan["roots"],
        "sources": plan["sources"],
        "options": plan["options"],
        "counts": dict(sorted(counts.items())),
        "columns": {**NUMERIC_COLUMNS, "path": "string", "captions": "list<string>"},
        "chunks": len(chunks),
        "build_cpu_seconds": round(seconds, 3),
        "bytes": {name: (partial / name).stat().st_size for name in (SAMPLES, STRINGS, SKIPPED)},
    }
    atomic_write_json(partial / MANIFEST, manifest)
    shutil.rmtree(partial / "parts")
    (partial / "plan.json").unlink()
    os.replace(partial, out)
    read_manifest(out)
    return manifest


def table_from_entries(entries: list, origin: str = "<entries>") -> SampleTable:
    """The table of already-parsed `annotations.Entry` objects (paths as given, in order)."""
    from megatron_video.data.index.sources import ChunkReader

    reader = ChunkReader(Path(origin), 0, Path(""), BuildOptions(check_files=False, probe="none"))
    for position, entry in enumerate(entries):
        reader.counts["entries"] += 1
        reader._append(entry, position, 0)
    result = reader.result()
    return SampleTable(
        result.columns,
        StringColumns([_string_batch(result)]),
        roots=[""],
        sources=[origin],
        counts=result.counts,
        origin=origin,
    )
