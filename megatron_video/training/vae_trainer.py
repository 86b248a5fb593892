"""WF-VAE training: config, data-parallel trainer (torch DDP), checkpoints, logging, export.

    torchrun --nproc_per_node N pretrain_vae.py CONFIG.yaml [section.field=value ...]

One iteration takes one micro-batch per rank and updates either the VAE or the discriminator
(`vae_losses.gan_phase`): the VAE step runs encoder -> posterior sample -> decoder under DDP and
minimises `VAELoss.generator_loss` (AdamW, EMA after the update); the discriminator step
reconstructs without gradients and minimises the hinge loss. Data parallelism is plain torch
DistributedDataParallel (gloo on CPU, NCCL on GPU) for both networks; each rank computes the
adaptive GAN weight from its own gradients, as the original does.

Reproducibility: posterior noise comes from a generator per sample keyed by (seed, iteration,
position in the global batch), the global RNG (dropout) is reseeded every iteration, and the data
sampler resumes from the consumed-sample count, so a resumed run repeats the original exactly.

Checkpoints are single files written by rank 0 (`torch.save` to a temporary name, then
`os.replace`): VAE, discriminator, both optimizers, EMA, iteration and sampler position. The
final weights are flat exports (`final_model` / `final_ema`, safetensors + json) that
`stage.build_vae` loads through `vae.checkpoint`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from megatron_video.config.loader import apply_overrides, from_dict, read_yaml_with_bases, to_dict
from megatron_video.config.schema import RuntimeConfig
from megatron_video.data.config import DataConfig
from megatron_video.errors import ConfigError
from megatron_video.models.wfvae import WFVAE, DiagonalGaussian, WFVAEConfig
from megatron_video.training.ema import ParamEMA
from megatron_video.training.vae_losses import (
    VAELoss,
    VAELossConfig,
    WaveletTaps,
    build_discriminator,
    gan_phase,
)

CHECKPOINT_FORMAT = "megatron_video.vae_train.v1"

# torch >= 2.13 renamed DDP's `broadcast_buffers` to `forward_sync_buffers`.
_DDP_SYNC_BUFFERS = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else "broadcast_buffers"
)

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class VAEModelSection:
    """Which WF-VAE is trained and where its initial weights come from."""

    flavor: str = "wfvae_8x8x8_d32"
    """Size preset (a key of `megatron_video.models.wfvae.config.FLAVORS`)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """WFVAEConfig fields that differ from the preset, e.g. {dropout: 0.1}."""

    init_from: str | None = None
    """Initial weights: a flat export of ours (.safetensors beside a .json), an Open-Sora-Plan
    folder (config.json + weights) or training .ckpt; None starts from random weights."""

    init_use_ema: bool = True
    """Take the EMA weights of `init_from` when it has them."""

    chunked: bool = False
    """Run the training forward with causal-cache temporal chunks (exact with layernorm, bounded
    activation memory for long clips); False passes each clip whole (faster)."""

    sample_posterior: bool = True
    """Decode a posterior sample (released); False decodes the posterior mean."""

    def build_config(self) -> WFVAEConfig:
        """The WFVAEConfig of this section (preset + overrides), validated."""
        try:
            cfg = WFVAEConfig.from_flavor(self.flavor, **self.overrides)
        except TypeError as e:
            raise ConfigError(f"model.overrides: {e}") from None
        cfg.validate()
        return cfg


@dataclass
class VAEOptimConfig:
    """AdamW for the VAE and for the discriminator (constant learning rates)."""

    lr: float = 1e-5
    """VAE learning rate."""

    disc_lr: float | None = None
    """Discriminator learning rate; None uses `lr`."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas of both optimizers."""

    eps: float = 1e-8
    """Adam epsilon of both optimizers."""

    weight_decay: float = 1e-4
    """Decoupled weight decay of the VAE."""

    disc_weight_decay: float = 0.01
    """Decoupled weight decay of the discriminator."""

    clip_grad_norm: float | None = None
    """Clip the VAE's (reduced) gradient to this global L2 norm; None logs the norm only."""

    disc_clip_grad_norm: float | None = 1.0
    """Clip the discriminator's gradient to this global L2 norm; None logs the norm only."""


@dataclass
class VAECheckpointConfig:
    """Training checkpoints under `<output_dir>/checkpoints`."""

    save_interval: int = 1000
    """Save every this many iterations (and at the end)."""

    keep_last: int = 2
    """Checkpoints kept on disk; older ones are deleted."""

    resume: bool = True
    """Continue from the newest checkpoint in the output folder when one exists."""

    load: str | None = None
    """A checkpoint file to continue from instead of the newest one."""


