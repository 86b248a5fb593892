"""Open-Sora-Plan v1.2 / v1.3 DiT hyper-parameters, size presets and version presets.

The defaults are the released v1.3 2.7B geometry ("OpenSoraT2V_v1_3-2B/122"). `FLAVORS` maps a size
name to the fields that differ from the defaults, `VERSIONS` a release to its own fields (latent
channels of its VAE, Skiparse). `OpenSoraDiTConfig.from_flavor("tiny", version="v1.2")` builds one;
explicit overrides win over both presets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from megatron_video.errors import ConfigError


@dataclass
class OpenSoraDiTConfig:
    """Geometry and options of the v1.2 / v1.3 denoiser (AdaLN-single DiT with cross-attention)."""

    family: Literal["opensora_dit"] = "opensora_dit"
    """Model family tag: set `model.family: opensora_dit` in a config to train this model."""

    flavor: str = "2.7B"
    """Name of the size preset the other fields start from (a key of `FLAVORS`)."""

    version: Literal["v1.2", "v1.3"] = "v1.3"
    """Release the model follows: its checkpoint key names and, through `VERSIONS`, its defaults."""

    num_layers: int = 32
    """Transformer blocks."""

    num_heads: int = 24
    """Attention heads; must be divisible by tensor_parallel x context_parallel."""

    head_dim: int = 96
    """Channels per head; a multiple of 6 (3D RoPE splits it in three equal parts, each rotated in halves)."""

    in_channels: int = 8
    """Latent channels of the VAE (v1.2 CausalVAE: 4, v1.3 WF-VAE: 8)."""

    out_channels: int = 8
    """Predicted channels (epsilon for v1.2, v for v1.3), normally equal to `in_channels`."""

    patch_size: int = 2
    """Spatial patch (Conv2d kernel and stride) of the patch embedding."""

    patch_size_t: int = 1
    """Temporal patch; the released models use 1 (frame-wise patch embedding)."""

    caption_channels: int = 4096
    """Per-token text feature width (mT5-XXL last hidden state)."""

    timestep_freq_dim: int = 256
    """Width of the sinusoidal timestep features fed to AdaLN-single."""

    ff_mult: int = 4
    """FFN hidden width as a multiple of the model width."""

    norm_eps: float = 1e-6
    """Epsilon of the (affine-free) LayerNorms."""

    attention_bias: bool = True
    """Bias on the q/k/v projections (the output projections are always biased)."""

    interpolation_scale_t: float = 1.0
    """RoPE position divisor along time."""

    interpolation_scale_h: float = 1.0
    """RoPE position divisor along height (v1.2 720p releases: 1.5)."""

    interpolation_scale_w: float = 1.0
    """RoPE position divisor along width (v1.2 720p releases: 2.0)."""

    rope_angle_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype RoPE angles are rounded to before cos / sin. The released code rounds them to the
    token dtype (bf16 / fp16 at inference); float32 is exact, the others reproduce that quirk."""

    sparse_n: int = 4
    """Skiparse sparsity k of the sparse blocks (1 = every block dense, as v1.2)."""

    sparse_start: int = 2
    """First Skiparse block (the release: 2)."""

    sparse_stop: int = -2
    """One past the last Skiparse block; negative counts from the end (the release: -2, blocks
    2..L-3; its code hard-codes 30 for 32 layers). Even blocks use Single-Skip, odd Group-Skip."""

    recompute: Literal["none", "full", "ffn"] = "none"
    """Activation recompute: whole blocks, only the FFN part, or nothing."""

    recompute_num_layers: int | None = None
    """Recompute only the first N blocks; None means every block."""

    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear weights."""

    @property
    def hidden_size(self) -> int:
        """Model width D = num_heads x head_dim."""
        return self.num_heads * self.head_dim

    @property
    def total_layers(self) -> int:
        """Blocks (the name the parallel setup reads for every model family)."""
        return self.num_layers

    @property
    def sparse_blocks(self) -> range:
        """Indices of the Skiparse blocks (empty when sparse_n = 1)."""
        if self.sparse_n == 1:
            return range(0)
        stop = self.sparse_stop if self.sparse_stop >= 0 else self.num_layers + self.sparse_stop
        return range(self.sparse_start, min(stop, self.num_layers))

    @property
    def block_sparse_n(self) -> list[int]:
        """Skiparse sparsity of every block, in order (1 = dense)."""
        sparse = self.sparse_blocks
        return [self.sparse_n if i in sparse else 1 for i in range(self.num_layers)]

    @classmethod
    def from_flavor(cls, name: str, **overrides) -> OpenSoraDiTConfig:
        """The preset `name` (and `version`'s preset) with `overrides` applied on top."""
        return dataclasses.replace(cls(), **with_flavor({"flavor": name, **overrides}))

    def validate(self) -> None:
        """Raise ConfigError when the geometry cannot be built."""
        for name in ("num_layers", "num_heads", "head_dim", "in_channels", "out_channels", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim % 6 != 0:
            raise ConfigError(
                f"model.head_dim={self.head_dim} must be a multiple of 6 (3D RoPE splits it in three "
                "equal parts and rotates each in two halves)"
            )
        if self.patch_size_t != 1:
            raise ConfigError(
                f"model.patch_size_t={self.patch_size_t}: the DiT embeds frame by frame; set it to 1"
            )
        if self.sparse_n < 1:
            raise ConfigError(f"model.sparse_n must be >= 1, got {self.sparse_n}")
        if self.sparse_start < 0:
            raise ConfigError(f"model.sparse_start must be >= 0, got {self.sparse_start}")
        if self.recompute_num_layers is not None and not 0 <= self.recompute_num_layers <= self.num_layers:
            raise ConfigError(
                f"model.recompute_num_layers={self.recompute_num_layers} must be in [0, {self.num_layers}]"
            )


FLAVORS: dict[str, dict] = {
    # Tests and the CPU demo: 6 blocks (Skiparse on 2 and 3 under the release rule), MiniLM text width.
    "tiny": dict(num_layers=6, num_heads=4, head_dim=24, caption_channels=384, timestep_freq_dim=256),
    # The released v1.2 / v1.3 geometry: 32 blocks of 24 x 96 heads.
    "2.7B": dict(),
}

VERSIONS: dict[str, dict] = {
    # v1.2: CausalVAE 4x8x8 (4 channels), dense attention everywhere.
    "v1.2": dict(in_channels=4, out_channels=4, sparse_n=1),
    # v1.3: WF-VAE 4x8x8 (8 channels), Skiparse k = 4 on blocks 2..L-3.
    "v1.3": dict(in_channels=8, out_channels=8, sparse_n=4),
}


def with_flavor(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A `model` section's fields with its version's and flavor's presets under them:
    `{**VERSIONS[version], **FLAVORS[flavor], **fields}`."""
    flavor = fields.get("flavor", OpenSoraDiTConfig.flavor)
    version = fields.get("version", OpenSoraDiTConfig.version)
    if flavor not in FLAVORS:
        raise ConfigError(f"unknown model.flavor '{flavor}'; choose one of {sorted(FLAVORS)}")
    if version not in VERSIONS:
        raise ConfigError(f"unknown model.version '{version}'; choose one of {sorted(VERSIONS)}")
    return {**VERSIONS[version], **FLAVORS[flavor], **fields, "flavor": flavor, "version": version}
