"""Data loading throughput: samples per second from a torch DataLoader over the demo data with 0, 1
and 2 worker processes, measured side by side in one run.

Every (loader, worker count) pair runs once per round, round-robin in a rotated order, so load from
other processes reaches each alike; the table gives medians over rounds. One run is one epoch over the
dataset through `build_dataloader` (bucket sampler, PyAV decoding, resize, collate). "first batch" is
the time from creating the iterator to the first batch (worker start-up included); "samples/s" and
"frames/s" count the batches after the first one, over the time after it (steady state).

    python benchmarks/data.py                          # builds the demo data in a temporary folder
    python benchmarks/data.py --data DIR/data.txt      # an existing data.txt (e.g. from tools/prepare_demo_data.py)
    python benchmarks/data.py --quick                  # 2 rounds: checks that the script works
    python benchmarks/data.py --json out.json          # also write every number as JSON

The loaders compared are listed by `loader_factories`; each is measured with every worker count.
Besides decoding alone they include the two training batch sources, decode + VAE/text encoding
(`EncodedBatches`) and the latent/text-feature cache (`CachedBatches`, over a cache built first with
`build_feature_cache`), with their ratios in a second table (`--no-cache` skips them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from megatron_video.data.config import DataConfig, SampleGeometry
from megatron_video.data.dataset import VideoTextDataset, build_dataloader, set_epoch
from megatron_video.data.sampler import MegabatchBucketSampler

LoaderFactory = Callable[[int], DataLoader]
"""Worker count -> a DataLoader over one epoch of the benchmark data."""


@dataclass
class Measurement:
    """One loader at one worker count: medians over rounds."""

    loader: str
    workers: int
    first_batch_s: float
    samples_per_s: float
    frames_per_s: float
    epoch_s: float
    samples: int
    """Samples per epoch (after the first batch, counted for the rates)."""


def decoded_video_loader(args: argparse.Namespace) -> LoaderFactory:
    """The data pipeline as training runs it: decode the planned frames, resize, normalise, collate."""
    cfg = DataConfig(
        data_list=str(args.data),
        num_frames=args.num_frames,
        min_num_frames=9,
        train_fps=24.0,
        drop_short_ratio=0.0,
        force_resolution=False,
        max_hxw=args.max_hxw,
        min_hxw=None,
        hw_stride=16,
        min_h_div_w_ratio=0.2,
        max_h_div_w_ratio=2.0,
        bucket_drop_threshold=0.0,
    )
    dataset = VideoTextDataset(cfg, SampleGeometry(micro_batch_size=args.batch_size))
    print(f"decode: {len(dataset)} samples in buckets {sorted(set(dataset.bucket_keys))}")

    def make(num_workers: int) -> DataLoader:
        return build_dataloader(dataset, dp_rank=0, dp_size=1, num_workers=num_workers)

    return make


def loader_factories(args: argparse.Namespace) -> dict[str, LoaderFactory]:
    """The loaders the benchmark compares, by name: decoding alone, and (unless --no-cache) the
    training batch sources: decode + VAE/text encoding vs reading the feature cache."""
    decode = decoded_video_loader(args)
    if args.no_cache:
        return {"decode": decode}
    return {"decode": decode, **feature_loaders(args, decode(0).dataset.cfg)}


# -- cached features vs decode + encode -------------------------------------------------------------
# "encode" is `EncodedBatches` (what training runs without a cache: decode in the loader's workers,
# VAE posterior sample and text encoding in the main process); "cached" is `CachedBatches` over a
# cache built here from the same data with `build_feature_cache`. Both read the same sampler order,
# so they produce the same batches (checked once, below); their ratio is the time a cache saves.

CACHE_VAES = {
    "tiny": dict(flavor="tiny"),
    "wfvae-m-quarter": dict(
        flavor="wfvae_8x8x8_d32",
        base_channels=40,
        encoder_energy_flow_hidden_size=32,
        decoder_energy_flow_hidden_size=32,
    ),
}
"""VAEs the cache comparison can encode with (random weights: speed does not depend on them). The
released v1.5 WF-VAE-M (8x8x8, 32 latent channels) at a quarter of its width is the default, as in
benchmarks/vae.py; --quick uses the tiny one."""


class _SourceEpochs:
    """A training BatchSource read one epoch at a time through the DataLoader surface `time_epoch`
    uses: `set_epoch` (as `batch_sampler` and `dataset`) positions it at the epoch's first micro-batch."""

    def __init__(self, source, sampler: MegabatchBucketSampler, stride_t: int):
        self.source, self.sampler, self.stride_t = source, sampler, stride_t
        self.batch_sampler = self.dataset = self
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.source.load_state_dict({"consumed_samples": self.epoch * self.sampler.samples_per_epoch})
        for _ in range(self.sampler.num_megabatches):
            batch = self.source.next_batch()
            b, _, t_lat = batch.x0_BCTHW.shape[:3]
            yield {"train_batch": batch, "samples": b, "frames": 1 + (t_lat - 1) * self.stride_t}