@dataclass
class VAELoggingConfig:
    """Console, TensorBoard and loss-curve output on rank 0."""

    log_interval: int = 10
    """Print the averages of the last this many iterations."""

    tensorboard: bool = True
    """Write scalars to `<output_dir>/tensorboard`."""


@dataclass
class VAETrainConfig:
    """Everything a WF-VAE training run reads; one source of truth per setting."""

    output_dir: str = "outputs/vae"
    """Checkpoints, metrics, loss curve and the final exports go here."""

    steps: int = 1000
    """Training iterations; each updates either the VAE or the discriminator."""

    ema_decay: float | None = 0.999
    """EMA of the VAE weights, updated after every VAE update; None disables it (and final_ema)."""

    model: VAEModelSection = field(default_factory=VAEModelSection)
    """The VAE."""

    loss: VAELossConfig = field(default_factory=VAELossConfig)
    """Loss weights, GAN schedule and discriminator."""

    optim: VAEOptimConfig = field(default_factory=VAEOptimConfig)
    """Optimizers."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training clips (data.batch_size is the micro-batch per rank). data.vae_stride_* and
    data.context_parallel are derived from the VAE and need not be set."""

    checkpoint: VAECheckpointConfig = field(default_factory=VAECheckpointConfig)
    """Checkpoints."""

    logging: VAELoggingConfig = field(default_factory=VAELoggingConfig)
    """Logging."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, seed (posterior noise, initial weights, dropout), precision (fp32, or bf16
    autocast with fp32 weights), attention kernel and collective time-out."""

    def fill_derived_fields(self) -> None:
        """Copy the VAE's strides into `data` (a clip must be 1 + k * stride frames)."""
        vae = self.model.build_config()
        self.data.vae_stride_t, self.data.vae_stride_hw = vae.temporal_stride, vae.spatial_stride
        self.data.context_parallel = 1

    def validate(self) -> None:
        """Raise ConfigError with the field and the fix; needs no process group."""
        self.model.build_config()
        if (
            self.model.init_from is not None
            and not Path(self.model.init_from).exists()
            and not (Path(self.model.init_from).with_suffix(".safetensors").is_file())
        ):
            raise ConfigError(f"model.init_from: nothing at {self.model.init_from}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) or null, got {self.ema_decay}")
        o = self.optim
        if o.lr <= 0 or (o.disc_lr is not None and o.disc_lr <= 0):
            raise ConfigError(f"optim.lr and optim.disc_lr must be > 0, got {o.lr} and {o.disc_lr}")
        if not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas must be in [0, 1), got {list(o.betas)}")
        for name in ("clip_grad_norm", "disc_clip_grad_norm"):
            if getattr(o, name) is not None and getattr(o, name) <= 0:
                raise ConfigError(f"optim.{name} must be > 0 or null, got {getattr(o, name)}")
        if self.checkpoint.save_interval < 1 or self.checkpoint.keep_last < 1:
            raise ConfigError("checkpoint.save_interval and checkpoint.keep_last must be >= 1")
        if self.checkpoint.load is not None and not Path(self.checkpoint.load).is_file():
            raise ConfigError(f"checkpoint.load: no file at {self.checkpoint.load}")
        if self.logging.log_interval < 1:
            raise ConfigError(f"logging.log_interval must be >= 1, got {self.logging.log_interval}")
        if self.runtime.dtype == "fp16":
            raise ConfigError("runtime.dtype=fp16 is not supported for VAE training; use fp32 or bf16")
        device = self.runtime.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else None
        self.loss.validate(device)
        if not self.data.data_list:
            raise ConfigError("data.data_list is not set; point it at a data.txt")
        self.data.validate()


def build_vae_train_config(data: dict[str, Any], overrides: list[str] | None = None) -> VAETrainConfig:
    """Mapping (+ dotted overrides) -> validated VAETrainConfig."""
    cfg = from_dict(VAETrainConfig, apply_overrides(data, list(overrides or [])))
    cfg.fill_derived_fields()
    cfg.validate()
    return cfg


