"""Encode a stage's data list into a latent + text-feature cache (megatron_video.data.feature_cache).

    torchrun --nproc_per_node N tools/build_feature_cache.py STAGE.yaml [overrides] --out CACHE_DIR \
        [--crop-epochs 1] [--latent-dtype float32] [--samples-per-shard 64] [--text-batch-size 64] [--verify]

The stage config gives the data rules, the VAE (`vae.*`) and the text encoders (`text.*`, `captions.*`);
the cache is valid for stages whose settings of those agree (training checks it). Rank r encodes
dataset indices r, r + N, ...; each writes its own shards, so ranks need no process group. Running
the same command again resumes: samples in complete shards are skipped, partial shards are deleted
and their samples encoded again (samples recorded as unreadable are not retried: delete their shard,
both .safetensors and .json, to retry them). Rank 0 writes index.json once every sample is in a
complete shard.
Without torchrun it runs as one rank. On CPU each rank uses cores / ranks threads unless
OMP_NUM_THREADS is set. Exit status: 0 done, 1 samples missing or --verify found
problems, 2 configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="stage config YAML (data, vae, text, captions)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.num_workers=4")
    p.add_argument("--out", default=None, help="cache folder (default: features.cache_dir of the config)")
    p.add_argument("--crop-epochs", type=int, default=None, help="temporal crops cached per video")
    p.add_argument("--latent-dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--samples-per-shard", type=int, default=None)
    p.add_argument("--text-batch-size", type=int, default=None)
    p.add_argument("--verify", action="store_true", help="rank 0: read every file back and check checksums")
    return p.parse_args(argv)


def feature_settings(cfg, args: argparse.Namespace):
    """The config's `features` section (defaults until it exists) with the command-line flags applied."""
    from megatron_video.data.config import FeatureCacheConfig

    base = cfg.features or FeatureCacheConfig()
    flags = {
        "cache_dir": args.out,
        "crop_epochs": args.crop_epochs,
        "latent_dtype": args.latent_dtype,
        "samples_per_shard": args.samples_per_shard,
        "text_batch_size": args.text_batch_size,
    }
    features = dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})
    features.validate()
    return features


def main(argv=None) -> int:
    from megatron_video.config import load_config
    from megatron_video.data.feature_cache.build import build_feature_cache, merge_index, wait_for_shards
    from megatron_video.data.feature_cache.read import FeatureCache
    from megatron_video.errors import ConfigError
    from megatron_video.platform.launch import launcher_env, select_device
    from megatron_video.training.stage import build_text_encoder, build_vae

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        features = feature_settings(cfg, args)
        if not features.cache_dir:
            raise ConfigError("give --out CACHE_DIR (or set features.cache_dir in the config)")
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    rank, world, local_rank, _, _ = launcher_env()
    device = select_device(cfg.runtime.device, local_rank)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    torch.manual_seed(cfg.training.seed)  # vae.checkpoint=null (tests): the same random VAE on every rank
    vae = build_vae(cfg.vae, device)
    text = build_text_encoder(cfg, device)
    try:
        stats = build_feature_cache(cfg, features, vae, text, rank=rank, world_size=world, progress=print)
    except ConfigError as e:  # the data side: data list, index, rules that leave no sample
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    print(
        f"rank {rank}: encoded {stats.encoded}, failed {stats.failed}, done earlier {stats.skipped}, "
        f"{stats.shards} shards in {stats.seconds:.1f} s",
        flush=True,
    )
    if rank != 0:
        return 0
    wait_for_shards(features.cache_dir, progress=print)
    index = merge_index(features.cache_dir)
    out = Path(features.cache_dir)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"index: {len(index['shard_of'])} samples in {len(index['shards'])} shards, {len(index['failed'])} failed, "
        f"{index['missing']} missing; {size / 2**20:.1f} MiB -> {out / 'index.json'}",
        flush=True,
    )
    status = 1 if index["missing"] else 0
    if args.verify and not index["missing"]:
        problems = FeatureCache(out).verify()
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"verify: {len(problems)} problems in {len(index['shards']) + 1} files")
        status = 1 if problems else status
    return status


if __name__ == "__main__":
    sys.exit(main())
