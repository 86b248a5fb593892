"""Open-Sora-Plan v1.2 / v1.3 released checkpoints <-> our OpenSoraDiT state dict.

The released layout is a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`, or
a `.bin` read with weights_only=True) written by `OpenSoraT2V[_v1_3]` / `OpenSoraInpaint[_v1_3]`:
`transformer_blocks.<i>.attn1.to_q`, `adaln_single.emb.timestep_embedder.linear_1`, ... (reference
section 1.6). Ours fuses the self-attention q/k/v and the cross-attention k/v with rows laid out per
head ([head, (q, k, v), head_dim]), which a tensor-parallel split cuts into whole heads; block
names are global (`blocks.<i>.`) so a pipeline chunk loads its subset of the same dict, and
`parallel.tensor_parallel_state` splits it for any TP rank (`shard_state_dict` along the model's
`partition_dims`) and merges the shards back (`merge_state_dicts`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_video.errors import CheckpointMismatch, ConfigError
from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.suv.state_dict_adapter import check_against_model
from megatron_video.models.wfvae.state_dict_adapter import read_folder, write_folder

__all__ = [
    "check_against_model",
    "config_from_open_sora_plan",
    "config_to_open_sora_plan",
    "expected_open_sora_plan_keys",
    "from_open_sora_plan",
    "init_i2v_from_t2v",
    "load_open_sora_plan",
    "save_open_sora_plan_folder",
    "to_open_sora_plan",
]

_CLASSES = {
    ("v1.2", False): "OpenSoraT2V",
    ("v1.2", True): "OpenSoraInpaint",
    ("v1.3", False): "OpenSoraT2V_v1_3",
    ("v1.3", True): "OpenSoraInpaint_v1_3",
}
# The released v1.3 code hard-codes Skiparse on blocks 1 < i < 30.
_RELEASED_SPARSE_STOP = 30


def _masked_video_name(cfg: OpenSoraDiTConfig) -> str:
    return "pos_embed_masked_video" if cfg.version == "v1.2" else "pos_embed_masked_hidden_states"


def _entries(cfg: OpenSoraDiTConfig, inpaint: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(our key, released keys): one released key is copied, several are fused per head."""
    entries: list[tuple[str, tuple[str, ...]]] = []

    def add(ours: str, theirs: list[str], suffixes=("weight", "bias")) -> None:
        entries.extend((f"{ours}.{s}", tuple(f"{t}.{s}" for t in theirs)) for s in suffixes)

    qkv = ("weight", "bias") if cfg.attention_bias else ("weight",)
    add("patch_embed.proj", ["pos_embed.proj"])
    add("caption_projection.linear_1", ["caption_projection.linear_1"])
    add("caption_projection.linear_2", ["caption_projection.linear_2"])
    for lin in ("linear_1", "linear_2"):
        add(f"adaln_single.timestep_embedder.{lin}", [f"adaln_single.emb.timestep_embedder.{lin}"])
    add("adaln_single.linear", ["adaln_single.linear"])
    for i in range(cfg.num_layers):
        o, r = f"blocks.{i}.", f"transformer_blocks.{i}."
        entries.append((o + "scale_shift_table", (r + "scale_shift_table",)))
        add(o + "self_attn.linear_qkv", [r + "attn1.to_q", r + "attn1.to_k", r + "attn1.to_v"], qkv)
        add(o + "self_attn.linear_proj", [r + "attn1.to_out.0"])
        add(o + "cross_attn.linear_q", [r + "attn2.to_q"], qkv)
        add(o + "cross_attn.linear_kv", [r + "attn2.to_k", r + "attn2.to_v"], qkv)
        add(o + "cross_attn.linear_proj", [r + "attn2.to_out.0"])
        add(o + "ff.linear_fc1", [r + "ff.net.0.proj"])
        add(o + "ff.linear_fc2", [r + "ff.net.2"])
    entries.append(("scale_shift_table", ("scale_shift_table",)))
    add("proj_out", ["proj_out"])
    if inpaint:
        masked = _masked_video_name(cfg)
        add("inpaint.masked_video_embed.proj", [f"{masked}.0.proj"])
        add("inpaint.masked_video_proj", [f"{masked}.1"], ("weight",))
        add("inpaint.mask_embed.proj", ["pos_embed_mask.0.proj"])
        add("inpaint.mask_proj", ["pos_embed_mask.1"], ("weight",))
    return entries


