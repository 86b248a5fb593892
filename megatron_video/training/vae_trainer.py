"""WF-VAE training: the G/D alternation on torch DDP, its checkpoints and exports.

    torchrun --nproc_per_node N pretrain_vae.py CONFIG.yaml [section.field=value ...]

One iteration takes one micro-batch per rank and updates either the VAE or the discriminator
(`vae_losses.gan_phase`): the VAE step runs encoder -> posterior sample -> decoder under DDP and
minimises `VAELoss.generator_loss` (AdamW, EMA after the update); the discriminator step
reconstructs without gradients and minimises the hinge loss. Data parallelism is plain torch
DistributedDataParallel (gloo on CPU, NCCL on GPU) for both networks; each rank computes the
adaptive GAN weight from its own gradients, as the original does.

What is shared with the denoiser stages: the launcher and device (`platform.launch`), seeding
(`seed_everything`), the config loader and `RuntimeConfig` (the config itself is
`config/vae_training.py`), the data pipeline and the keyed per-sample generators
(`data.batches.step_generators`), the EMA, the atomic checkpoint folders (`checkpoint_files`),
`MetricsLogger` and the flat exports. What is VAE-only lives here and in `vae_losses.py`: two
networks and two optimizers alternating, the GAN losses and the discriminator.

Reproducibility: posterior noise comes from a generator per sample keyed by (seed, iteration,
position in the global batch), the global RNG (dropout) is reseeded every iteration, and the data
sampler resumes from the consumed-sample count, so a resumed run repeats the original exactly.

Checkpoints: rank 0 writes `<output_dir>/checkpoints/iter_<7 digits>/` holding `STATE_FILE` (VAE,
discriminator, both optimizers, EMA, iteration and sampler position; a torch state read with
`weights_only=True`) and `checkpoint_meta.json`, through the shared atomic protocol (temporary
folder, fsync, rename, `latest`). The final weights are flat exports (`final_model` / `final_ema`,
safetensors + json) that `stage.build_vae` loads through `vae.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from megatron_video.config.loader import to_dict
from megatron_video.config.vae_training import VAETrainConfig
from megatron_video.data.batches import step_generators
from megatron_video.models.wfvae.model import WFVAE, DiagonalGaussian
from megatron_video.platform.launch import seed_everything
from megatron_video.training.checkpoint_files import (
    good_checkpoint,
    iteration_dir_name,
    prune_checkpoints,
    publish_checkpoint,
    remove_stale_temporaries,
    temporary_dir_name,
    write_meta_file,
    write_synced,
)
from megatron_video.training.ema import ParamEMA
from megatron_video.training.metrics import MetricsLogger
from megatron_video.training.vae_losses import (
    VAELoss,
    WaveletTaps,
    build_discriminator,
    gan_phase,
)

CHECKPOINT_FORMAT = "megatron_video.vae_train.v1"

STATE_FILE = "vae_train_state.pt"
"""The training state inside a checkpoint folder (`VAETrainer.state_dict()`, torch.save)."""

CONSOLE_FIELDS = (
    ("l1", ".4f"),
    ("nll", ".1f"),
    ("kl", ".3g"),
    ("wavelet", ".2f"),
    ("g_loss", ".3f"),
    ("d_weight", ".3g"),
    ("grad_norm", ".3g"),
    ("d_loss", ".3f"),
    ("logits_real", ".3f"),
    ("logits_fake", ".3f"),
    ("step_time_s", ".2f"),
)
"""The console line: means since the last line (VAE and discriminator iterations alternate)."""

# torch >= 2.13 renamed DDP's `broadcast_buffers` to `forward_sync_buffers`.
_DDP_SYNC_BUFFERS = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else "broadcast_buffers"
)

# --------------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------------


class VAEReconstruction(nn.Module):
    """The training forward: video -> (reconstruction, posterior moments), wrapped by DDP."""

    def __init__(self, vae: WFVAE, chunked: bool = False, sample_posterior: bool = True):
        super().__init__()
        self.vae, self.chunked, self.sample_posterior = vae, chunked, sample_posterior

    def forward(
        self, video_BCTHW: torch.Tensor, noise_generators: list[torch.Generator] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction [B, 3, T, H, W] and moments [B, 2Z, T_lat, H/8, W/8]; sample b of the
        posterior draws its noise from noise_generators[b] (the global RNG when None)."""
        posterior = self.vae.encode(video_BCTHW, chunked=self.chunked)
        z = posterior.mean
        if self.sample_posterior:
            if noise_generators is None:
                noise = torch.randn_like(z)
            else:
                noise = torch.cat(
                    [torch.randn((1, *z.shape[1:]), generator=g, dtype=z.dtype) for g in noise_generators]
                ).to(z.device)
            z = z + posterior.std * noise
        return self.vae.decode(z, chunked=self.chunked), posterior.moments


