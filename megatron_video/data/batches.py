"""Micro-batches for the objective: decoded videos + captions -> latents and model conditions.

The frozen encoders run here (no gradients): the VAE maps videos (and, for I2V, the masked
videos) to normalised latents, the text encoder(s) map the processed captions to token states
and a pooled vector. Every random choice of a sample (caption pick, CFG dropout, aesthetic
phrase, I2V mask type, condition noise, posterior sample) draws from a generator keyed by the
sample's dataset index and the epoch, so a resumed run makes the same choices.

Encoder data parallelism (Open-Sora-Plan v1.5's `enable_encoder_dp`): the TP x CP ranks of one
replica all consume the same micro-batches, so instead of each encoding every one of them, the g
ranks of that group take the next g micro-batches, each loads and encodes one, and the results
are exchanged; the next g steps are then served from that queue. Per-sample keyed randomness
makes the result identical to encoding everything everywhere.

The batch types every batch source shares live here too: `TrainBatch` (what the objective gets),
`BatchSource` (what the trainer pulls from), and the keyed generators (`sample_generator` for a
sample's data-side draws, `step_generators` for the objective's sigma and noise).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from megatron_video.config.schema import ExperimentConfig
from megatron_video.data.collate import collate_samples
from megatron_video.data.dataset import ResumableLoader, VideoTextDataset
from megatron_video.data.i2v_masks import I2VMasker, compress_mask
from megatron_video.data.sampler import MegabatchBucketSampler
from megatron_video.data.text import CaptionProcessor
from megatron_video.models.text.encoders import CaptionEmbeddingCache, TextEmbeddings, TextEncoderPair


@dataclass
class TrainBatch:
    """One micro-batch ready for the objective."""

    x0_BCTHW: torch.Tensor
    """Clean (normalised) latents."""

    cond: dict[str, torch.Tensor]
    """Model keyword inputs besides the noisy latents and timesteps."""

    loss_mask_BTHW: torch.Tensor | None = None
    """Latent positions that count in the loss (None: all)."""


class BatchSource(Protocol):
    """Yields this data-parallel rank's micro-batches and can resume its position."""

    def next_batch(self) -> TrainBatch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class BatchStats:
    """What a batch source observed since the last `take()`: samples that failed to load and were
    replaced (reported by the DataLoader workers through the batches), seconds waiting for loaded
    batches, and seconds in the frozen encoders."""

    def __init__(self):
        self.values: Counter = Counter()

    def loaded(self, raw: dict, wait_s: float) -> None:
        self.values["load_failures"] += len(raw.get("load_failures") or [])
        self.values["data_wait_s"] += wait_s

    def encoded(self, seconds: float) -> None:
        self.values["encode_s"] += seconds

    def take(self) -> dict[str, float]:
        values, self.values = dict(self.values), Counter()
        return values


