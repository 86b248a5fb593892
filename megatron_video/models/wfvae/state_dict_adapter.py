"""Open-Sora-Plan WF-VAE checkpoints <-> our WF-VAE state dict.

Released layouts
    * diffusers-style folder (v1.3, `WFVAEModel.save_pretrained`): `config.json` with the
      constructor arguments (module names such as `l1_dowmsample_block`, `shift`, `scale`) and
      `diffusion_pytorch_model.safetensors` (or a `.bin`);
    * training `.ckpt` (v1.3 `train_causalvae.py`, v1.5 `wfvae_888_dim32.ckpt`):
      `{"state_dict": {"gen_model": ..., "dics_model": ...}, "ema_state_dict": {"module.<key>": ...}, ...}`.
      The original prefers `ema_state_dict` unless the environment sets NOT_USE_EMA_MODEL; here it
      is the `prefer_ema` argument.

Key names match ours one to one, except the fixed Haar filters: the release stores the forward 3D
transform as eight 1-channel convs (`<p>.h_conv.conv.weight`, ..., `<p>.gh_v_conv.conv.weight`),
the inverse 3D transform as eight buffers (`<p>.h`, ..., `<p>.gh_v`) and the 2D transforms as
four buffers (`<p>.aa`, `<p>.ad`, `<p>.da`, `<p>.dd`); ours stacks each set into `<p>.kernels`.
The v1.3.1 tag spells `wavelet_tranform_l1/_l2` and builds the outer transforms on the fly
(their filters are absent); both are accepted, and absent Haar filters take the released
constants. Every other missing or unknown key raises CheckpointMismatch with the full list.
Loading never unpickles arbitrary objects: safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_video.errors import CheckpointMismatch, ConfigError
from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.model import WFVAE, haar_2d_kernels, haar_3d_kernels

HAAR_3D_NAMES = ("h", "g", "hh", "gh", "h_v", "g_v", "hh_v", "gh_v")
"""Released names of the 3D Haar filters, in our subband order (LLL, LLH, ..., HHH)."""
HAAR_2D_NAMES = ("aa", "ad", "da", "dd")
"""Released names of the 2D Haar filters, in our subband order (LL, LH, HL, HH)."""

_MODULE_NAMES = {
    8: {
        "l1_dowmsample_block": "Spatial2xTime2x3DDownsample",
        "l1_downsample_wavelet": "HaarWaveletTransform3D",
        "l1_upsample_block": "Spatial2xTime2x3DUpsample",
        "l1_upsample_wavelet": "InverseHaarWaveletTransform3D",
    },
    4: {
        "l1_dowmsample_block": "Downsample",
        "l1_downsample_wavelet": "HaarWaveletTransform2D",
        "l1_upsample_block": "Upsample",
        "l1_upsample_wavelet": "InverseHaarWaveletTransform2D",
    },
}
_LEVEL2_NAMES = {
    "l2_dowmsample_block": "Spatial2xTime2x3DDownsample",
    "l2_downsample_wavelet": "HaarWaveletTransform3D",
    "l2_upsample_block": "Spatial2xTime2x3DUpsample",
    "l2_upsample_wavelet": "InverseHaarWaveletTransform3D",
}
_PLAIN_FIELDS = (
    "latent_dim",
    "base_channels",
    "encoder_num_resblocks",
    "decoder_num_resblocks",
    "encoder_energy_flow_hidden_size",
    "decoder_energy_flow_hidden_size",
    "connect_res_layer_num",
    "use_attention",
    "norm_type",
    "t_interpolation",
    "dropout",
    "shift",
    "scale",
)
# Constructor defaults of main's `WFVAEModel`, used for fields a config.json leaves out.
_RELEASE_DEFAULTS = dict(
    latent_dim=8,
    base_channels=128,
    encoder_num_resblocks=2,
    decoder_num_resblocks=2,
    encoder_energy_flow_hidden_size=64,
    decoder_energy_flow_hidden_size=128,
    connect_res_layer_num=1,
    use_attention=True,
    norm_type="groupnorm",
    t_interpolation="nearest",
    dropout=0.0,
)
# Keys of config.json / the mindspeed `ae` block that describe how to run, not the network.
_RUNTIME_KEYS = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "model_id",
    "from_pretrained",
    "dtype",
    "output_dtype",
    "use_tiling",
    "vae_scale_factor",
    "attention_type",
}

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")


# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------


def config_from_open_sora_plan(released: dict, **overrides) -> WFVAEConfig:
    """Our config from a released `config.json` (or the mindspeed `ae` block); `overrides` win."""
    unknown = sorted(
        set(released) - set(_PLAIN_FIELDS) - set(_MODULE_NAMES[8]) - set(_LEVEL2_NAMES) - _RUNTIME_KEYS
    )
    if unknown:
        raise ConfigError(f"WF-VAE config.json has fields this implementation does not know: {unknown}")
    attention = released.get("attention_type", "AttnBlock3DFix")
    if attention != "AttnBlock3DFix":
        raise ConfigError(
            f"WF-VAE attention_type='{attention}' is not supported; the released models use AttnBlock3DFix"
        )
    for key, name in _LEVEL2_NAMES.items():
        if released.get(key, name) != name:
            raise ConfigError(f"WF-VAE {key}='{released[key]}' is not supported (expected '{name}')")
    module_names = {k: released[k] for k in _MODULE_NAMES[8] if k in released}
    matches = [c for c, names in _MODULE_NAMES.items() if all(names[k] == v for k, v in module_names.items())]
    if not module_names:
        matches = [4]  # the WFVAEModel defaults are the 2D level-1 modules
    if len(matches) != 1:
        raise ConfigError(
            f"WF-VAE level-1 modules {module_names} match neither the 4x8x8 {_MODULE_NAMES[4]} "
            f"nor the 8x8x8 {_MODULE_NAMES[8]} layout"
        )
    compression = matches[0]
    factor = released.get("vae_scale_factor")
    if factor is not None and list(factor) != [compression, 8, 8]:
        raise ConfigError(f"WF-VAE vae_scale_factor={factor} contradicts the {compression}x8x8 modules")
    fields = {**_RELEASE_DEFAULTS, **{k: released[k] for k in _PLAIN_FIELDS if k in released}}
    latent = fields["latent_dim"]
    fields.setdefault("shift", [0.0] * latent)
    fields.setdefault("scale", [0.18215] * latent)
    fields["shift"], fields["scale"] = (
        [float(v) for v in fields["shift"]],
        [float(v) for v in fields["scale"]],
    )
    cfg = WFVAEConfig(flavor="custom", temporal_compression=compression, **{**fields, **overrides})
    cfg.validate()
    return cfg


def config_to_open_sora_plan(cfg: WFVAEConfig) -> dict:
    """The `config.json` of main's `WFVAEModel` for `cfg`."""
    out = {"_class_name": "WFVAEModel", "attention_type": "AttnBlock3DFix"}
    out.update({k: getattr(cfg, k) for k in _PLAIN_FIELDS})
    out["shift"], out["scale"] = list(cfg.shift), list(cfg.scale)
    out.update(_MODULE_NAMES[cfg.temporal_compression])
    out.update(_LEVEL2_NAMES)
    return out


