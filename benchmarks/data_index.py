"""Start-up of the data pipeline at corpus scale: the memory-mapped sample index against the JSON path.

    python benchmarks/data_index.py --records 10000000 --workdir /tmp/idx_bench [--json-records 1000000]

1. writes synthetic Open-Sora-Plan-style annotations (.json lists of 500k entries: captions of
   realistic length, mixed resolutions, frame counts, fps, some cuts and crops, 20 % images);
2. builds the index with tools/build_index.py (2 workers, --no-check-files: the media do not exist);
3. starts `--procs` processes together on the index, each: open -> sample plans -> epoch plan of the
   bucket sampler for DP=256, micro-batch 2, global batch 1024; reports wall and CPU seconds (CPU
   seconds are what an unloaded machine's wall time would be, less page-fault waits) and memory
   after start-up, with every process still alive: private memory (psutil USS: pages no other process
   maps), anonymous memory (heap and arrays, from /proc/self/smaps_rollup) and the peak RSS;
4. the same with the JSON path (read every annotation into Python objects, scalar rules, string
   bucket keys) at `--json-records`, and the index path at that size, side by side.
Prints one JSON object per measurement and a summary table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "a",
    "the",
    "camera",
    "slowly",
    "pans",
    "across",
    "wide",
    "green",
    "valley",
    "with",
    "river",
    "flowing",
    "between",
    "tall",
    "mountains",
    "under",
    "bright",
    "blue",
    "sky",
    "white",
    "clouds",
    "drift",
    "woman",
    "in",
    "red",
    "dress",
    "walks",
    "along",
    "crowded",
    "city",
    "street",
    "at",
    "night",
    "neon",
    "lights",
    "reflect",
    "on",
    "wet",
    "pavement",
    "close-up",
    "of",
    "hands",
    "kneading",
    "dough",
    "on",
    "wooden",
    "table",
    "flour",
    "dust",
    "sunlight",
    "streams",
    "through",
    "window",
    "aerial",
    "view",
    "of",
    "coastline",
    "waves",
    "crash",
    "against",
    "rocky",
    "cliffs",
    "seagulls",
    "fly",
    "overhead",
]
SIZES = [
    (720, 1280),
    (1080, 1920),
    (576, 1024),
    (480, 854),
    (1088, 1920),
    (368, 640),
    (720, 960),
    (2160, 3840),
]
FPS = [23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 60.0]


def caption_pool(rng: np.random.Generator, n: int = 20000) -> list[str]:
    """JSON-quoted captions of 20-250 words (mean ~90, as dense video captions are)."""
    lengths = np.clip(rng.normal(90, 40, n), 20, 250).astype(int)
    return [json.dumps(" ".join(rng.choice(WORDS, k)) + ".") for k in lengths]


def write_annotations(out: Path, records: int, per_file: int = 500_000, seed: int = 0) -> Path:
    """Synthetic annotation files + data.txt; returns data.txt (written once per size)."""
    out.mkdir(parents=True, exist_ok=True)
    data_txt = out / "data.txt"
    if data_txt.is_file():
        return data_txt
    rng = np.random.default_rng(seed)
    pool = caption_pool(rng)
    lines = []
    for f, start in enumerate(range(0, records, per_file)):
        n = min(per_file, records - start)
        size = rng.integers(len(SIZES), size=n)
        image = rng.random(n) < 0.2
        frames = rng.integers(40, 1200, n)
        fps = rng.integers(len(FPS), size=n)
        cut = rng.random(n) < 0.3
        caps = rng.integers(len(pool), size=n)
        aes = rng.normal(5.0, 0.8, n)
        name = f"part{f:04d}.json"
        with open(out / name, "w", encoding="utf-8") as fh:
            fh.write("[\n")
            rows = []
            for k in range(n):
                h, w = SIZES[size[k]]
                i = start + k
                head = f'"cap": {pool[caps[k]]}, "resolution": {{"height": {h}, "width": {w}}}, "aesthetic": {aes[k]:.3f}'
                if image[k]:
                    rows.append(f'{{"path": "images/{i:09d}.jpg", {head}}}')
                    continue
                if cut[k]:
                    span = f'"cut": [{int(frames[k] // 3)}, {int(frames[k])}]'
                else:
                    span = f'"num_frames": {int(frames[k])}'
                rows.append(
                    f'{{"path": "videos/{i // 1000:06d}/{i:09d}.mp4", {head}, "fps": {FPS[fps[k]]}, {span}}}'
                )
                if len(rows) == 10000:
                    fh.write(",\n".join(rows) + (",\n" if k < n - 1 else "\n"))
                    rows = []
            if rows:
                fh.write(",\n".join(rows) + "\n")
            fh.write("]\n")
        lines.append(f"media,{name}")
    data_txt.write_text("\n".join(lines) + "\n")
    return data_txt


def _config():
    from megatron_video.data.config import DataConfig, SampleGeometry

    return DataConfig(), SampleGeometry(vae_stride_t=8, vae_stride_hw=8, micro_batch_size=2)


def _startup(kind: str, source: str, barrier, queue) -> None:
    """One 'rank': open -> plans -> epoch plan; reports seconds and memory."""
    import resource

    import psutil

    from megatron_video.data.annotations import load_annotations
    from megatron_video.data.dataset import plan_samples
    from megatron_video.data.index.plans import plan_table
    from megatron_video.data.index.read import open_index
    from megatron_video.data.sampler import BucketIds, MegabatchBucketSampler

    cfg, geometry = _config()
    imported_mb = psutil.Process().memory_full_info().uss / 2**20
    barrier.wait()
    start, cpu_start = time.perf_counter(), time.process_time()
    if kind == "index":
        table = open_index(source)
        plans = plan_table(table, cfg, geometry)
        buckets = BucketIds(plans.bucket_ids, plans.bucket_names)
        samples = len(plans)
    else:
        entries, _ = load_annotations(source, check_files_exist=False)
        plan_list, _ = plan_samples(entries, cfg, geometry)
        buckets = [p.bucket for p in plan_list]
        samples = len(plan_list)
    opened = time.perf_counter()
    sampler = MegabatchBucketSampler(
        buckets, batch_size=2, dp_rank=0, dp_size=256, seed=cfg.seed, global_batch_size=1024
    )
    plan = sampler.plan(0)
    done, cpu_done = time.perf_counter(), time.process_time()
    barrier.wait()  # every process is done and alive: pages of the shared map count as shared
    info = psutil.Process().memory_full_info()
    queue.put(
        {
            "kind": kind,
            "samples": samples,
            "micro_batches_per_rank": int(plan.batches.shape[0]),
            "plans_s": round(opened - start, 2),
            "startup_s": round(done - start, 2),
            "startup_cpu_s": round(cpu_done - cpu_start, 2),
            "private_mb": round(info.uss / 2**20, 1),
            "anonymous_mb": round(_anonymous_kb() / 1024, 1),
            "private_after_imports_mb": round(imported_mb, 1),
            "rss_mb": round(info.rss / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )
    barrier.wait()  # stay mapped until every process has measured


def _anonymous_kb() -> int:
    """Anonymous memory of this process (heap and numpy arrays; not the page cache of mapped files)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    return 0