def load_vae_train_config(path: str | Path, overrides: list[str] | None = None) -> VAETrainConfig:
    """Read a YAML config (with `base:` parents), apply overrides, validate."""
    return build_vae_train_config(read_yaml_with_bases(path), overrides)


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
    """Load a flat export, an Open-Sora-Plan folder / .ckpt, or one of our training checkpoints."""
    from megatron_video.models.wfvae.state_dict_adapter import load_open_sora_plan
    from megatron_video.training.export import load_flat

    path = Path(path)
    if path.suffix == ".safetensors" or path.with_suffix(".safetensors").is_file():
        state, _ = load_flat(path)
    elif path.is_file() and _is_our_checkpoint(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = dict(ckpt["generator"])
        if use_ema and ckpt.get("ema"):
            state.update(ckpt["ema"])
    else:
        _, state = load_open_sora_plan(path, vae.cfg, prefer_ema=use_ema)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"VAE weights {path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def _is_our_checkpoint(path: Path) -> bool:
    if path.suffix != ".pt":  # ours are step_<n>.pt; Open-Sora-Plan's are .ckpt
        return False
    head = torch.load(path, map_location="cpu", weights_only=True)
    return isinstance(head, dict) and head.get("format") == CHECKPOINT_FORMAT


def sample_noise_generators(seed: int, step: int, positions: range) -> list[torch.Generator]:
    """One generator per sample keyed by (seed, iteration, position in the global batch).

    The keying of `runtime.sample_generators`, repeated here because runtime.py imports Megatron
    at module level and the VAE trainer (and its spawned test ranks) need none of it.
    """
    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + p) for p in positions]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


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
        from megatron_video.platform.attention import resolve_backend

        backend = resolve_backend(cfg.runtime.attention_backend, self.device.type)
        torch.manual_seed(cfg.runtime.seed)
        self.vae = WFVAE(self.vae_cfg, backend)
        if cfg.model.init_from:
            load_initial_weights(self.vae, cfg.model.init_from, cfg.model.init_use_ema)
        self.vae.to(self.device).train()
        self.generator = VAEReconstruction(self.vae, cfg.model.chunked, cfg.model.sample_posterior)
        self.discriminator = None
        if cfg.loss.gan_enabled:
            torch.manual_seed(cfg.runtime.seed + 1)
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
        torch.manual_seed((cfg.runtime.seed * 7_919 + step) * 131 + self.rank)  # dropout stream
        video = batch["video"].to(self.device, non_blocking=True)
        first = self.rank * video.shape[0]
        gens = sample_noise_generators(cfg.runtime.seed, step, range(first, first + video.shape[0]))
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

    def save_checkpoint(self, folder: str | Path, keep_last: int) -> Path:
        """Rank 0 writes `step_<n>.pt` atomically and prunes old ones; every rank waits for it."""
        folder = Path(folder)
        path = folder / f"step_{self.step:08d}.pt"
        if self.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".pt.tmp")
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
            for old in list_checkpoints(folder)[:-keep_last]:
                old.unlink()
        if dist.is_initialized():
            dist.barrier()
        return path

    def export(self, output_dir: str | Path) -> list[Path]:
        """Rank 0 writes final_model (and final_ema) as flat safetensors + json config."""
        written = []
        if self.rank == 0:
            from megatron_video.training.export import save_flat  # imports megatron: rank 0 only

            state = {k: v.detach().float().cpu() for k, v in self.vae.state_dict().items()}
            written.append(save_flat(Path(output_dir) / "final_model", state, self.vae_cfg))
            if self.ema is not None:
                ema_state = dict(state)
                ema_state.update({k: v.cpu() for k, v in self.ema.state_dict().items()})
                written.append(save_flat(Path(output_dir) / "final_ema", ema_state, self.vae_cfg))
        if dist.is_initialized():
            dist.barrier()
        return written


