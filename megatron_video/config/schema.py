"""The typed configuration tree: one source of truth per setting.

`load_config(path, overrides)` reads YAML (with `base:` inheritance), applies dotted overrides,
builds these dataclasses and validates them. Validation needs no process group, so a bad config
fails before any distributed work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_video.config.encoders import VAESection
from megatron_video.config.loader import (
    ConfigError,
    apply_overrides,
    from_dict,
    read_yaml_with_bases,
)
from megatron_video.config.training import TrainingConfig
from megatron_video.data.config import (
    DataConfig,
    FeatureCacheConfig,
    I2VMaskConfig,
    SampleGeometry,
    TextConfig,
)
from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.opensora_dit.config import with_flavor as dit_with_flavor
from megatron_video.models.suv.config import SUVConfig
from megatron_video.models.suv.config import with_flavor as suv_with_flavor
from megatron_video.models.text.config import TextEncoderPairConfig

ModelConfig = SUVConfig | OpenSoraDiTConfig
"""Any denoiser's config; its `family` field says which (a tagged union)."""

MODEL_FAMILIES = {
    "suv": (SUVConfig, suv_with_flavor),
    "opensora_dit": (OpenSoraDiTConfig, dit_with_flavor),
}
"""`model.family` -> (config class, the family's flavor expansion)."""


def model_config_from_dict(fields: dict[str, Any], path: str = "model") -> ModelConfig:
    """A `model` section (or a saved config: flat export JSON, checkpoint metadata) -> its family's
    config, flavor expanded; no `family` key means `suv` (exports written before families existed)."""
    family = fields.get("family", "suv")
    if family not in MODEL_FAMILIES:
        raise ConfigError(
            f"unknown {path}.family '{family}'; choose one of {sorted(MODEL_FAMILIES)} "
            "(suv: Open-Sora-Plan v1.5; opensora_dit: the v1.2 / v1.3 DiT)"
        )
    cls, expand = MODEL_FAMILIES[family]
    return from_dict(cls, expand(dict(fields)), path)