def load_initial_weights(vae: WFVAE, path: str | Path, use_ema: bool = True) -> None:
    """Load a flat export, one of our training checkpoints (see `training_state_file`), or an
    Open-Sora-Plan folder / .ckpt."""
    from megatron_video.models.wfvae.state_dict_adapter import load_open_sora_plan
    from megatron_video.training.export import load_flat

    path = Path(path)
    if path.suffix == ".safetensors" or path.with_suffix(".safetensors").is_file():
        state, _ = load_flat(path)
    elif (state_file := training_state_file(path)) is not None:
        ckpt = read_training_state(state_file)
        state = dict(ckpt["generator"])
        if use_ema and ckpt.get("ema"):
            state.update(ckpt["ema"])
    else:
        _, state = load_open_sora_plan(path, vae.cfg, prefer_ema=use_ema)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"VAE weights {path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def training_state_file(path: str | Path) -> Path | None:
    """The training state of one of our checkpoints: `path` is an `iter_<n>` folder, a checkpoints
    folder (its `latest`), or the STATE_FILE itself; None when it is none of these."""
    path = Path(path)
    if path.is_dir():
        # Verified against its checksums: a save dir falls back over bad checkpoints with a warning,
        # one named checkpoint folder that fails is refused (CheckpointIntegrityError).
        folder = good_checkpoint(path)
        if folder is not None and (folder / STATE_FILE).is_file():
            return folder / STATE_FILE
        return None
    return path if path.name == STATE_FILE and path.is_file() else None