def check_replica_indices(indices: Sequence[int], group, failures: Sequence[str] = ()) -> None:
    """Raise when the ranks of `group` (the TP x CP ranks of one replica, which must train on the same
    micro-batch) loaded different dataset indices: a load that failed on some ranks only (a time-out,
    a flaky file system) made them pick different replacements."""
    if group is None or dist.get_world_size(group) == 1:
        return
    mine = torch.tensor([len(indices), *indices], dtype=torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    if any(not torch.equal(g, mine) for g in gathered):
        ranks = dist.get_process_group_ranks(group)
        seen = "; ".join(f"rank {r}: {g[1:].tolist()}" for r, g in zip(ranks, gathered))
        raise RuntimeError(
            "ranks of one model replica (tensor / context parallel) loaded different samples for the same "
            f"micro-batch ({seen}). A file failed to load on some of them only (time-out or flaky storage); "
            "this rank's failures: " + (" | ".join(failures) or "none")
        )


CAPTION_DRAWS, POSTERIOR_NOISE, I2V_MASK_DRAWS, CONDITION_NOISE, MASKED_POSTERIOR = 1, 2, 3, 4, 5
"""The `salt` of each kind of a sample's random draws: caption choice / notice / CFG dropout, the
posterior sample of its latent, the I2V mask type and kept frames, the condition noise, and the
masked video's latent (a mean: never drawn). Online encoding and the feature cache key by these."""


def sample_generator(seed: int, epoch: int, index: int, salt: int) -> torch.Generator:
    """Generator for one sample's random choices of one kind (`salt`, one of the constants above)."""
    return torch.Generator().manual_seed(((seed * 7_919 + epoch) * 1_000_003 + index) * 31 + salt)


def step_generators(seed: int, step: int, positions: range) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, step, position in the global batch).

    Every TP / CP / PP rank of a replica draws the same noise and sigma, and the draws do not
    depend on how the global batch is split into micro-batches and data-parallel ranks.
    """
    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + p) for p in positions]


def posterior_latents(
    mean_BZTHW: torch.Tensor,
    std_BZTHW: torch.Tensor,
    seed: int,
    epoch: int,
    indices: Sequence[int],
    salt: int,
    sample: bool,
    shift,
    scale,
) -> torch.Tensor:
    """Normalised latents `(z - shift) * scale` of a VAE posterior: z = mean, or a posterior sample
    mean + std * noise with each sample's noise from `sample_generator(seed, epoch, index, salt)`.
    The one rule the online encoder and the feature cache share."""
    if not sample:
        z = mean_BZTHW
    else:
        noise = torch.cat(
            [
                torch.randn((1, *mean_BZTHW.shape[1:]), generator=sample_generator(seed, epoch, index, salt))
                for index in indices
            ]
        ).to(mean_BZTHW.device)
        z = mean_BZTHW + std_BZTHW * noise
    return (z - shift) * scale


class EncodedBatches:
    """BatchSource over a video dataset with online VAE and text encoding."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        dataset: VideoTextDataset,
        vae,
        text_encoder: TextEncoderPair,
        dp_rank: int,
        dp_size: int,
        task: str = "t2v",
        consumed_samples: int = 0,
        device: torch.device | str = "cpu",
        encoder_group=None,
        replica_group=None,
    ):
        """encoder_group: TP x CP ranks sharing the encoding (encoder data parallel); replica_group:
        the TP x CP ranks of this replica, which check they loaded the same samples (None: no check)."""
        self.cfg, self.dataset, self.vae, self.text = cfg, dataset, vae, text_encoder
        self.replica_group = replica_group
        self.stats = BatchStats()
        self.dp_rank, self.dp_size, self.task, self.device = dp_rank, dp_size, task, torch.device(device)
        self.captions = CaptionProcessor.from_encoders(cfg.captions, cfg.text)
        self.text_cache = (
            CaptionEmbeddingCache(self._embed, cfg.text.cache_size) if cfg.text.cache_size else None
        )
        self.masker = I2VMasker(cfg.i2v) if task == "i2v" else None
        self.consumed_samples = consumed_samples
        self._loader = ResumableLoader(
            dataset,
            dp_rank=dp_rank,
            dp_size=dp_size,
            consumed_samples=consumed_samples,
            global_batch_size=cfg.training.global_batch_size,
        )
        # Encoder data parallel: the process group of the TP x CP ranks that share this replica's batches.
        self.encoder_group = encoder_group
        self.encoder_size = 1 if encoder_group is None else dist.get_world_size(encoder_group)
        self._ready: list[TrainBatch] = []
        self._read_samples = consumed_samples  # replica-wide samples read ahead into `_ready`
        self._index_iter: Iterator | None = None

    # -- position ---------------------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """Epoch of the batches being served (None before the first one)."""
        return self._loader.epoch

    def state_dict(self) -> dict:
        """Samples consumed by all data-parallel ranks together."""
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `consumed_samples` (the sampler skips exactly that many)."""
        self.consumed_samples = state["consumed_samples"]
        self._loader.restart(self.consumed_samples)
        self._ready, self._read_samples, self._index_iter = [], self.consumed_samples, None

    def next_batch(self) -> TrainBatch:
        """The replica's next micro-batch, encoded."""
        if self.encoder_size == 1:
            start = time.perf_counter()
            raw = self._loader.next()
            self.stats.loaded(raw, time.perf_counter() - start)
            check_replica_indices(raw["index"].tolist(), self.replica_group, raw.get("load_failures") or ())
            self.consumed_samples = self._loader.consumed_samples
            start = time.perf_counter()
            batch = self._encode_batch(raw, self._loader.epoch or 0)
            self.stats.encoded(time.perf_counter() - start)
            return batch
        if not self._ready:
            self._fill_with_encoder_data_parallel()
        self.consumed_samples += self.dataset.geometry.micro_batch_size * self.dp_size
        return self._ready.pop(0)

    # -- encoder data parallel --------------------------------------------------------------------

    def _next_indices(self) -> tuple[list[int], int]:
        """(dataset indices, epoch) of the replica's next micro-batch, read ahead of consumption."""
        if self._index_iter is None:
            sampler = MegabatchBucketSampler(
                getattr(self.dataset, "buckets", None) or self.dataset.bucket_keys,
                batch_size=self.dataset.geometry.micro_batch_size,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
                seed=self.cfg.data.seed,
                group_data=self.cfg.data.group_data,
                drop_threshold=self.cfg.data.bucket_drop_threshold,
                global_batch_size=self.cfg.training.global_batch_size,
                consumed_samples=self._read_samples,
            )
            self._index_epoch = sampler.epoch
            self._index_iter = iter(sampler)
        try:
            indices = next(self._index_iter)
        except StopIteration:
            self._index_iter = None
            return self._next_indices()
        self._read_samples += len(indices) * self.dp_size
        return indices, self._index_epoch

    def _fill_with_encoder_data_parallel(self) -> None:
        """Read the next g micro-batches, encode the one this rank owns, exchange all g."""
        group, g = self.encoder_group, self.encoder_size
        me = dist.get_rank(group)
        slots = [self._next_indices() for _ in range(g)]
        indices, epoch = slots[me]
        self.dataset.set_epoch(epoch)
        geometry = self.dataset.geometry
        start = time.perf_counter()
        raw = collate_samples(
            [self.dataset[i] for i in indices], geometry.vae_stride_t, geometry.vae_stride_hw
        )
        self.stats.loaded(raw, time.perf_counter() - start)
        start = time.perf_counter()
        mine = _to_device(self._encode_batch(raw, epoch), torch.device("cpu"))
        self.stats.encoded(time.perf_counter() - start)
        ranks = dist.get_process_group_ranks(group)
        for src in range(g):
            box = [mine if src == me else None]
            dist.broadcast_object_list(box, src=ranks[src], group=group)
            self._ready.append(_to_device(box[0], self.device))

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, raw: dict, epoch: int) -> TrainBatch:
        """A collated micro-batch (`collate_samples`) encoded with the draws of `epoch` (the validation
        set encodes its samples through this, outside the training order)."""
        return self._encode_batch(raw, epoch)

    @torch.no_grad()
    def _encode_batch(self, raw: dict, epoch: int) -> TrainBatch:
        seed = self.cfg.training.seed
        indices = [int(i) for i in raw["index"]]
        video = raw["video"].to(self.device)

        # 1. Captions: pick, notice, clean, CFG dropout, tokenise, encode.
        texts = []
        for i, index in enumerate(indices):
            gen = sample_generator(seed, epoch, index, CAPTION_DRAWS)
            texts.append(
                self.captions.caption(
                    raw["captions"][i], gen, aesthetic=raw["aesthetic"][i], is_video=not raw["is_image"][i]
                )
            )
        emb = self._embed(texts) if self.text_cache is None else self.text_cache(texts)
        cond = {"text_BLC": emb.hidden_BLC, "text_mask_BL": emb.mask_BL}
        cond["pooled_BP"] = emb.pooled_BP

        # 2. Latents (posterior samples drawn per sample).
        x0 = self._encode(video, indices, epoch, salt=POSTERIOR_NOISE)
        loss_mask = raw["video_mask"].to(self.device)
        cond["video_mask_BTHW"] = loss_mask

        # 3. I2V: masked video -> latents, pixel mask -> latent-grid mask channels.
        if self.masker is not None:
            masked, masks = [], []
            for i, index in enumerate(indices):
                c = self.masker(video[i], sample_generator(seed, epoch, index, I2V_MASK_DRAWS))
                masked.append(c.masked_video_CTHW)
                masks.append(c.mask_1THW)
            masked_BCTHW, mask_B1THW = torch.stack(masked), torch.stack(masks)
            if self.cfg.i2v.condition_noise:
                gens = [sample_generator(seed, epoch, index, CONDITION_NOISE) for index in indices]
                masked_BCTHW = torch.cat(
                    [
                        self.masker.add_noise(masked_BCTHW[i : i + 1], mask_B1THW[i : i + 1], g)
                        for i, g in enumerate(gens)
                    ]
                )
            cond["masked_latents_BCTHW"] = self._encode(
                masked_BCTHW, indices, epoch, salt=MASKED_POSTERIOR, sample=False
            )
            cond["inpaint_mask_BMTHW"] = compress_mask(
                mask_B1THW, self.vae.temporal_stride, self.vae.spatial_stride, self.vae.spatial_stride
            )
        return TrainBatch(x0, cond, loss_mask)

    def _embed(self, texts: list[str]) -> TextEmbeddings:
        tokens = self.captions.tokenize(texts)
        return self.text({role: {k: v.to(self.device) for k, v in t.items()} for role, t in tokens.items()})

    def _encode(self, video_BCTHW, indices, epoch, salt, sample=None):
        sample = self.cfg.vae.sample_posterior if sample is None else sample
        posterior = self.vae.encode(video_BCTHW)
        return posterior_latents(
            posterior.mean,
            posterior.std,
            self.cfg.training.seed,
            epoch,
            indices,
            salt,
            sample,
            self.vae.shift,
            self.vae.scale,
        )


def _to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    def move(t):
        return None if t is None else t.to(device)

    return TrainBatch(
        move(batch.x0_BCTHW), {k: move(v) for k, v in batch.cond.items()}, move(batch.loss_mask_BTHW)
    )


__all__ = [
    "BatchSource",
    "BatchStats",
    "check_replica_indices",
    "EncodedBatches",
    "TrainBatch",
    "posterior_latents",
    "sample_generator",
    "step_generators",
]