def _fuse_heads(parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    """n tensors [h*d, ...] -> [h*n*d, ...] laid out per head."""
    per_head = [t.reshape(heads, -1, *t.shape[1:]) for t in parts]
    return torch.stack(per_head, dim=1).reshape(-1, *parts[0].shape[1:])


def _split_heads(fused: torch.Tensor, heads: int, n: int) -> list[torch.Tensor]:
    """Inverse of `_fuse_heads`."""
    parts = fused.reshape(heads, n, -1, *fused.shape[1:]).unbind(dim=1)
    return [p.reshape(-1, *fused.shape[1:]).contiguous() for p in parts]


def _mismatch(what: str, missing, unexpected) -> CheckpointMismatch:
    return CheckpointMismatch(
        what
        + (f"\n  missing: {sorted(missing)}" if missing else "")
        + (f"\n  unexpected: {sorted(unexpected)}" if unexpected else "")
    )


def expected_open_sora_plan_keys(cfg: OpenSoraDiTConfig, inpaint: bool = False) -> set[str]:
    """Every tensor name of a released checkpoint of `cfg` (687 for the 2.7B T2V, 693 for I2V)."""
    return {k for _, theirs in _entries(cfg, inpaint) for k in theirs}


def to_open_sora_plan(
    state: dict[str, torch.Tensor], cfg: OpenSoraDiTConfig, inpaint: bool | None = None
) -> dict[str, torch.Tensor]:
    """Our full (TP = 1, all blocks) state dict -> the released layout.

    `inpaint` defaults to whether `state` holds the I2V conditioning. Raises CheckpointMismatch
    naming every missing and unexpected key of ours.
    """
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    if inpaint is None:
        inpaint = any(k.startswith("inpaint.") for k in state)
    entries = _entries(cfg, inpaint)
    missing = [ours for ours, _ in entries if ours not in state]
    unexpected = set(state) - {ours for ours, _ in entries}
    if missing or unexpected:
        raise _mismatch("our state dict does not match the Open-Sora-Plan DiT config:", missing, unexpected)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in entries:
        if len(theirs) == 1:
            out[theirs[0]] = state[ours].clone()
        else:
            out.update(zip(theirs, _split_heads(state[ours], cfg.num_heads, len(theirs))))
    return out


def from_open_sora_plan(
    released: dict[str, torch.Tensor],
    cfg: OpenSoraDiTConfig,
    inpaint: bool | None = None,
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """The released layout -> our full (TP = 1) state dict.

    `inpaint` defaults to whether the checkpoint holds `pos_embed_mask.*`. With `strict`, any
    missing or unexpected released key raises CheckpointMismatch listing them all.
    """
    if inpaint is None:
        inpaint = any(k.startswith("pos_embed_mask.") for k in released)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()
    for ours, theirs in _entries(cfg, inpaint):
        absent = [k for k in theirs if k not in released]
        if absent:
            missing += absent
            continue
        used.update(theirs)
        parts = [released[k] for k in theirs]
        out[ours] = parts[0] if len(parts) == 1 else _fuse_heads(parts, cfg.num_heads)
    unexpected = set(released) - used
    if strict and (missing or unexpected):
        raise _mismatch(
            f"Open-Sora-Plan {cfg.version} {'I2V' if inpaint else 'T2V'} checkpoint does not match the config:",
            missing,
            unexpected,
        )
    return out


def init_i2v_from_t2v(
    t2v_state: dict[str, torch.Tensor], i2v_state: dict[str, torch.Tensor], load_mask: bool = False
) -> dict[str, torch.Tensor]:
    """An I2V state dict initialised from T2V weights as the release does it.

    Every T2V tensor is copied; the masked-video patch embedding starts as a copy of the patch
    embedding (the release's loaders test for a key that never exists, so they always copy), the
    mask patch embedding too with `load_mask` (v1.2 only, where it has the latent channel count);
    the zero-initialised projections and everything else come from `i2v_state` (a fresh I2V model).
    """
    out = {k: v.clone() for k, v in i2v_state.items() if not k.endswith("_extra_state")}
    out.update({k: v.clone() for k, v in t2v_state.items() if k in out})
    sources = ["masked_video_embed"] + (["mask_embed"] if load_mask else [])
    for name in sources:
        for suffix in ("weight", "bias"):
            key = f"inpaint.{name}.proj.{suffix}"
            if out[key].shape != t2v_state[f"patch_embed.proj.{suffix}"].shape:
                raise CheckpointMismatch(
                    f"{key} {tuple(out[key].shape)} cannot start from the patch embedding"
                )
            out[key] = t2v_state[f"patch_embed.proj.{suffix}"].clone()
    return out


# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------

# Field -> the only value this implementation runs (the released models' value).
_REQUIRED = {
    "activation_fn": "gelu-approximate",
    "norm_elementwise_affine": False,
    "only_cross_attention": False,
    "double_self_attention": False,
}
_REQUIRED_V12 = {
    "norm_type": "ada_norm_single",
    "use_rope": True,
    "downsampler": None,
    "attention_type": "default",
}


def _v12_default_scales(released: dict) -> tuple[float, float, float]:
    """v1.2's interpolation scales when config.json leaves them null (from sample_size)."""
    size = released.get("sample_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    t = released.get("sample_size_t")
    scale_t = ((t - 1) // 16 + 1) if t % 2 == 1 else t / 16
    return float(scale_t), h / 30, w / 40


def config_from_open_sora_plan(released: dict, **overrides) -> tuple[OpenSoraDiTConfig, int | None]:
    """(our config, I2V mask channels or None) from a released `config.json`; `overrides` win."""
    class_name = released.get("_class_name")
    found = {name: key for key, name in _CLASSES.items()}
    if class_name not in found:
        raise ConfigError(f"config.json _class_name '{class_name}' is none of {sorted(found)}")
    version, inpaint = found[class_name]
    required = {**_REQUIRED, **(_REQUIRED_V12 if version == "v1.2" else {})}
    wrong = {k: released[k] for k, v in required.items() if k in released and released[k] != v}
    if wrong:
        raise ConfigError(
            f"config.json fields this implementation does not run: {wrong}; it needs {required}"
        )
    heads, head_dim = released["num_attention_heads"], released["attention_head_dim"]
    cross = released.get("cross_attention_dim")
    if cross is not None and cross != heads * head_dim:
        raise ConfigError(f"config.json cross_attention_dim={cross} must equal the width {heads * head_dim}")
    scales = [released.get(f"interpolation_scale_{a}") for a in "thw"]
    if version == "v1.2" and None in scales:
        scales = [s if s is not None else d for s, d in zip(scales, _v12_default_scales(released))]
    scales = [1.0 if s is None else float(s) for s in scales]
    layers = released["num_layers"]
    sparse = version == "v1.3" and released.get("sparse1d", False)
    fields = dict(
        version=version,
        num_layers=layers,
        num_heads=heads,
        head_dim=head_dim,
        in_channels=released["in_channels"],
        out_channels=released.get("out_channels") or released["in_channels"],
        patch_size=released.get("patch_size", 2),
        patch_size_t=released.get("patch_size_t", 1),
        caption_channels=released["caption_channels"],
        norm_eps=released.get("norm_eps", 1e-6 if version == "v1.3" else 1e-5),
        attention_bias=released.get("attention_bias", version == "v1.3"),
        interpolation_scale_t=scales[0],
        interpolation_scale_h=scales[1],
        interpolation_scale_w=scales[2],
        sparse_n=released.get("sparse_n", 2) if sparse else 1,
    )
    if version == "v1.3":  # the release's rule, 1 < i < 30, as our block range
        fields.update(sparse_start=2, sparse_stop=-2 if layers == 32 else min(_RELEASED_SPARSE_STOP, layers))
    cfg = OpenSoraDiTConfig(flavor="2.7B", **{**fields, **overrides})
    cfg.validate()
    mask_channels = released.get("vae_scale_factor_t", 4) if inpaint else None
    if inpaint and version == "v1.2" and mask_channels != cfg.in_channels:
        raise ConfigError(
            f"v1.2 I2V embeds the mask with in_channels={cfg.in_channels} input channels, so it only runs "
            f"with vae_scale_factor_t equal to it (got {mask_channels})"
        )
    return cfg, mask_channels


def config_to_open_sora_plan(
    cfg: OpenSoraDiTConfig,
    inpaint_mask_channels: int | None = None,
    sample_size: tuple[int, int] = (60, 80),
    sample_size_t: int = 24,
) -> dict:
    """The `config.json` the release writes for `cfg` (sample sizes describe training only)."""
    stop = cfg.sparse_stop if cfg.sparse_stop >= 0 else cfg.num_layers + cfg.sparse_stop
    released_stop = min(_RELEASED_SPARSE_STOP, cfg.num_layers)
    if cfg.sparse_n > 1 and (
        cfg.version != "v1.3" or cfg.sparse_start != 2 or min(stop, cfg.num_layers) != released_stop
    ):
        raise ConfigError(
            f"Skiparse on blocks {list(cfg.sparse_blocks)} has no released config.json form (v1.3 only, "
            f"blocks 2..{released_stop - 1})"
        )
    out = {
        "_class_name": _CLASSES[cfg.version, inpaint_mask_channels is not None],
        "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "patch_size": cfg.patch_size,
        "patch_size_t": cfg.patch_size_t,
        "caption_channels": cfg.caption_channels,
        "cross_attention_dim": cfg.hidden_size,
        "activation_fn": "gelu-approximate",
        "attention_bias": cfg.attention_bias,
        "norm_elementwise_affine": False,
        "norm_eps": cfg.norm_eps,
        "only_cross_attention": False,
        "double_self_attention": False,
        "upcast_attention": False,
        "dropout": 0.0,
        "interpolation_scale_t": cfg.interpolation_scale_t,
        "interpolation_scale_h": cfg.interpolation_scale_h,
        "interpolation_scale_w": cfg.interpolation_scale_w,
        "sample_size_t": sample_size_t,
    }
    if cfg.version == "v1.2":
        out.update(
            norm_type="ada_norm_single",
            norm_num_groups=32,
            num_embeds_ada_norm=1000,
            use_rope=True,
            attention_mode="xformers",
            attention_type="default",
            downsampler=None,
            use_linear_projection=False,
            use_additional_conditions=False,
            num_vector_embeds=None,
            use_stable_fp32=False,
            sample_size=list(sample_size),
        )
    else:
        out.update(
            sparse1d=cfg.sparse_n > 1,
            sparse_n=cfg.sparse_n,
            sample_size_h=list(sample_size),
            sample_size_w=list(sample_size),
        )
    if inpaint_mask_channels is not None:
        out["vae_scale_factor_t"] = inpaint_mask_channels
    return out


# --------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------


def load_open_sora_plan(
    path: str | Path, strict: bool = True, **overrides
) -> tuple[OpenSoraDiTConfig, int | None, dict[str, torch.Tensor]]:
    """(config, I2V mask channels or None, our full state dict) from a released folder."""
    released_cfg, weights = read_folder(path)
    cfg, mask_channels = config_from_open_sora_plan(released_cfg, **overrides)
    return cfg, mask_channels, from_open_sora_plan(weights, cfg, mask_channels is not None, strict)


def save_open_sora_plan_folder(
    path: str | Path,
    state: dict[str, torch.Tensor],
    cfg: OpenSoraDiTConfig,
    inpaint_mask_channels: int | None = None,
    **sample_sizes,
) -> None:
    """Our full state dict as a released folder (config.json + diffusion_pytorch_model.safetensors)."""
    config = config_to_open_sora_plan(cfg, inpaint_mask_channels, **sample_sizes)
    write_folder(path, config, to_open_sora_plan(state, cfg, inpaint_mask_channels is not None))