# --------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------


def _haar_slots(cfg: WFVAEConfig):
    """(our prefix, released prefixes tried in order, kind) for the six Haar transforms."""
    l1_kind = "3d" if cfg.temporal_compression == 8 else "2d"
    for ours, kind in (
        ("encoder.wavelet_transform_in", "3d"),
        ("encoder.wavelet_transform_l1", l1_kind),
        ("encoder.wavelet_transform_l2", "3d"),
        ("decoder.inverse_wavelet_transform_out", "inv3d"),
        ("decoder.inverse_wavelet_transform_l1", "inv" + l1_kind),
        ("decoder.inverse_wavelet_transform_l2", "inv3d"),
    ):
        yield ours, (ours, ours.replace("wavelet_transform", "wavelet_tranform")), kind


def _haar_keys(prefix: str, kind: str) -> list[str]:
    if kind == "3d":
        return [f"{prefix}.{n}_conv.conv.weight" for n in HAAR_3D_NAMES]
    names = HAAR_3D_NAMES if kind == "inv3d" else HAAR_2D_NAMES
    return [f"{prefix}.{n}" for n in names]


def _haar_default(kind: str) -> torch.Tensor:
    return haar_3d_kernels() if kind.endswith("3d") else haar_2d_kernels()


def to_open_sora_plan(state: dict[str, torch.Tensor], cfg: WFVAEConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the released key layout (main / v1.5 spelling, every Haar filter present)."""
    out = {k: v.clone() for k, v in state.items()}
    for ours, _, kind in _haar_slots(cfg):
        kernels = out.pop(f"{ours}.kernels", None)
        if kernels is None:
            raise CheckpointMismatch(f"our state dict lacks '{ours}.kernels'")
        for key, k in zip(_haar_keys(ours, kind), kernels):
            out[key] = k[None].clone()
    return out


def from_open_sora_plan(
    released: dict[str, torch.Tensor], cfg: WFVAEConfig, strict: bool = True
) -> dict[str, torch.Tensor]:
    """A released state dict -> ours. With `strict`, missing, unknown or misshaped keys raise
    CheckpointMismatch naming every one (absent Haar filters take the released constants)."""
    rest = dict(released)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for ours, prefixes, kind in _haar_slots(cfg):
        found = None
        for prefix in prefixes:
            keys = _haar_keys(prefix, kind)
            present = [k for k in keys if k in rest]
            if present and len(present) < len(keys):
                missing += [k for k in keys if k not in rest]
            if present:
                found = [rest.pop(k) for k in present]
                break
        if found is None:
            out[f"{ours}.kernels"] = _haar_default(kind)
        elif len(found) == len(_haar_keys(ours, kind)):
            out[f"{ours}.kernels"] = torch.cat(found, dim=0)
    out.update(rest)
    if strict:
        _check(out, cfg, missing)
    return out


def expected_shapes(cfg: WFVAEConfig) -> dict[str, tuple[int, ...]]:
    """Every key of our state dict for `cfg` with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = WFVAE(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check(state: dict[str, torch.Tensor], cfg: WFVAEConfig, missing_released: list[str]) -> None:
    expected = expected_shapes(cfg)
    problems = [f"missing (released name): {k}" for k in missing_released]
    problems += [f"missing: {k} {s}" for k, s in expected.items() if k not in state]
    problems += [f"unexpected: {k} {tuple(v.shape)}" for k, v in state.items() if k not in expected]
    problems += [
        f"shape: {k} checkpoint {tuple(state[k].shape)} vs model {s}"
        for k, s in expected.items()
        if k in state and tuple(state[k].shape) != s
    ]
    if problems:
        raise CheckpointMismatch(
            f"Open-Sora-Plan WF-VAE checkpoint does not match the config ({cfg.flavor}):\n  "
            + "\n  ".join(problems)
        )


# --------------------------------------------------------------------------------------------------
# Files (shared with the CausalVAE adapter)
# --------------------------------------------------------------------------------------------------


def read_weights(path: str | Path) -> dict:
    """A safetensors file, or a torch pickle read with weights_only=True (no arbitrary objects)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises several types; name the file and the rule
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) (it holds objects other than "
            f"tensors and plain containers); convert it to safetensors. Cause: {e}"
        ) from e


def read_training_checkpoint(path: str | Path, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The generator weights of an Open-Sora-Plan VAE training `.ckpt`, in the released layout.

    `ema_state_dict` (leading `module.` removed) when present, non-empty and `prefer_ema`; else
    `state_dict.gen_model` (or `state_dict`); a flat state dict is returned as it is.
    """
    ckpt = read_weights(path)
    ema = ckpt.get("ema_state_dict")
    if prefer_ema and ema:
        return {k.removeprefix("module."): v for k, v in ema.items()}
    if "state_dict" in ckpt:
        inner = ckpt["state_dict"]
        return dict(inner.get("gen_model", inner))
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise CheckpointMismatch(f"{path} has neither 'ema_state_dict' nor 'state_dict': {sorted(ckpt)}")


def write_training_checkpoint(
    path: str | Path, gen_model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the `.ckpt` layout: state_dict.gen_model, and ema_state_dict with `module.` keys."""
    ckpt: dict = {"state_dict": {"gen_model": {k: v.contiguous() for k, v in gen_model.items()}}}
    if ema is not None:
        ckpt["ema_state_dict"] = {f"module.{k}": v.contiguous() for k, v in ema.items()}
    torch.save(ckpt, path)


def read_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json contents, weights) of a diffusers-style folder."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    for name in WEIGHT_FILES:
        if (path / name).exists():
            return config, read_weights(path / name)
    candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"{path}: expected one weight file ({', '.join(WEIGHT_FILES)}), found {[c.name for c in candidates]}"
        )
    return config, read_weights(candidates[0])


def write_folder(path: str | Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """Write config.json and diffusion_pytorch_model.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in weights.items()}, path / WEIGHT_FILES[0])


# --------------------------------------------------------------------------------------------------
# One-call loading and saving
# --------------------------------------------------------------------------------------------------


def load_open_sora_plan(
    path: str | Path, cfg: WFVAEConfig | None = None, prefer_ema: bool = True, strict: bool = True
) -> tuple[WFVAEConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) from a released folder (config from its config.json unless `cfg`
    is given) or a training `.ckpt` / weights file (then `cfg` is required)."""
    path = Path(path)
    if path.is_dir():
        released_cfg, weights = read_folder(path)
        cfg = cfg or config_from_open_sora_plan(released_cfg)
    else:
        if cfg is None:
            raise ConfigError(f"{path} carries no config; pass cfg (e.g. WFVAEConfig.from_flavor(...))")
        weights = read_training_checkpoint(path, prefer_ema)
    return cfg, from_open_sora_plan(weights, cfg, strict)


def save_open_sora_plan_folder(path: str | Path, state: dict[str, torch.Tensor], cfg: WFVAEConfig) -> None:
    """Our state dict as a released-layout folder (config.json + safetensors)."""
    write_folder(path, config_to_open_sora_plan(cfg), to_open_sora_plan(state, cfg))


def save_open_sora_plan_checkpoint(
    path: str | Path,
    state: dict[str, torch.Tensor],
    cfg: WFVAEConfig,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Our state dict (and optionally its EMA) as a released-layout training `.ckpt`.

    Like the original EMA (which tracks only trainable parameters), the EMA part leaves out the
    fixed Haar filters; loading fills them with the released constants.
    """
    ema = None
    if ema_state is not None:
        haar = {key for ours, _, kind in _haar_slots(cfg) for key in _haar_keys(ours, kind)}
        ema = {k: v for k, v in to_open_sora_plan(ema_state, cfg).items() if k not in haar}
    write_training_checkpoint(path, to_open_sora_plan(state, cfg), ema)
