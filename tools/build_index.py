"""Build the memory-mapped sample index of a data list (megatron_video.data.index), once per corpus.

    python tools/build_index.py DATA_TXT OUT_DIR [--workers N] [--probe] [--no-check-files]
        [--chunk-mb 64] [--overwrite]
    torchrun --nnodes M --nproc_per_node 1 tools/build_index.py DATA_TXT OUT_DIR --workers 16 ...

Annotation files are streamed (.jsonl split into chunks at line starts, .json lists decoded one entry
at a time). Every media file is checked once (`--no-check-files` skips that), and with `--probe` opened
with PyAV / Pillow: fps and frame count fill what the annotation lacks, a contradicting resolution is
replaced by the file's, unreadable files are skipped. Without --probe only videos lacking fps or
num_frames are opened. Chunks go to `--workers` processes, and under torchrun (RANK / WORLD_SIZE) are
shared over ranks; rank 0 assembles the index once every chunk is done. A killed build run again
resumes from its finished chunks; OUT_DIR appears only when complete (built in OUT_DIR.partial).
Point stages at it with `data.index=OUT_DIR` (instead of data.data_list).

Exit status: 0 done, 2 configuration error (unreadable data list, invalid .json, an existing index).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_txt", help="data.txt: one '<media root>,<annotation .json/.jsonl>' per line")
    p.add_argument("out", help="index folder to write")
    p.add_argument("--workers", type=int, default=1, help="reader processes on this rank")
    p.add_argument("--probe", action="store_true", help="open every media file (fps, frames, size)")
    p.add_argument(
        "--check-files", action=argparse.BooleanOptionalAction, default=True, help="stat every media file"
    )
    p.add_argument("--chunk-mb", type=float, default=64.0, help="MiB of a .jsonl file per chunk")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index at OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_video.data.index.build import build_index
    from megatron_video.data.index.sources import BuildOptions
    from megatron_video.errors import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.workers < 1 or args.chunk_mb <= 0:
        print("configuration error: --workers must be >= 1 and --chunk-mb > 0", file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    options = BuildOptions(check_files=args.check_files, probe="all" if args.probe else "missing")
    start = time.perf_counter()
    try:
        manifest = build_index(
            args.data_txt,
            args.out,
            options,
            workers=args.workers,
            chunk_bytes=int(args.chunk_mb * 2**20),
            rank=rank,
            world_size=world,
            overwrite=args.overwrite,
            progress=None if args.quiet else (lambda msg: print(msg, flush=True)),
        )
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if manifest is not None:
        counts = manifest["counts"]
        print(
            f"{manifest['rows']} rows of {counts.get('entries', 0)} entries in {time.perf_counter() - start:.1f} s; "
            f"counts {json.dumps(counts, sort_keys=True)}; skip report {os.path.join(args.out, 'skipped.jsonl')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