def read_training_state(state_file: str | Path) -> dict:
    """A `VAETrainer.state_dict()` saved by `save_checkpoint` (ValueError for anything else)."""
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{state_file} is not a VAE training checkpoint (format {found!r})")
    return state


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class VAETrainer:
    """VAE, discriminator, their DDP wrappers, optimizers, EMA and the iteration counter."""

    def __init__(self, cfg: VAETrainConfig, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.vae_cfg = cfg.model.build_config()
        from megatron_video.platform.attention import check_backend

        check_backend(cfg.runtime.attention_backend, self.device)  # 'auto' is resolved per call
        seed_everything(cfg.runtime.seed)
        self.vae = WFVAE(self.vae_cfg, cfg.runtime.attention_backend)
        if cfg.model.init_from:
            load_initial_weights(self.vae, cfg.model.init_from, cfg.model.init_use_ema)
        self.vae.to(self.device).train()
        self.generator = VAEReconstruction(self.vae, cfg.model.chunked, cfg.model.sample_posterior)
        self.discriminator = None
        if cfg.loss.gan_enabled:
            seed_everything(cfg.runtime.seed + 1)
            self.discriminator = build_discriminator(cfg.loss.discriminator).to(self.device).train()
        self.generator_ddp, self.discriminator_ddp = self._wrap(self.generator, False), None
        if self.discriminator is not None:
            self.discriminator_ddp = self._wrap(self.discriminator, True)
        o = cfg.optim
        self.opt_g = torch.optim.AdamW(
            self.vae.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
        self.opt_d = None
        if self.discriminator is not None:
            self.opt_d = torch.optim.AdamW(
                self.discriminator.parameters(),
                lr=o.disc_lr or o.lr,
                betas=o.betas,
                eps=o.eps,
                weight_decay=o.disc_weight_decay,
            )
        self.ema = ParamEMA(self.vae, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.loss = VAELoss(cfg.loss, self.device)
        self.taps = WaveletTaps(self.vae) if cfg.loss.wavelet_weight > 0 else None
        self.step = 0
        self.consumed_samples = 0

    def _wrap(self, module: nn.Module, sync_buffers: bool) -> nn.Module:
        """torch DDP (buffers synced at start; before every forward only when `sync_buffers`)."""
        if self.world_size == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=device_ids, **{_DDP_SYNC_BUFFERS: sync_buffers})

    def _autocast(self):
        if self.cfg.runtime.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, batch: dict) -> dict[str, float]:
        """One iteration on this rank's micro-batch; returns its metrics averaged over ranks."""
        cfg = self.cfg
        step = self.step
        seed_everything((cfg.runtime.seed * 7_919 + step) * 131 + self.rank)  # dropout stream
        video = batch["video"].to(self.device, non_blocking=True)
        first = self.rank * video.shape[0]
        gens = step_generators(cfg.runtime.seed, step, range(first, first + video.shape[0]))
        if gan_phase(step, cfg.loss.disc_start) == "discriminator" and self.discriminator is not None:
            terms = self._discriminator_step(video, gens, step)
        else:
            terms = self._generator_step(video, gens, step)
        self.step += 1
        self.consumed_samples += video.shape[0] * self.world_size
        values = torch.stack([v.detach().float().reshape(()).cpu() for v in terms.values()])
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        return dict(zip(terms, values.tolist()))

    def _generator_step(self, video, gens, step) -> dict[str, torch.Tensor]:
        record = self.taps.recording() if self.taps is not None else nullcontext()
        with record, self._autocast():
            recon, moments = self.generator_ddp(video, gens)
        wavelet = self.taps.coefficients() if self.taps is not None else None
        if wavelet is not None:
            wavelet = tuple(c.float() for c in wavelet)
        # The GAN term runs the unwrapped discriminator frozen: no D gradients, no D DDP hooks.
        frozen = self.discriminator is not None
        if frozen:
            self.discriminator.requires_grad_(False)
        try:
            loss, terms = self.loss.generator_loss(
                video,
                recon.float(),
                DiagonalGaussian(moments.float()),
                step,
                last_layer=self.vae.decoder.conv_out.weight,
                discriminator=self.discriminator,
                wavelet_coeffs=wavelet,
            )
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            if frozen:
                self.discriminator.requires_grad_(True)
        terms["grad_norm"] = _clip(self.vae.parameters(), self.cfg.optim.clip_grad_norm)
        self.opt_g.step()
        if self.ema is not None:
            self.ema.update(self.vae)
        return terms

    def _discriminator_step(self, video, gens, step) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self._autocast():
            recon, _ = self.generator(video, gens)
        loss, terms = self.loss.discriminator_loss(video, recon.float(), step, self.discriminator_ddp)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        terms["disc_grad_norm"] = _clip(self.discriminator.parameters(), self.cfg.optim.disc_clip_grad_norm)
        self.opt_d.step()
        return terms

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resume needs (the same on every rank)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "generator": self.vae.state_dict(),
            "discriminator": None if self.discriminator is None else self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": None if self.opt_d is None else self.opt_d.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "wfvae_config": dataclasses.asdict(self.vae_cfg),
            "config": json.dumps(to_dict(self.cfg)),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the VAE and discriminator layouts must match."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a VAE training checkpoint (format {state.get('format')!r})")
        self.vae.load_state_dict(state["generator"])
        if (state["discriminator"] is None) != (self.discriminator is None):
            raise ValueError(
                "the checkpoint and this config disagree on whether a discriminator is trained "
                "(loss.disc_start / loss.disc_factor)"
            )
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError("the checkpoint has no EMA but this config keeps one (ema_decay)")
            self.ema.load_state_dict(state["ema"])
        self.step, self.consumed_samples = state["step"], state["consumed_samples"]

    def save_checkpoint(self, save_dir: str | Path, keep_last: int) -> Path:
        """Rank 0 writes `iter_<step>/` (STATE_FILE, then META_FILE) into a temporary folder,
        flushes it to disk, publishes it with `latest`, removes what interrupted saves left and
        keeps the newest `keep_last`; every rank waits for it. Returns the checkpoint folder."""
        save_dir = Path(save_dir)
        if self.rank == 0:
            save_dir.mkdir(parents=True, exist_ok=True)
            tmp = save_dir / temporary_dir_name(self.step)
            tmp.mkdir()
            write_synced(tmp / STATE_FILE, lambda f: torch.save(self.state_dict(), f))
            meta = {
                "format": CHECKPOINT_FORMAT,
                "iteration": self.step,
                "consumed_samples": self.consumed_samples,
                "state_file": STATE_FILE,
                "has_ema": self.ema is not None,
                "has_discriminator": self.discriminator is not None,
            }
            write_meta_file(tmp, meta)  # with the state file's checksum; flushed with the folder
            publish_checkpoint(save_dir, tmp, self.step)
            remove_stale_temporaries(save_dir)
            prune_checkpoints(save_dir, keep_last)
        if dist.is_initialized():
            dist.barrier()
        return save_dir / iteration_dir_name(self.step)

    def export(self, output_dir: str | Path, stats_samples: Sequence[dict] = ()) -> list[Path]:
        """Rank 0 writes final_model (and final_ema) as flat safetensors + json config.

        `stats_samples`: this rank's share of the samples the exported latent shift / scale are
        measured on (`latent_stats`); empty on every rank keeps the configured ones. Collective when
        given.
        """
        state = {k: v.detach().float().cpu() for k, v in self.vae.state_dict().items()}
        exports = {"final_model": state}
        if self.ema is not None:
            exports["final_ema"] = {**state, **{k: v.cpu() for k, v in self.ema.state_dict().items()}}
        configs = {name: self.vae_cfg for name in exports}
        if self.cfg.latent_stats_samples > 0:
            for name, weights in exports.items():
                shift, scale = self.latent_stats(weights, stats_samples)
                configs[name] = dataclasses.replace(self.vae_cfg, shift=shift, scale=scale)
        written = []
        if self.rank == 0:
            from megatron_video.training.export import save_flat  # imports megatron: rank 0 only

            for name, weights in exports.items():
                written.append(save_flat(Path(output_dir) / name, weights, configs[name]))
        if dist.is_initialized():
            dist.barrier()
        return written

    @torch.no_grad()
    def latent_stats(self, weights: dict, samples: Sequence[dict]) -> tuple[list[float], list[float]]:
        """Per-channel (mean, 1 / std) of the posterior means of `samples` (this rank's share) under
        `weights`, summed over all ranks in float64; collective."""
        vae = WFVAE(self.vae_cfg).to(self.device).eval()
        vae.load_state_dict(weights)
        z = self.vae_cfg.latent_dim
        sums = torch.zeros(3, z, dtype=torch.float64, device=self.device)  # count, sum, sum of squares
        for sample in samples:
            video = sample["video"][None].to(self.device)
            with self._autocast():
                mean_ZN = vae.encode(video, chunked=self.cfg.model.chunked).mode().float()
            mean_ZN = mean_ZN.transpose(0, 1).reshape(z, -1).double()
            sums += torch.stack(
                [torch.full_like(mean_ZN[:, 0], mean_ZN.shape[1]), mean_ZN.sum(1), mean_ZN.pow(2).sum(1)]
            )
        if dist.is_initialized():
            dist.all_reduce(sums)
        count = sums[0].clamp_min(1.0)
        mean = sums[1] / count
        std = (sums[2] / count - mean.pow(2)).clamp_min(1e-12).sqrt()
        return mean.tolist(), (1.0 / std).tolist()