def batch_size_and_frames(batch) -> tuple[int, int]:
    """(samples, pixel frames per sample) of a decoded batch or of a `_SourceEpochs` batch."""
    if "video" in batch:
        return batch["video"].shape[0], batch["video"].shape[2]
    return batch["samples"], batch["frames"]


def feature_loaders(args: argparse.Namespace, data_cfg: DataConfig) -> dict[str, LoaderFactory]:
    """ "encode" and "cached" batch sources over the decode benchmark's data; builds the cache first."""
    import atexit
    import copy
    import shutil

    from megatron_video.config.loader import to_dict
    from megatron_video.config.schema import build_config
    from megatron_video.data.batches import EncodedBatches
    from megatron_video.data.config import FeatureCacheConfig
    from megatron_video.data.feature_cache.build import build_feature_cache, merge_index
    from megatron_video.data.feature_cache.read import CachedBatches, CachedFeatureDataset, FeatureCache
    from megatron_video.models.text.encoders import TextEncoderPair
    from megatron_video.models.wfvae.config import WFVAEConfig
    from megatron_video.models.wfvae.model import WFVAE
    from megatron_video.testing.vae import randomize_vae

    vae_name = args.cache_vae or ("tiny" if args.quick else "wfvae-m-quarter")
    vae_kw = dict(CACHE_VAES[vae_name])
    flavor = vae_kw.pop("flavor")
    vae = WFVAE(WFVAEConfig.from_flavor(flavor, **vae_kw))
    randomize_vae(vae, seed=0)
    vae.eval().requires_grad_(False)
    data = to_dict(data_cfg)
    cfg = build_config(
        {
            "model": {"flavor": "tiny"},
            "vae": {"flavor": flavor, "checkpoint": None},
            "text": {"context": {"kind": "minilm", "max_length": args.text_length}},
            "data": data,
            "training": {"micro_batch_size": args.batch_size, "global_batch_size": args.batch_size},
        }
    )
    text = TextEncoderPair.from_config(cfg.text)
    cache_dir = Path(tempfile.mkdtemp(prefix="feature_cache_"))
    atexit.register(shutil.rmtree, cache_dir, True)
    features = FeatureCacheConfig(cache_dir=str(cache_dir))
    start = time.perf_counter()
    stats = build_feature_cache(cfg, features, vae, text)
    merge_index(cache_dir)
    size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    weights = sum(p.numel() * p.element_size() for m in (vae, text) for p in m.parameters())
    print(
        f"feature cache ({vae_name} VAE, MiniLM {args.text_length} tokens): {stats.encoded} samples encoded in "
        f"{time.perf_counter() - start:.1f} s, {size / 2**20:.2f} MiB on disk; training from it loads no "
        f"encoder weights ({weights / 2**20:.1f} MiB here)"
    )
    cache = FeatureCache(cache_dir)
    # the batch sources roll over epochs by consumed samples; this sampler says how many an epoch has
    sampler = MegabatchBucketSampler(
        cache.bucket_keys, batch_size=args.batch_size, dp_rank=0, dp_size=1, drop_threshold=0
    )

    def stage_cfg(num_workers: int):
        c = copy.deepcopy(cfg)
        c.data.num_workers = num_workers
        return c

    def encoded(num_workers: int) -> _SourceEpochs:
        c = stage_cfg(num_workers)
        return _SourceEpochs(
            EncodedBatches(c, VideoTextDataset(c.data, c.sample_geometry), vae, text, 0, 1),
            sampler,
            vae.temporal_stride,
        )

    def cached(num_workers: int) -> _SourceEpochs:
        c = stage_cfg(num_workers)
        dataset = CachedFeatureDataset(cache, c.data, c.sample_geometry, c.captions, c.training.seed)
        return _SourceEpochs(CachedBatches(c, dataset, 0, 1), sampler, vae.temporal_stride)

    a, b = next(iter(encoded(0))), next(iter(cached(0)))
    diff = (a["train_batch"].x0_BCTHW - b["train_batch"].x0_BCTHW).abs().max().item()
    print(
        f"same batches: first micro-batch latents differ by at most {diff:.1e} (per-clip vs batched VAE calls)"
    )
    return {"encode": encoded, "cached": cached}


