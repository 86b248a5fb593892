"""The WF-VAE training config: what `pretrain_vae.py` reads (descriptions and validation only).

    output_dir, steps, ema_decay, micro_batch_size, latent_stats_samples
    model       which WF-VAE, its initial weights, chunked / posterior-sample forward
    loss        loss weights, the GAN schedule and the discriminator (`VAELossConfig`)
    optim       AdamW of the VAE and of the discriminator
    data        the training clips (`DataConfig`, shared with the denoiser stages)
    checkpoint  atomic `iter_<n>` folders under `<output_dir>/checkpoints`
    logging     console, metrics.jsonl, TensorBoard
    runtime     device, seed, precision, attention kernel (`RuntimeConfig`, shared)

Loading goes through the shared loader (`base:` inheritance, dotted overrides, strict types);
`VAETrainConfig.validate` needs no process group. The losses themselves are
`megatron_video.training.vae_losses`, the trainer `megatron_video.training.vae_trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_video.config.loader import apply_overrides, from_dict, read_yaml_with_bases
from megatron_video.config.schema import RuntimeConfig
from megatron_video.data.config import DataConfig, SampleGeometry
from megatron_video.errors import ConfigError
from megatron_video.models.wfvae.config import WFVAEConfig

# --------------------------------------------------------------------------------------------------
# Losses and discriminator
# --------------------------------------------------------------------------------------------------


@dataclass
class DiscriminatorConfig:
    """The 3D PatchGAN discriminator."""

    ndf: int = 64
    """Width of the first conv; later convs use 2x, 4x, 8x (capped at 8x)."""

    n_layers: int = 4
    """Strided conv blocks (the first halves T, H, W; the others H and W, the second also T)."""

    norm: Literal["batch", "sync_batch", "group"] = "batch"
    """Norm after each inner conv. "batch" (released): BatchNorm3d with per-rank batch statistics
    (DDP broadcasts rank 0's running statistics, which only eval mode uses). "sync_batch":
    statistics over every data-parallel rank (CUDA / NCCL only). "group": GroupNorm, independent of
    the batch size, for micro-batches of one clip."""


@dataclass
class VAELossConfig:
    """Weights and schedule of the VAE training losses."""

    rec_loss: Literal["l1", "l2"] = "l1"
    """Pixel reconstruction term: absolute (released) or squared error."""

    perceptual_weight: float = 0.0
    """Weight of LPIPS in the reconstruction term (1.0 in the released recipe). Needs
    `lpips_backbone`; LPIPS weights are never downloaded."""

    lpips_net: Literal["vgg", "alex"] = "vgg"
    """LPIPS backbone: VGG16 (the training loss of the original) or AlexNet (its metric)."""

    lpips_backbone: str | None = None
    """Local ImageNet weights of the backbone in torchvision's layout (e.g. `vgg16-397923af.pth`,
    `alexnet-owt-7be5be79.pth`); torchvision itself is not needed."""

    lpips_heads: str | None = None
    """LPIPS v0.1 linear heads (`vgg.pth` / `alex.pth`); None finds the copy shipped inside the
    installed torchmetrics or lpips package."""

    logvar_init: float = 0.0
    """The fixed log-variance that divides the reconstruction term (not learned, as released)."""

    kl_weight: float = 1e-6
    """Weight of the posterior KL divergence."""

    wavelet_weight: float = 0.1
    """Weight of the wavelet-coefficient L1 (0.1 in the training script; 0 turns it off)."""

    disc_start: int | None = 5
    """Iteration (0-based) from which the GAN term and discriminator updates start; None trains
    without a discriminator."""

    disc_factor: float = 1.0
    """Multiplier of both GAN losses once they have started."""

    disc_weight: float = 0.5
    """Scale of the adaptive generator weight."""

    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    """Discriminator objective: hinge (released) or softplus ("vanilla")."""

    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """The discriminator network."""

    @property
    def gan_enabled(self) -> bool:
        """Whether a discriminator is built and trained at some point."""
        return self.disc_start is not None and self.disc_factor > 0

    def validate(self, device_type: str | None = None) -> None:
        """Raise ConfigError naming the field; `device_type` ("cuda", "cpu", ...) checks sync_batch."""
        for name in ("perceptual_weight", "kl_weight", "wavelet_weight", "disc_factor", "disc_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start is not None and self.disc_start < 0:
            raise ConfigError(f"loss.disc_start must be >= 0 or null (no GAN), got {self.disc_start}")
        d = self.discriminator
        if d.ndf < 1 or d.n_layers < 1:
            raise ConfigError(
                f"loss.discriminator.ndf and n_layers must be >= 1, got {d.ndf} and {d.n_layers}"
            )
        if self.gan_enabled and d.norm == "sync_batch" and device_type not in (None, "cuda"):
            raise ConfigError(
                f"loss.discriminator.norm=sync_batch needs CUDA (torch SyncBatchNorm), but this run uses "
                f"{device_type}; use norm=batch (per-rank statistics) or norm=group"
            )
        if self.perceptual_weight > 0:
            if not self.lpips_backbone:
                raise ConfigError(
                    "loss.perceptual_weight > 0 needs loss.lpips_backbone: a local torchvision "
                    f"{'vgg16' if self.lpips_net == 'vgg' else 'alexnet'} state dict (nothing is "
                    "downloaded); or set loss.perceptual_weight=0"
                )
            if not Path(self.lpips_backbone).is_file():
                raise ConfigError(f"loss.lpips_backbone: no file at {self.lpips_backbone}")
            if self.lpips_heads is not None and not Path(self.lpips_heads).is_file():
                raise ConfigError(f"loss.lpips_heads: no file at {self.lpips_heads}")


# --------------------------------------------------------------------------------------------------
# The training run
# --------------------------------------------------------------------------------------------------


@dataclass
class VAEModelSection:
    """Which WF-VAE is trained and where its initial weights come from."""

    flavor: str = "wfvae_8x8x8_d32"
    """Size preset (a key of `megatron_video.models.wfvae.config.FLAVORS`)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """WFVAEConfig fields that differ from the preset, e.g. {dropout: 0.1}."""

    init_from: str | None = None
    """Initial weights: a flat export of ours (.safetensors beside a .json), one of our training
    checkpoint folders (`checkpoints/iter_<n>`), an Open-Sora-Plan folder (config.json + weights)
    or training .ckpt; None starts from random weights."""

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
    """Training checkpoints: `<output_dir>/checkpoints/iter_<7 digits>/` and a `latest` pointer,
    written with the denoiser checkpoints' atomic protocol (`training/checkpoint_files.py`)."""

    save_interval: int = 1000
    """Save every this many iterations (and at the end)."""

    keep_last: int = 2
    """Checkpoints kept on disk; older ones are deleted."""

    resume: bool = True
    """Continue from the `latest` checkpoint of the output folder when one exists."""

    load: str | None = None
    """Continue from this instead: a checkpoint folder (`iter_<n>`) or a checkpoints folder (its
    `latest`)."""


