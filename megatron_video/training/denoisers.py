"""Model families behind one training stack: build, stage transitions and FLOPs per family.

`model.family` picks the denoiser: `suv` (Open-Sora-Plan v1.5, `models/suv/`) or `opensora_dit`
(the v1.2 / v1.3 DiT, `models/opensora_dit/`). Everything that differs between them in training
and sampling is decided here, so the stage runner, the sampling tool and the converter stay
family-agnostic:
- `build_model`: one model or pipeline chunk for this rank (I2V adds the inpainting conditioning,
  whose mask has the VAE temporal stride as channels);
- `transition_weights`: flat weights of an earlier stage -> the weights this stage loads (SUV:
  dense -> SUV re-staging; DiT: T2V -> I2V as the release does it), and which new modules may stay
  as built;

The I2V mask reaches every model in the v1.3 channel layout (`data.i2v_masks.compress_mask`); a v1.2
DiT converts it on entry (`v12_inpaint_mask_layout`, a forward pre-hook set by `build_model`).
"""

from __future__ import annotations

import torch

from megatron_video.config.schema import ExperimentConfig, ModelConfig, model_config_from_dict
from megatron_video.errors import ConfigError
from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.suv.config import SUVConfig

MODEL_CLASSES = {"suv": "SUVModel", "opensora_dit": "OpenSoraDiT"}
"""`model.family` -> the class a checkpoint's metadata names."""

FAMILY_OF_CLASS = {v: k for k, v in MODEL_CLASSES.items()}


def inpaint_mask_channels(cfg: ExperimentConfig, task: str) -> int | None:
    """Channels of the compressed I2V mask the model embeds (the VAE temporal stride), None for T2V."""
    if task != "i2v":
        return None
    channels = cfg.vae.strides[0]
    m = cfg.model
    if isinstance(m, OpenSoraDiTConfig) and m.version == "v1.2" and channels != m.in_channels:
        raise ConfigError(
            f"a v1.2 I2V DiT embeds the mask with its in_channels={m.in_channels} input channels, so the VAE "
            f"temporal stride ({cfg.vae.kind} {cfg.vae.flavor}: {channels}) must equal it; use the v1.2 "
            "CausalVAE (4x8x8, 4 channels) or model.version=v1.3"
        )
    return channels


def build_model(
    model_cfg: ModelConfig,
    plan,
    attention_backend: str,
    mask_channels: int | None = None,
    blocks: range | None = None,
) -> torch.nn.Module:
    """The family's model (or the pipeline chunk of `blocks`) on the CPU, as built."""
    if isinstance(model_cfg, OpenSoraDiTConfig):
        from megatron_video.models.opensora_dit.model import OpenSoraDiT

        model = OpenSoraDiT(model_cfg, plan, attention_backend, mask_channels, blocks)
        if mask_channels is not None and model_cfg.version == "v1.2":
            model.register_forward_pre_hook(_v12_mask_layout, with_kwargs=True)
        return model
    from megatron_video.models.suv.model import SUVModel

    return SUVModel(model_cfg, plan, attention_backend, inpaint_mask_channels=mask_channels, blocks=blocks)


def _v12_mask_layout(module, args, kwargs):
    """Forward pre-hook of a v1.2 I2V DiT: the shared (v1.3) compressed-mask layout -> v1.2's."""
    from megatron_video.models.opensora_dit.model import v12_inpaint_mask_layout

    mask = kwargs.get("inpaint_mask_BMTHW")
    if mask is not None:
        kwargs = {**kwargs, "inpaint_mask_BMTHW": v12_inpaint_mask_layout(mask)}
    return args, kwargs


def saved_model_config(saved: dict | None, class_name: str | None = None) -> ModelConfig | None:
    """The model config an export (`.json`) or checkpoint (metadata class + config) was made with."""
    if saved is None:
        return None
    fields = dict(saved)
    if class_name is not None and "family" not in fields:
        fields["family"] = FAMILY_OF_CLASS.get(class_name, "suv")
    return model_config_from_dict(fields, "saved model")


def transition_weights(
    full: dict[str, torch.Tensor],
    prev: ModelConfig | None,
    cfg: ExperimentConfig,
    fresh_state: dict[str, torch.Tensor],
    source: str,
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """(weights to load, prefixes of modules that may stay as built) for a stage starting from `full`.

    `prev`: the config the weights were saved with (None: assume this stage's); `fresh_state`: this
    rank's freshly built state (chunks merged), for tensors a transition initialises as built.
    """
    model = cfg.model
    if prev is not None and prev.family != model.family:
        raise ConfigError(
            f"training.checkpoint.init_from={source} holds a model.family={prev.family} model but this stage "
            f"trains model.family={model.family}; start from weights of the same family"
        )
    if isinstance(model, SUVConfig):
        from megatron_video.models.suv.state_dict_adapter import convert_dense_to_suv

        if prev is not None and (
            prev.num_layers != model.num_layers or prev.skip_connection != model.skip_connection
        ):
            if prev.skip_connection:
                raise ConfigError(
                    f"cannot re-stage {source}: it already has U-skips ({prev.num_layers}); only a dense "
                    "model without skips converts to a new stage layout"
                )
            full = convert_dense_to_suv(full, prev, model, _State(fresh_state))
        return full, ("inpaint.", "skip_linears", "skip_norms")
    if prev is not None:
        fixed = MODEL_FIELDS_FIXED_BY_WEIGHTS
        diffs = [
            f"model.{k}: weights {getattr(prev, k)!r}, this stage {getattr(model, k)!r}"
            for k in fixed
            if getattr(prev, k) != getattr(model, k)
        ]
        if diffs:
            raise ConfigError(f"{source} does not fit this stage's model: " + "; ".join(diffs))
    inpaint_new = any(k.startswith("inpaint.") for k in fresh_state) and not any(
        k.startswith("inpaint.") for k in full
    )
    if inpaint_new:  # T2V -> I2V as the release does it
        from megatron_video.models.opensora_dit.state_dict_adapter import init_i2v_from_t2v

        fresh = {k: v for k, v in fresh_state.items() if k.startswith("inpaint.")}
        full = {**full, **init_i2v_from_t2v(full, fresh, load_mask=model.version == "v1.2")}
    return full, ()


MODEL_FIELDS_FIXED_BY_WEIGHTS = (
    "version",
    "num_layers",
    "num_heads",
    "head_dim",
    "in_channels",
    "out_channels",
    "patch_size",
    "caption_channels",
    "timestep_freq_dim",
    "ff_mult",
    "attention_bias",
)
"""DiT fields a stage cannot change from its init_from weights (Skiparse, RoPE scales, recompute may)."""


class _State:
    """A fixed state dict where a conversion asks for a model's `state_dict()`."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state
