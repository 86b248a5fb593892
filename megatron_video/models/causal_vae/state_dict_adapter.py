"""Open-Sora-Plan v1.2 CausalVideoVAE checkpoints <-> our CausalVAE state dict.

Our module tree is the released one, so keys map one to one (`encoder.down.1.downsample.conv.conv.weight`,
`decoder.up.3.upsample.conv.conv.weight`, `quant_conv.conv.weight`, ...). This module checks them
against the config (every missing, unknown or misshaped key named), translates `config.json`, and
reads and writes the two released file layouts with the WF-VAE helpers (diffusers-style folder;
training `.ckpt` with `state_dict.gen_model` and a `module.`-prefixed `ema_state_dict`, EMA preferred).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_video.errors import CheckpointMismatch, ConfigError
from megatron_video.models.causal_vae.config import CausalVAEConfig
from megatron_video.models.causal_vae.model import CausalVAE
from megatron_video.models.wfvae.state_dict_adapter import (
    read_folder,
    read_training_checkpoint,
    write_folder,
    write_training_checkpoint,
)

_FIELDS = (
    "hidden_size",
    "hidden_size_mult",
    "z_channels",
    "embed_dim",
    "num_res_blocks",
    "use_quant_layer",
    "dropout",
    "encoder_conv_in",
    "encoder_resnet_blocks",
    "encoder_spatial_downsample",
    "decoder_spatial_upsample",
    "norm_type",
)
# Released fields whose only supported value is fixed here (None: any length-matched list of "").
_FIXED = {
    "double_z": True,
    "q_conv": "CausalConv3d",
    "encoder_conv_out": "CausalConv3d",
    "decoder_conv_in": "CausalConv3d",
    "decoder_conv_out": "CausalConv3d",
    "encoder_attention": "AttnBlock3DFix",
    "decoder_attention": "AttnBlock3DFix",
    "encoder_mid_resnet": "ResnetBlock3D",
    "decoder_mid_resnet": "ResnetBlock3D",
    "attn_resolutions": [],
}
_EMPTY_LISTS = ("encoder_temporal_downsample", "decoder_temporal_upsample")
_RUNTIME_KEYS = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "model_id",
    "from_pretrained",
    "dtype",
    "use_tiling",
    "tile_overlap_factor",
    "tile_sample_min_size",
    "tile_sample_min_size_t",
    "tile_latent_min_size_t",
    "vae_scale_factor",
    "resolution",
    "in_channels",
    "out_channels",
    "loss_type",
    "loss_params",
    "lr",
}


def config_from_open_sora_plan(released: dict, **overrides) -> CausalVAEConfig:
    """Our config from a released `config.json`; fields it leaves out take the v1.2 release values."""
    unknown = sorted(
        set(released)
        - set(_FIELDS)
        - set(_FIXED)
        - set(_EMPTY_LISTS)
        - _RUNTIME_KEYS
        - {"decoder_resnet_blocks"}
    )
    if unknown:
        raise ConfigError(f"CausalVAE config.json has fields this implementation does not know: {unknown}")
    for key, value in _FIXED.items():
        if key in released and released[key] != value:
            raise ConfigError(
                f"CausalVAE {key}={released[key]!r} is not supported (the v1.2 release uses {value!r})"
            )
    for key in _EMPTY_LISTS:
        if any(released.get(key, [])):
            raise ConfigError(f"CausalVAE {key}={released[key]} is not supported (v1.2 uses none: all '')")
    if any(b != "ResnetBlock3D" for b in released.get("decoder_resnet_blocks", [])):
        raise ConfigError(
            f"CausalVAE decoder_resnet_blocks={released['decoder_resnet_blocks']}: only ResnetBlock3D"
        )
    fields = {
        k: (list(released[k]) if isinstance(released[k], list | tuple) else released[k])
        for k in _FIELDS
        if k in released
    }
    cfg = CausalVAEConfig(flavor="custom", **{**fields, **overrides})
    cfg.validate()
    return cfg


def config_to_open_sora_plan(cfg: CausalVAEConfig) -> dict:
    """The `config.json` of the released `CausalVAEModel` for `cfg`."""
    n = len(cfg.hidden_size_mult)
    out: dict = {"_class_name": "CausalVAEModel"}
    out.update({k: (list(v) if isinstance(v := getattr(cfg, k), list) else v) for k in _FIELDS})
    out.update({k: (list(v) if isinstance(v, list) else v) for k, v in _FIXED.items()})
    out.update({k: [""] * n for k in _EMPTY_LISTS})
    out["decoder_resnet_blocks"] = ["ResnetBlock3D"] * n
    return out


def expected_shapes(cfg: CausalVAEConfig) -> dict[str, tuple[int, ...]]:
    """Every key of our state dict for `cfg` with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = CausalVAE(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def from_open_sora_plan(
    released: dict[str, torch.Tensor], cfg: CausalVAEConfig, strict: bool = True
) -> dict[str, torch.Tensor]:
    """A released state dict -> ours (the same keys), checked against `cfg` when `strict`."""
    state = dict(released)
    if strict:
        expected = expected_shapes(cfg)
        problems = [f"missing: {k} {s}" for k, s in expected.items() if k not in state]
        problems += [f"unexpected: {k} {tuple(v.shape)}" for k, v in state.items() if k not in expected]
        problems += [
            f"shape: {k} checkpoint {tuple(state[k].shape)} vs model {s}"
            for k, s in expected.items()
            if k in state and tuple(state[k].shape) != s
        ]
        if problems:
            raise CheckpointMismatch(
                f"Open-Sora-Plan CausalVAE checkpoint does not match the config ({cfg.flavor}):\n  "
                + "\n  ".join(problems)
            )
    return state


def to_open_sora_plan(state: dict[str, torch.Tensor], cfg: CausalVAEConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the released layout (the same keys, copied)."""
    return {k: v.clone() for k, v in state.items()}


def load_open_sora_plan(
    path: str | Path, cfg: CausalVAEConfig | None = None, prefer_ema: bool = True, strict: bool = True
) -> tuple[CausalVAEConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) from a released folder (config from its config.json unless `cfg`
    is given) or a training `.ckpt` / weights file (then `cfg` is required)."""
    path = Path(path)
    if path.is_dir():
        released_cfg, weights = read_folder(path)
        cfg = cfg or config_from_open_sora_plan(released_cfg)
    else:
        if cfg is None:
            raise ConfigError(f"{path} carries no config; pass cfg (e.g. CausalVAEConfig.from_flavor(...))")
        weights = read_training_checkpoint(path, prefer_ema)
    return cfg, from_open_sora_plan(weights, cfg, strict)


def save_open_sora_plan_folder(
    path: str | Path, state: dict[str, torch.Tensor], cfg: CausalVAEConfig
) -> None:
    """Our state dict as a released-layout folder (config.json + safetensors)."""
    write_folder(path, config_to_open_sora_plan(cfg), to_open_sora_plan(state, cfg))


def save_open_sora_plan_checkpoint(
    path: str | Path,
    state: dict[str, torch.Tensor],
    cfg: CausalVAEConfig,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Our state dict (and optionally its EMA) as a released-layout training `.ckpt`."""
    ema = None if ema_state is None else to_open_sora_plan(ema_state, cfg)
    write_training_checkpoint(path, to_open_sora_plan(state, cfg), ema)