@dataclass
class VAELoggingConfig:
    """Console, metrics.jsonl, TensorBoard and loss-curve output on rank 0."""

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

    micro_batch_size: int = 1
    """Clips per iteration on each data-parallel rank."""

    latent_stats_samples: int = 0
    """At export, encode this many training samples (dataset order, epoch-0 crops, shared by the ranks) with each
    exported set of weights and write the per-channel mean and 1 / std of the posterior means as the
    exported config's `shift` and `scale`, so a denoiser trained on `encode_latents` sees zero-mean,
    unit-variance latents. 0 keeps the model's configured shift / scale (fine-tuning released weights
    whose denoiser expects them)."""

    model: VAEModelSection = field(default_factory=VAEModelSection)
    """The VAE."""

    loss: VAELossConfig = field(default_factory=VAELossConfig)
    """Loss weights, GAN schedule and discriminator."""

    optim: VAEOptimConfig = field(default_factory=VAEOptimConfig)
    """Optimizers."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training clips; what the VAE's strides impose on them comes from `sample_geometry`."""

    checkpoint: VAECheckpointConfig = field(default_factory=VAECheckpointConfig)
    """Checkpoints."""

    logging: VAELoggingConfig = field(default_factory=VAELoggingConfig)
    """Logging."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, seed (posterior noise, initial weights, dropout), precision (fp32, or bf16
    autocast with fp32 weights), attention kernel and collective time-out."""

    @property
    def sample_geometry(self) -> SampleGeometry:
        """The VAE's strides (a clip must be 1 + k * stride frames) and the micro-batch."""
        vae = self.model.build_config()
        return SampleGeometry(
            vae_stride_t=vae.temporal_stride,
            vae_stride_hw=vae.spatial_stride,
            context_parallel=1,
            micro_batch_size=self.micro_batch_size,
        )

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
        if self.latent_stats_samples < 0:
            raise ConfigError(
                f"latent_stats_samples must be >= 0 (0 keeps the configured shift / scale), "
                f"got {self.latent_stats_samples}"
            )
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
        if self.checkpoint.load is not None and not Path(self.checkpoint.load).is_dir():
            raise ConfigError(
                f"checkpoint.load: no folder at {self.checkpoint.load} (give checkpoints/iter_<n> or checkpoints)"
            )
        if self.logging.log_interval < 1:
            raise ConfigError(f"logging.log_interval must be >= 1, got {self.logging.log_interval}")
        self.runtime.validate()
        device = self.runtime.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else None
        self.loss.validate(device)
        if not self.data.data_list:
            raise ConfigError("data.data_list is not set; point it at a data.txt")
        self.data.validate(self.sample_geometry)


def build_vae_train_config(data: dict[str, Any], overrides: list[str] | None = None) -> VAETrainConfig:
    """Mapping (+ dotted overrides) -> validated VAETrainConfig."""
    cfg = from_dict(VAETrainConfig, apply_overrides(data, list(overrides or [])))
    cfg.validate()
    return cfg


def load_vae_train_config(path: str | Path, overrides: list[str] | None = None) -> VAETrainConfig:
    """Read a YAML config (with `base:` parents), apply overrides, validate."""
    return build_vae_train_config(read_yaml_with_bases(path), overrides)