def _clip(params, max_norm: float | None) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def resume_state_file(cfg: VAETrainConfig) -> Path | None:
    """The training state to continue from: `checkpoint.load`, else (with `checkpoint.resume`) the
    `latest` checkpoint of `<output_dir>/checkpoints`; None to start fresh."""
    if cfg.checkpoint.load:
        state_file = training_state_file(cfg.checkpoint.load)
        if state_file is None:
            raise FileNotFoundError(f"checkpoint.load: no complete VAE checkpoint at {cfg.checkpoint.load}")
        return state_file
    if cfg.checkpoint.resume:
        return training_state_file(Path(cfg.output_dir) / "checkpoints")
    return None


def run_training(cfg: VAETrainConfig, device: torch.device | str | None = None) -> dict:
    """Train (resuming when configured), save checkpoints, export.

    Returns {"history": rank 0's per-iteration metrics, "exports": paths written, "elapsed_s",
    "trainer"} on every rank.

    Expects a process group (or none for one process); `device` defaults to the CPU.
    """
    from megatron_video.data.dataset import ResumableLoader, VideoTextDataset

    device = torch.device(device or "cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = Path(cfg.output_dir)

    trainer = VAETrainer(cfg, device)
    resume_from = resume_state_file(cfg)
    if resume_from is not None:
        trainer.load_state_dict(read_training_state(resume_from))
        if rank == 0:
            print(f"resumed from {resume_from.parent} at iteration {trainer.step}", flush=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        n_g = sum(p.numel() for p in trainer.vae.parameters())
        n_d = sum(p.numel() for p in trainer.discriminator.parameters()) if trainer.discriminator else 0
        print(
            f"WF-VAE '{cfg.model.flavor}' {n_g / 1e6:.2f}M params, discriminator {n_d / 1e6:.2f}M; "
            f"{world} data-parallel rank(s) on {device.type}; "
            + (f"GAN from iteration {cfg.loss.disc_start}" if trainer.discriminator else "no GAN"),
            flush=True,
        )

    dataset = VideoTextDataset(cfg.data, cfg.sample_geometry)
    batches = ResumableLoader(
        dataset,
        dp_rank=rank,
        dp_size=world,
        consumed_samples=trainer.consumed_samples,
        global_batch_size=cfg.micro_batch_size * world,
    )
    log = MetricsLogger(
        rank == 0,
        str(out / "tensorboard") if cfg.logging.tensorboard else None,
        cfg.logging.log_interval,
        str(out / "metrics.jsonl"),
        console_fields=CONSOLE_FIELDS,
        console_mean=True,
        resources=False,  # records a resumed run repeats exactly
        start_step=trainer.step,
    )
    start = time.perf_counter()
    try:
        while trainer.step < cfg.steps:
            step = trainer.step
            phase = gan_phase(step, cfg.loss.disc_start) if trainer.discriminator is not None else "generator"
            t0 = time.perf_counter()
            metrics = trainer.train_step(batches.next())
            metrics["step_time_s"] = time.perf_counter() - t0  # data + compute on rank 0
            log.log(step, {"phase": phase, **metrics})  # iteration `step`, 0-based
            if trainer.step % cfg.checkpoint.save_interval == 0 or trainer.step == cfg.steps:
                trainer.save_checkpoint(out / "checkpoints", cfg.checkpoint.keep_last)
    finally:
        curve = log.close(str(out / "loss_curve.png"), "WF-VAE reconstruction L1 (mean |x - x_hat|)", "l1")
    n = cfg.latent_stats_samples
    dataset.set_epoch(0)  # the statistics do not depend on where training stopped
    stats_samples = [dataset[i % len(dataset)] for i in range(rank, n, world)]
    exports = trainer.export(out, stats_samples)
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(
            f"done: {trainer.step} iterations in {elapsed:.1f} s; wrote {[str(p) for p in exports]}",
            flush=True,
        )
        if curve is not None:
            print(f"loss curve: {curve}", flush=True)
    return {"history": log.history, "exports": exports, "elapsed_s": elapsed, "trainer": trainer}