def print_cache_ratios(rows: list[Measurement]) -> None:
    """Cached vs decode + encode (and vs decoding alone), per worker count, from the medians."""
    by = {(m.loader, m.workers): m for m in rows}
    workers = sorted({w for name, w in by if name == "cached"})
    if not workers:
        return
    print()
    print(
        f"{'workers':>8}{'cached/encode samples/s':>25}{'encode/cached epoch s':>23}{'cached/decode samples/s':>25}"
    )
    for w in workers:
        c, e, d = by[("cached", w)], by[("encode", w)], by[("decode", w)]
        print(
            f"{w:>8}{c.samples_per_s / e.samples_per_s:>25.1f}{e.epoch_s / c.epoch_s:>23.1f}"
            f"{c.samples_per_s / d.samples_per_s:>25.1f}"
        )


def time_epoch(loader: DataLoader, epoch: int) -> tuple[float, float, int, int]:
    """(seconds to the first batch, seconds after it, samples and frames after it) for one epoch."""
    set_epoch(loader, epoch)
    start = time.perf_counter()
    first = None
    samples = frames = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
            continue
        b, t = batch_size_and_frames(batch)
        samples += b
        frames += b * t
    end = time.perf_counter()
    return first - start, end - first, samples, frames


def run(factories: dict[str, LoaderFactory], workers: list[int], rounds: int) -> list[Measurement]:
    """Every (loader, workers) pair once per round, rotating the order each round."""
    pairs = [(name, w) for name in factories for w in workers]
    loaders = {(name, w): factories[name](w) for name, w in pairs}
    times: dict[tuple[str, int], list[tuple[float, float, int, int]]] = {p: [] for p in pairs}
    for r in range(rounds + 1):  # round 0 warms up page cache and imports; not counted
        order = pairs[r % len(pairs) :] + pairs[: r % len(pairs)]
        for pair in order:
            result = time_epoch(loaders[pair], r)
            if r > 0:
                times[pair].append(result)
        if r > 0:
            print(f"  round {r}/{rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    out = []
    for name, w in pairs:
        runs = times[(name, w)]
        out.append(
            Measurement(
                loader=name,
                workers=w,
                first_batch_s=statistics.median(t[0] for t in runs),
                samples_per_s=statistics.median(t[2] / t[1] for t in runs),
                frames_per_s=statistics.median(t[3] / t[1] for t in runs),
                epoch_s=statistics.median(t[0] + t[1] for t in runs),
                samples=runs[0][2],
            )
        )
    return out


def print_table(rows: list[Measurement]) -> None:
    print(f"{'loader':<10}{'workers':>8}{'first batch s':>15}{'samples/s':>11}{'frames/s':>10}{'epoch s':>9}")
    for m in rows:
        print(
            f"{m.loader:<10}{m.workers:>8}{m.first_batch_s:>15.3f}{m.samples_per_s:>11.1f}"
            f"{m.frames_per_s:>10.1f}{m.epoch_s:>9.2f}"
        )


def demo_data(folder: Path) -> Path:
    """Build the demo dataset with tools/prepare_demo_data.py into `folder`; returns its data.txt."""
    path = Path(__file__).parents[1] / "tools" / "prepare_demo_data.py"
    spec = importlib.util.spec_from_file_location("prepare_demo_data", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.prepare_demo_data(folder)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data.txt; default: build the demo data")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed epochs per (loader, workers), after one warm-up"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-frames", type=int, default=33, help="target frames per video sample")
    parser.add_argument(
        "--max-hxw", type=int, default=128 * 224, help="largest sample area (Min-Max strategy)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--no-cache", action="store_true", help="skip the feature-cache comparison")
    parser.add_argument(
        "--cache-vae", choices=sorted(CACHE_VAES), default=None, help="default: tiny with --quick"
    )
    parser.add_argument(
        "--text-length", type=int, default=128, help="MiniLM tokens per caption (cache comparison)"
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds: checks that the script works")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data = demo_data(Path(tmp) / "demo")
            print(f"built the demo data in {time.perf_counter() - start:.1f} s")
        factories = loader_factories(args)
        print(
            f"torch {torch.__version__}, main-process threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
            f"load average at start {os.getloadavg()[0]:.1f}"
        )
        print(
            f"data: {args.data}; batch {args.batch_size}, {args.num_frames} frames, max area {args.max_hxw}; "
            f"{args.rounds} timed epochs per pair after one warm-up"
        )
        rows = run(factories, args.workers, args.rounds)
    print()
    print_table(rows)
    print_cache_ratios(rows)
    print(f"Elapsed {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(args={k: str(v) for k, v in vars(args).items()}, rows=[asdict(r) for r in rows]),
                f,
                indent=1,
            )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