def _clip(params, max_norm: float | None) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """`step_<n>.pt` files of a folder, oldest first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(folder).glob("step_*.pt")
        if (m := re.match(r"step_(\d+)\.pt$", p.name))
    ]
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------

_CONSOLE = (
    ("l1", "l1", ".4f"),
    ("nll", "nll", ".1f"),
    ("kl", "kl", ".3g"),
    ("wavelet", "wl", ".2f"),
    ("g_loss", "g", ".3f"),
    ("d_weight", "d_w", ".3g"),
    ("grad_norm", "grad", ".3g"),
    ("d_loss", "d_loss", ".3f"),
    ("logits_real", "D(x)", ".3f"),
    ("logits_fake", "D(x^)", ".3f"),
    ("step_time_s", "s/it", ".2f"),
)


class VAEMetricsLog:
    """Rank 0: per-iteration JSON lines, TensorBoard scalars, interval averages on the console and
    the reconstruction-L1 curve at the end."""

    def __init__(self, cfg: VAETrainConfig, enabled: bool, start_step: int):
        self.cfg, self.enabled = cfg, enabled
        self.out = Path(cfg.output_dir)
        self.jsonl = self.out / "metrics.jsonl"
        self.history: list[dict] = []
        self._pending: dict[str, list[float]] = defaultdict(list)
        self._writer = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self.jsonl.is_file() and start_step > 0:  # keep the lines a resumed run does not redo
            for line in self.jsonl.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] < start_step:
                    self.history.append(json.loads(line))
        self.jsonl.write_text("".join(json.dumps(m) + "\n" for m in self.history))
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"))

    def log(self, step: int, phase: str, metrics: dict[str, float]) -> None:
        """Record iteration `step` (0-based) and print averages every log_interval iterations."""
        if not self.enabled:
            return
        record = {"step": step, "phase": phase, **metrics}
        self.history.append(record)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(f"train/{key}", value, step)
        for key, value in metrics.items():
            self._pending[key].append(value)
        done = step + 1
        if done % self.cfg.logging.log_interval == 0 or done == self.cfg.steps:
            parts = [f"step {done}/{self.cfg.steps}"]
            for key, label, fmt in _CONSOLE:
                if self._pending.get(key):
                    parts.append(f"{label} {format(sum(self._pending[key]) / len(self._pending[key]), fmt)}")
            print(" | ".join(parts), flush=True)
            self._pending.clear()

    def close(self) -> Path | None:
        """Flush TensorBoard and draw the reconstruction-L1 curve; returns the PNG path."""
        if not self.enabled:
            return None
        if self._writer is not None:
            self._writer.close()
        points = [(m["step"], m["l1"]) for m in self.history if "l1" in m]
        if not points:
            return None
        from megatron_video.training.metrics import write_loss_curve

        png = self.out / "loss_curve.png"
        write_loss_curve(png, points, "WF-VAE reconstruction L1 (mean |x - x_hat|)")
        return png


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def join_process_group(cfg: VAETrainConfig) -> torch.device:
    """Join the launcher's process group (unless one exists) and pick this rank's device."""
    from megatron_video.training.runtime import init_distributed, launcher_env, select_device

    if dist.is_initialized():
        return select_device(cfg.runtime.device, launcher_env()[2])
    return init_distributed(cfg).device  # reads cfg.runtime.device / distributed_timeout_s


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
    ckpt_dir = out / "checkpoints"

    trainer = VAETrainer(cfg, device)
    resume_from = Path(cfg.checkpoint.load) if cfg.checkpoint.load else None
    if resume_from is None and cfg.checkpoint.resume and list_checkpoints(ckpt_dir):
        resume_from = list_checkpoints(ckpt_dir)[-1]
    if resume_from is not None:
        trainer.load_state_dict(torch.load(resume_from, map_location="cpu", weights_only=True))
        if rank == 0:
            print(f"resumed from {resume_from} at iteration {trainer.step}", flush=True)
    if rank == 0:
        (out / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        n_g = sum(p.numel() for p in trainer.vae.parameters())
        n_d = sum(p.numel() for p in trainer.discriminator.parameters()) if trainer.discriminator else 0
        print(
            f"WF-VAE '{cfg.model.flavor}' {n_g / 1e6:.2f}M params, discriminator {n_d / 1e6:.2f}M; "
            f"{world} data-parallel rank(s) on {device.type}; "
            + (f"GAN from iteration {cfg.loss.disc_start}" if trainer.discriminator else "no GAN"),
            flush=True,
        )

    dataset = VideoTextDataset(cfg.data)
    batches = ResumableLoader(
        dataset,
        dp_rank=rank,
        dp_size=world,
        consumed_samples=trainer.consumed_samples,
        global_batch_size=dataset.cfg.batch_size * world,
    )
    log = VAEMetricsLog(cfg, rank == 0, trainer.step)
    start = time.perf_counter()
    while trainer.step < cfg.steps:
        step = trainer.step
        phase = gan_phase(step, cfg.loss.disc_start) if trainer.discriminator is not None else "generator"
        t0 = time.perf_counter()
        metrics = trainer.train_step(batches.next())
        metrics["step_time_s"] = time.perf_counter() - t0  # data + compute on rank 0
        log.log(step, phase, metrics)
        if trainer.step % cfg.checkpoint.save_interval == 0 or trainer.step == cfg.steps:
            trainer.save_checkpoint(ckpt_dir, cfg.checkpoint.keep_last)
    exports = trainer.export(out)
    curve = log.close()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(
            f"done: {trainer.step} iterations in {elapsed:.1f} s; wrote {[str(p) for p in exports]}",
            flush=True,
        )
        if curve is not None:
            print(f"loss curve: {curve}", flush=True)
    return {"history": log.history, "exports": exports, "elapsed_s": elapsed, "trainer": trainer}


def main(argv: list[str] | None = None) -> int:
    """Command line of pretrain_vae.py: validate the config, then train."""
    parser = argparse.ArgumentParser(
        prog="pretrain_vae.py",
        description="Train a WF-VAE (L1 + KL + wavelet + 3D PatchGAN) with data parallelism. "
        "Launch with torchrun.",
    )
    parser.add_argument("config", help="VAE training YAML (inherits with `base:`)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=200 optim.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_vae_train_config(args.config, args.overrides)
        device = join_process_group(cfg)
        run_training(cfg, device)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