@dataclass
class ParallelConfig:
    """How one model replica is split over devices; data parallel fills the rest of the world."""

    tensor_parallel: int = 1
    """Tensor-parallel size: attention heads and FFN width are split over this many ranks."""

    sequence_parallel: bool = False
    """Split norms and elementwise regions along the token sequence over the tensor-parallel ranks."""

    context_parallel: int = 1
    """Ulysses context-parallel size: video tokens split by latent frames, all-to-all inside attention."""

    pipeline_parallel: int = 1
    """Pipeline stages; blocks are split between them."""

    virtual_pipeline: int | None = None
    """Model chunks per pipeline stage for the interleaved schedule; None disables interleaving."""

    world_size: int | None = None
    """Total ranks, when known before launch (tools fill it from the launcher); None skips that check."""

    overlap_grad_reduce: bool | None = None
    """Reduce (distributed optimizer: reduce-scatter) gradients bucket by bucket while the backward
    pass of the last micro-batch still runs, instead of all at once after it (Megatron DDP). None: on
    whenever gradients are reduced over more than one rank (data parallel x context parallel > 1),
    except with training.clip.mode=batch_drop, which weighs each rank's unreduced gradients after the
    backward pass. Under pipeline parallelism the schedule holds the reduction back until each chunk's
    last micro-batch; later stages reduce in one bucket (their reduction is off the critical path)."""

    overlap_param_gather: bool | None = None
    """With the distributed optimizer: all-gather the updated parameters bucket by bucket during the
    next forward pass (each module waits for its own bucket) instead of right after the optimizer
    step. Needs overlap_grad_reduce. None: on whenever overlap_grad_reduce is and the distributed
    optimizer runs. Checkpoints, exports and the EMA still see up-to-date parameters
    (`Trainer.sync_params`)."""

    bucket_size: int | None = None
    """Parameters per gradient-reduction (and parameter-gather) bucket when overlapping; smaller buckets
    start communicating earlier, larger ones use the links better. None: Megatron's default,
    max(40M, 1M x data-parallel size). With the distributed optimizer the bucket layout fixes where
    each rank's optimizer shard lies, so a checkpoint in training.checkpoint.optimizer_format=
    dp_reshardable resumes only with the same buckets (fully_reshardable resumes with any)."""

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one model replica."""
        return self.tensor_parallel * self.context_parallel * self.pipeline_parallel


@dataclass
class RuntimeConfig:
    """Device, precision and kernel choices."""

    device: Literal["auto", "cuda", "npu", "cpu"] = "auto"
    """Accelerator backend; auto picks cuda, then npu, then cpu."""

    attention_backend: Literal["auto", "sdpa", "flash", "te", "npu"] = "auto"
    """Attention kernel: torch SDPA everywhere; flash-attn, Transformer Engine or Ascend fused attention
    when installed. auto decides per call (megatron_video/platform/attention.py): npu on Ascend; on CUDA
    SDPA without a mask when every key is valid, and flash-attn varlen, else Transformer Engine, else
    SDPA when keys are masked (bf16 / fp16); SDPA otherwise."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the denoiser's transformer linears and attention; bf16 keeps the residual streams, norms,
    AdaLN and the timestep embedding in fp32 and the optimizer's main weights in fp32
    (models/common/layers.py). fp16 is refused (no loss scaling). The CPU demo configs use fp32."""

    seed: int = 1234
    """Base random seed."""

    distributed_timeout_s: int = 600
    """Timeout for collective operations, in seconds."""

    def validate(self) -> None:
        """Refuse fp16 (no trainer here does loss scaling) and non-positive time-outs."""
        if self.dtype == "fp16":
            raise ConfigError(
                "runtime.dtype=fp16 needs dynamic loss scaling, which the trainers do not do; "
                "use runtime.dtype=bf16 (or fp32)"
            )
        if self.distributed_timeout_s <= 0:
            raise ConfigError(f"runtime.distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")


@dataclass
class ShapeConfig:
    """The largest video the run feeds the model (its latent size follows from `vae`)."""

    num_frames: int = 1
    """Pixel frames per sample (1 = images); must be 1 + multiple of the VAE temporal stride."""

    height: int = 256
    """Pixel height; a multiple of the VAE spatial stride x model patch size."""

    width: int = 256
    """Pixel width; a multiple of the VAE spatial stride x model patch size."""

    text_length: int = 512
    """Text tokens per caption fed to the model."""


@dataclass
class ExperimentConfig:
    """Root of the configuration tree."""

    model: ModelConfig = field(default_factory=SUVConfig)
    """The denoiser: `model.family` picks the model (suv, the default, or opensora_dit: the v1.2 / v1.3
    DiT), `model.flavor` the size preset the other keys override (and for opensora_dit, `model.version`
    its release: v1.2 or v1.3)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, precision and kernels."""

    shape: ShapeConfig = field(default_factory=ShapeConfig)
    """Largest sample shape, used to check the parallel layout before launch."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Objective, optimiser, clipping, EMA, checkpoints and logging of one training stage."""

    data: DataConfig = field(default_factory=DataConfig)
    """Annotations, decoding, frame and resolution rules, buckets. What the VAE, the parallel
    layout and the micro-batch impose on samples comes from `sample_geometry`."""

    captions: TextConfig = field(default_factory=TextConfig)
    """Caption choice, cleanup, aesthetic notice and CFG dropout."""

    text: TextEncoderPairConfig = field(default_factory=TextEncoderPairConfig)
    """Text encoder(s): token states for the caption stream, pooled features for AdaLN."""

    vae: VAESection = field(default_factory=VAESection)
    """The VAE and its weights."""

    i2v: I2VMaskConfig = field(default_factory=I2VMaskConfig)
    """Image-to-video mask types and condition noise (I2V training only)."""

    features: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    """Latent / text-feature cache: T2V stages read tools/build_feature_cache.py output instead of
    running the VAE and text encoder (cache_dir None = encode online)."""

    @property
    def sample_geometry(self) -> SampleGeometry:
        """What the VAE (`vae`), the context-parallel size (`parallel`) and the micro-batch
        (`training`) impose on every sample: computed here only, passed to the data pipeline."""
        stride_t, stride_hw = self.vae.strides
        return SampleGeometry(
            vae_stride_t=stride_t,
            vae_stride_hw=stride_hw,
            context_parallel=self.parallel.context_parallel,
            micro_batch_size=self.training.micro_batch_size,
        )

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        """(frames, height, width) of the largest sample's latent (`shape` through the VAE strides)."""
        stride_t, stride_hw = self.vae.strides
        s = self.shape
        return 1 + (s.num_frames - 1) // stride_t, s.height // stride_hw, s.width // stride_hw

    def _validate_quality_signals(self) -> None:
        """Validation loss and samples during training: what they need from the other sections."""
        t = self.training
        if t.validation.interval:
            if not self.data.has_validation_split:
                raise ConfigError(
                    "training.validation.interval > 0 needs validation samples: set data.validation_fraction "
                    "(held out of data_list) or data.validation_data_list"
                )
            if self.features.cache_dir:
                raise ConfigError(
                    "training.validation encodes its held-out samples online; it cannot run from a feature "
                    "cache (features.cache_dir): set training.validation.interval=0"
                )
        for name in ("validation", "samples"):
            if getattr(t, name).interval and self.parallel.pipeline_parallel > 1:
                raise ConfigError(
                    f"training.{name} runs the whole model on every rank of a replica; with "
                    f"parallel.pipeline_parallel={self.parallel.pipeline_parallel} set training.{name}.interval=0"
                )

    def validate(self, check_files: bool = True) -> None:
        """Raise ConfigError naming the field and the fix; needs no process group. `check_files`
        false skips looking for the text encoders' weight folders (planning a run elsewhere)."""
        self.model.validate()
        self.training.validate()
        self.i2v.validate()
        self.captions.validate()
        self.features.validate()
        self.runtime.validate()
        if self.runtime.dtype == "bf16" and not self.training.optimizer.distributed_optimizer:
            raise ConfigError(
                "runtime.dtype=bf16 runs Megatron's distributed optimizer (its plain mixed-precision optimizer "
                "cannot checkpoint a model that keeps norms and AdaLN in fp32); set "
                "training.optimizer.distributed_optimizer=true"
            )
        if self.data.has_source:
            self.data.validate(self.sample_geometry)
            if self.parallel.context_parallel > 1 and self.data.media != "videos":
                raise ConfigError(
                    f"parallel.context_parallel={self.parallel.context_parallel} splits latent frames, and an image has "
                    "one; set data.media=videos for this stage (v1.5 trains video stages on videos only)"
                )
            text_width = None
            if self.features.cache_dir is None:  # a cached run needs no encoder weights
                self.text.validate(check_files)
                text_width = _text_width(self.text) if check_files else None
            if text_width is not None and text_width != self.model.caption_channels:
                raise ConfigError(
                    f"model.caption_channels={self.model.caption_channels} but the text encoder gives "
                    f"{text_width}-wide token states; set model.caption_channels={text_width}"
                )
        self._validate_quality_signals()
        p, m, s = self.parallel, self.model, self.shape
        stride_t, stride_hw = self.vae.strides
        latent_frames = self.latent_grid[0]
        for name in ("tensor_parallel", "context_parallel", "pipeline_parallel"):
            if getattr(p, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
        if m.num_heads % (p.tensor_parallel * p.context_parallel) != 0:
            raise ConfigError(
                f"model.num_heads={m.num_heads} must be divisible by parallel.tensor_parallel x "
                f"parallel.context_parallel = {p.tensor_parallel} x {p.context_parallel}; choose sizes "
                f"whose product divides {m.num_heads}"
            )
        if m.hidden_size % p.tensor_parallel != 0:
            raise ConfigError(
                f"hidden size {m.hidden_size} (num_heads x head_dim) must be divisible by "
                f"parallel.tensor_parallel={p.tensor_parallel}"
            )
        if p.sequence_parallel and p.tensor_parallel == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1; "
                "set sequence_parallel=false or raise tensor_parallel"
            )
        if p.virtual_pipeline is not None:
            if p.virtual_pipeline < 1:
                raise ConfigError(
                    f"parallel.virtual_pipeline must be >= 1 (or null), got {p.virtual_pipeline}"
                )
            if p.pipeline_parallel < 2:
                raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline_parallel >= 2")
            if m.total_layers % (p.pipeline_parallel * p.virtual_pipeline) != 0:
                raise ConfigError(
                    f"{m.total_layers} blocks cannot be split evenly over pipeline_parallel x "
                    f"virtual_pipeline = {p.pipeline_parallel} x {p.virtual_pipeline}"
                )
        self._validate_overlap()
        if p.pipeline_parallel > m.total_layers:
            raise ConfigError(
                f"parallel.pipeline_parallel={p.pipeline_parallel} exceeds the {m.total_layers} blocks"
            )
        if p.world_size is not None and p.world_size % p.model_parallel_size != 0:
            raise ConfigError(
                f"world size {p.world_size} is not divisible by tensor x context x pipeline parallel = "
                f"{p.model_parallel_size}"
            )
        if p.world_size is not None:
            self.micro_batches_per_step(p.world_size // p.model_parallel_size)
        if (s.num_frames - 1) % stride_t != 0:
            valid = [1 + stride_t * i for i in range(1, 5)]
            raise ConfigError(
                f"shape.num_frames={s.num_frames} must be 1 + a multiple of the VAE temporal stride "
                f"{stride_t} (e.g. 1, {', '.join(map(str, valid))}, ...)"
            )
        if s.num_frames > 1 and latent_frames % p.context_parallel != 0:
            raise ConfigError(
                f"{latent_frames} latent frames (shape.num_frames={s.num_frames}) are not divisible by "
                f"parallel.context_parallel={p.context_parallel}; pick num_frames with "
                f"(num_frames - 1) / {stride_t} + 1 a multiple of {p.context_parallel}"
            )
        if isinstance(m, OpenSoraDiTConfig):
            self._validate_dit(m)
        spatial = stride_hw * m.patch_size
        for name in ("height", "width"):
            if getattr(s, name) % spatial != 0:
                raise ConfigError(
                    f"shape.{name}={getattr(s, name)} must be a multiple of VAE stride x patch = {spatial}"
                )
        split = p.context_parallel * (p.tensor_parallel if p.sequence_parallel else 1)
        if s.text_length % split != 0:
            raise ConfigError(
                f"shape.text_length={s.text_length} must be divisible by {split} (context parallel"
                f"{' x tensor parallel under sequence parallel' if p.sequence_parallel else ''}), "
                "since text tokens are split like video tokens"
            )

    def _validate_dit(self, m: OpenSoraDiTConfig) -> None:
        """What the v1.2 / v1.3 DiT needs of the VAE, the shape and the layout."""
        latent_channels = self.vae.latent_channels
        if self.data.has_source and m.in_channels != latent_channels:  # a stage that encodes
            raise ConfigError(
                f"model.in_channels={m.in_channels} but vae ({self.vae.kind} {self.vae.flavor}) gives "
                f"{latent_channels} latent channels; set model.in_channels and model.out_channels to "
                f"{latent_channels} (v1.2 CausalVAE: 4, v1.3 WF-VAE 4x8x8: 8) or pick the matching VAE"
            )
        if m.sparse_n > 1:
            if not m.sparse_blocks:
                raise ConfigError(
                    f"model.sparse_n={m.sparse_n} but model.sparse_start={m.sparse_start} / sparse_stop="
                    f"{m.sparse_stop} select no block of {m.num_layers}; widen the range or set sparse_n=1"
                )
            t, h, w = self.latent_grid
            tokens = t * (h // m.patch_size) * (w // m.patch_size)
            if tokens < m.sparse_n**2:
                raise ConfigError(
                    f"model.sparse_n={m.sparse_n}: Skiparse splits the video into {m.sparse_n} groups of at least "
                    f"{m.sparse_n} tokens, but the largest sample (shape {self.shape.num_frames}x"
                    f"{self.shape.height}x{self.shape.width}) has {tokens} tokens; lower model.sparse_n to at "
                    f"most {int(tokens**0.5)} or train larger samples"
                )
        if self.features.cache_dir is None and self.data.has_source and self.text.pooled is not None:
            raise ConfigError(
                "model.family=opensora_dit reads only token states (no pooled text); remove text.pooled"
            )

    def _validate_overlap(self) -> None:
        """Communication overlap settings that cannot run together."""
        p, t = self.parallel, self.training
        if p.bucket_size is not None and p.bucket_size < 1:
            raise ConfigError(f"parallel.bucket_size must be >= 1 parameters (or null), got {p.bucket_size}")
        if p.overlap_grad_reduce and t.clip.mode == "batch_drop":
            raise ConfigError(
                "parallel.overlap_grad_reduce=true reduces gradients during the backward pass, but "
                "training.clip.mode=batch_drop weighs each rank's unreduced gradients after it; set "
                "parallel.overlap_grad_reduce=false (or null) or choose another clip mode"
            )
        if p.overlap_param_gather:
            if p.overlap_grad_reduce is False:
                raise ConfigError(
                    "parallel.overlap_param_gather=true needs parallel.overlap_grad_reduce (true or null)"
                )
            if not t.optimizer.distributed_optimizer:
                raise ConfigError(
                    "parallel.overlap_param_gather=true gathers the distributed optimizer's parameter shards; "
                    "set training.optimizer.distributed_optimizer=true or parallel.overlap_param_gather=false"
                )
            if t.clip.mode == "batch_drop" and p.overlap_grad_reduce is None:
                raise ConfigError(
                    "parallel.overlap_param_gather=true needs overlap_grad_reduce, which "
                    "training.clip.mode=batch_drop turns off; set parallel.overlap_param_gather=false"
                )

    def micro_batches_per_step(self, data_parallel_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank; the interleaved pipeline
        schedule (virtual_pipeline) runs them in groups of pipeline_parallel, so it needs a multiple."""
        micro_batches = self.training.accumulation_steps(data_parallel_size)
        p = self.parallel
        if p.virtual_pipeline is not None and micro_batches % p.pipeline_parallel != 0:
            raise ConfigError(
                f"parallel.virtual_pipeline: the interleaved schedule needs the micro-batches per step "
                f"(global_batch_size / (micro_batch_size x data-parallel size {data_parallel_size}) = "
                f"{micro_batches}) to be a multiple of parallel.pipeline_parallel={p.pipeline_parallel}; "
                "change training.global_batch_size or micro_batch_size, or unset virtual_pipeline"
            )
        return micro_batches


def _text_width(text: TextEncoderPairConfig) -> int | None:
    """Token-state width of the configured context encoder, read from its config.json."""
    import json

    path = text.context.model_path()
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    data = json.loads(cfg_file.read_text())
    return data.get("d_model") or data.get("hidden_size")


def build_config(
    data: dict[str, Any], overrides: list[str] | None = None, check_files: bool = True
) -> ExperimentConfig:
    """Mapping (+ dotted overrides) -> validated ExperimentConfig, expanding `model.flavor`
    (`check_files`: see `ExperimentConfig.validate`)."""
    data = apply_overrides(data, list(overrides or []))
    data = {**data, "model": model_config_from_dict(dict(data.get("model") or {}))}
    cfg = from_dict(ExperimentConfig, data)
    if "shape" not in data:
        derive_shape(cfg)
    cfg.validate(check_files)
    return cfg


def derive_shape(cfg: ExperimentConfig) -> None:
    """Set `shape` (the largest sample, used by validation and the FLOP count) from the data rules
    and the text encoder, when the config has a data list and sets no `shape` of its own."""
    if not cfg.data.has_source:
        return
    cfg.shape = ShapeConfig(
        num_frames=cfg.data.num_frames,
        height=cfg.data.max_height,
        width=cfg.data.max_width,
        text_length=cfg.text.context.max_length,
    )


def load_config(
    path: str | Path, overrides: list[str] | None = None, check_files: bool = True
) -> ExperimentConfig:
    """Read a YAML config (with `base:` parents), apply overrides, validate (`check_files`: see
    `ExperimentConfig.validate`)."""
    return build_config(read_yaml_with_bases(path), overrides, check_files)