def measure(kind: str, source: str, procs: int) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_startup, args=(kind, source, barrier, queue)) for _ in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return results


def build(data_txt: Path, out: Path, workers: int) -> dict:
    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        return {"rows": manifest["rows"], "build_s": manifest.get("bench_build_s"), "reused": True}
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/build_index.py"),
            str(data_txt),
            str(out),
            "--workers",
            str(workers),
            "--no-check-files",
            "--quiet",
        ],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bench_build_s"] = round(seconds, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {"rows": manifest["rows"], "build_s": round(seconds, 1), "bytes": manifest["bytes"]}


def tile_index(source: Path, out: Path, times: int) -> None:
    """An index of `times` x the rows of `source` (its rows repeated): the start-up measurement at a
    size whose build does not fit the time at hand. Start-up cost depends on the row count and the
    value distribution, which tiling keeps."""
    import pyarrow as pa

    if (out / "manifest.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    samples = pa.ipc.open_file(pa.memory_map(str(source / "samples.arrow"))).read_all().combine_chunks()
    tiled = pa.concat_tables([samples] * times).combine_chunks()
    with pa.OSFile(str(out / "samples.arrow"), "wb") as sink, pa.ipc.new_file(sink, tiled.schema) as writer:
        writer.write_table(tiled, max_chunksize=len(tiled))
    reader = pa.ipc.open_file(pa.memory_map(str(source / "strings.arrow")))
    with pa.OSFile(str(out / "strings.arrow"), "wb") as sink, pa.ipc.new_file(sink, reader.schema) as writer:
        for _ in range(times):
            for i in range(reader.num_record_batches):
                writer.write_batch(reader.get_batch(i))
    (out / "skipped.jsonl").write_text("")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["rows"] = len(tiled)
    manifest["tiled_from"] = {"index": str(source), "times": times}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=10_000_000)
    p.add_argument(
        "--json-records", type=int, default=1_000_000, help="size of the side-by-side run (0: skip)"
    )
    p.add_argument("--workdir", default="/tmp/data_index_bench")
    p.add_argument("--workers", type=int, default=2, help="build processes")
    p.add_argument("--skip-json", action="store_true", help="measure only the index path")
    p.add_argument("--procs", type=int, default=2, help="processes started together on one index")
    p.add_argument(
        "--tile", type=int, default=0,
        help="also measure start-up on an index of tile x --records rows made by repeating the built one",
    )  # fmt: skip
    args = p.parse_args()
    work = Path(args.workdir)
    sizes = [args.records] + ([args.json_records] if args.json_records else [])
    for n in dict.fromkeys(sizes):
        t = time.perf_counter()
        data_txt = write_annotations(work / f"anno_{n}", n)
        annotation_bytes = sum(f.stat().st_size for f in data_txt.parent.glob("*.json"))
        print(
            json.dumps(
                {
                    "records": n,
                    "annotation_mb": round(annotation_bytes / 2**20),
                    "write_s": round(time.perf_counter() - t, 1),
                }
            ),
            flush=True,
        )
        built = build(data_txt, work / f"index_{n}", args.workers)
        print(json.dumps({"records": n, **built}), flush=True)
        for r in measure("index", str(work / f"index_{n}"), args.procs):
            print(json.dumps({"records": n, **r}), flush=True)
        if n == args.json_records and not args.skip_json:
            for r in measure("json", str(data_txt), args.procs):
                print(json.dumps({"records": n, **r}), flush=True)
    if args.tile:
        tiled = work / f"index_{args.records}_x{args.tile}"
        tile_index(work / f"index_{args.records}", tiled, args.tile)
        for r in measure("index", str(tiled), args.procs):
            print(json.dumps({"records": args.records * args.tile, "tiled": True, **r}), flush=True)


if __name__ == "__main__":
    main()
