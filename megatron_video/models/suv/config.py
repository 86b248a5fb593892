"""SUV (Sparse U-shaped MMDiT) hyper-parameters and size presets.

The defaults are the released Open-Sora-Plan v1.5 8.5B geometry. `FLAVORS` maps a name to the
fields that differ from those defaults; `SUVConfig.from_flavor("tiny", num_heads=8)` builds one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_video.errors import ConfigError


@dataclass
class SUVConfig:
    """Geometry and options of the SUV denoiser."""

    family: Literal["suv"] = "suv"
    """Model family tag (`model.family` in a config; the default family): the Open-Sora-Plan v1.5 SUV."""

    flavor: str = "8.5B"
    """Name of the size preset the other fields start from (a key of `FLAVORS`)."""

    num_layers: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 6, 4, 2])
    """Blocks per U-stage; an odd number of stages, mirrored around the middle one."""

    sparse_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 4, 2, 1])
    """Skiparse sparsity per stage (k in the Skiparse paper; 1 = dense attention); mirrored like `num_layers`."""

    num_heads: int = 24
    """Attention heads; must be divisible by tensor_parallel x context_parallel."""

    head_dim: int = 128
    """Channels per head; a multiple of 16 (3D RoPE splits it 4/16, 6/16, 6/16 over t, h, w)."""

    in_channels: int = 32
    """Latent channels of the VAE the model denoises."""

    out_channels: int = 32
    """Predicted channels (velocity), normally equal to `in_channels`."""

    patch_size: int = 2
    """Spatial patch (Conv2d kernel and stride) of the patch embedding."""

    patch_size_t: int = 1
    """Temporal patch; the released model uses 1 (frame-wise patch embedding)."""

    timestep_embed_dim: int = 1024
    """Width of the timestep + pooled-text embedding that drives AdaLN."""

    caption_channels: int = 2048
    """Per-token text feature width (T5-v1.1-XL last hidden state)."""

    pooled_projection_dim: int = 1280
    """Pooled text feature width (CLIP-ViT-bigG/14 text_embeds)."""

    ff_mult: int = 4
    """FFN hidden width as a multiple of the model width."""

    double_ff: bool = True
    """Separate FFN for the text stream (released); False shares one FFN over [video; text]."""

    skip_connection: bool = True
    """Long U-skips between mirrored stages (concat + Linear(2D->D)) for both streams."""

    skip_connection_zero_init: bool = True
    """Initialise skip linears to [I | 0] with no norm, so a new skip is the identity."""

    norm_eps: float = 1e-6
    """Epsilon of the LayerNorms and of the RMS QK-norm."""

    attention_bias: bool = True
    """Bias on the q/k/v and output projections of both streams."""

    interpolation_scale_t: float = 1.0
    """RoPE position divisor along time."""

    interpolation_scale_h: float = 1.0
    """RoPE position divisor along height."""

    interpolation_scale_w: float = 1.0
    """RoPE position divisor along width."""

    recompute: Literal["none", "full", "ffn"] = "none"
    """Activation recompute: whole blocks, only the FFN half, or nothing."""

    recompute_num_layers: int | None = None
    """Recompute only the first N blocks (counted over all stages); None means every block."""

    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear weights."""

    @property
    def hidden_size(self) -> int:
        """Model width D = num_heads x head_dim."""
        return self.num_heads * self.head_dim

    @property
    def total_layers(self) -> int:
        """Blocks over all stages."""
        return sum(self.num_layers)

    @property
    def block_sparse_n(self) -> list[int]:
        """Skiparse sparsity of every block, in order (its stage's `sparse_n`)."""
        return [n for layers, n in zip(self.num_layers, self.sparse_n) for _ in range(layers)]

    @classmethod
    def from_flavor(cls, name: str, **overrides) -> SUVConfig:
        """The preset `name` with `overrides` applied on top."""
        return dataclasses.replace(cls(), **with_flavor({"flavor": name, **overrides}))

    def validate(self) -> None:
        """Raise ConfigError when the geometry cannot be built."""
        n = len(self.num_layers)
        if n == 0 or n % 2 == 0:
            raise ConfigError(
                f"model.num_layers has {n} stages; the U-shape needs an odd number "
                "(encoder stages, one middle stage, mirrored decoder stages)"
            )
        if len(self.sparse_n) != n:
            raise ConfigError(
                f"model.sparse_n has {len(self.sparse_n)} entries but model.num_layers has {n}; "
                "give one sparsity per stage"
            )
        if any(x < 1 for x in self.num_layers):
            raise ConfigError(f"model.num_layers entries must be >= 1, got {self.num_layers}")
        if any(x < 1 for x in self.sparse_n):
            raise ConfigError(f"model.sparse_n entries must be >= 1, got {self.sparse_n}")
        if self.skip_connection:
            for i in range(n // 2):
                j = n - 1 - i
                if self.sparse_n[i] != self.sparse_n[j]:
                    raise ConfigError(
                        f"model.sparse_n must mirror around the middle stage for U-skips: stage {i} "
                        f"has sparse_n={self.sparse_n[i]} but stage {j} has sparse_n={self.sparse_n[j]}"
                    )
        if self.head_dim % 16 != 0:
            raise ConfigError(
                f"model.head_dim={self.head_dim} must be a multiple of 16 (3D RoPE splits it 4:6:6)"
            )
        for name in ("num_heads", "head_dim", "in_channels", "out_channels", "patch_size", "patch_size_t"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_size_t != 1:
            raise ConfigError(
                f"model.patch_size_t={self.patch_size_t}: SUV embeds frame by frame; set it to 1"
            )
        if self.recompute_num_layers is not None and not 0 <= self.recompute_num_layers <= self.total_layers:
            raise ConfigError(
                f"model.recompute_num_layers={self.recompute_num_layers} must be in "
                f"[0, {self.total_layers}] (the total number of blocks)"
            )

    def dense(self) -> SUVConfig:
        """The same geometry with every stage dense (sparse_n = 1)."""
        return dataclasses.replace(self, sparse_n=[1] * len(self.num_layers))


FLAVORS: dict[str, dict] = {
    # Tests and the CPU demo: two sparse levels (sparse_n = 2, 4), even blocks per stage, MiniLM text width.
    "tiny": dict(
        num_layers=[2, 2, 2, 2, 2],
        sparse_n=[1, 2, 4, 2, 1],
        num_heads=4,
        head_dim=16,
        in_channels=8,
        out_channels=8,
        timestep_embed_dim=64,
        caption_channels=384,
        pooled_projection_dim=384,
    ),
    # The 2B geometry of Open-Sora-Plan's GPU prototype branch (24 x 64 heads).
    "2B": dict(
        num_layers=[4, 4, 4, 1, 4, 4, 4],
        sparse_n=[1, 2, 4, 8, 4, 2, 1],
        num_heads=24,
        head_dim=64,
    ),
    # The released Open-Sora-Plan v1.5 model.
    "8.5B": dict(),
}


def with_flavor(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A `model` section's fields with its flavor's preset under them (the one place a flavor is
    expanded): `{**FLAVORS[flavor], **fields}`; the flavor defaults to `SUVConfig.flavor`."""
    flavor = fields.get("flavor", SUVConfig.flavor)
    if flavor not in FLAVORS:
        raise ConfigError(f"unknown model.flavor '{flavor}'; choose one of {sorted(FLAVORS)}")
    return {**FLAVORS[flavor], **fields, "flavor": flavor}
