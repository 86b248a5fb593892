"""Open-Sora-Plan v1.5 SUV checkpoints <-> our SUV state dict.

The released layout is the flat predictor state dict written by Open-Sora-Plan's
`convert_mm_to_ckpt.py` (`model.pt` / `model_ema.pt`): `transformer_blocks.<stage>.<i>.attn1.to_q`
and so on. Ours fuses q/k/v per modality with rows laid out [head, (q, k, v), head_dim], which a
tensor-parallel split cuts into whole heads.

Tensor-parallel shards of the released layout (Megatron `mp_rank_XX` files) follow section 1.4 of
the reference: concat on dim 0 for q/k/v, FFN up-projections and AdaLN linears, on dim 1 for
attention outputs and FFN down-projections; everything else is replicated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from megatron_video.errors import CheckpointMismatch
from megatron_video.models.suv.config import SUVConfig

# Our block-relative name -> released block-relative name, for one-to-one tensors.
_BLOCK_RENAMES = {
    "norm1.linear": "norm1.linear",
    "norm1_video": "norm1.norm",
    "norm1_text": "norm1.norm_enc",
    "attn.q_layernorm": "attn1.norm_q",
    "attn.k_layernorm": "attn1.norm_k",
    "attn.added_q_layernorm": "attn1.norm_added_q",
    "attn.added_k_layernorm": "attn1.norm_added_k",
    "attn.linear_proj": "attn1.to_out.0",
    "attn.linear_added_proj": "attn1.to_add_out",
    "norm2.linear": "norm2.linear",
    "norm2_video": "norm2.norm",
    "norm2_text": "norm2.norm_enc",
    "ff.linear_fc1": "ff.net.0.proj",
    "ff.linear_fc2": "ff.net.2",
    "ff_text.linear_fc1": "ff_enc.net.0.proj",
    "ff_text.linear_fc2": "ff_enc.net.2",
}
_FUSED = {
    "attn.linear_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.linear_added_qkv": ("attn1.add_q_proj", "attn1.add_k_proj", "attn1.add_v_proj"),
}
_TOP_RENAMES = {
    "norm_final": "norm_final",
    "norm_out.linear": "norm_out.linear",
    "norm_out_norm": "norm_out.norm",
    "proj_out": "proj_out",
    "caption_projection": "caption_projection",
    "patch_embed.proj": "patch_embed.proj",
}
# Released keys that exist only in models built with TP > 1 on the context-pre-only last block.
_TP_ONLY_LAST_BLOCK = ("attn1.to_add_out.", "norm2.norm_enc.", "ff_enc.")

# Released tensor-parallel split rule (reference section 1.4).
_OSP_DIM0 = re.compile(
    r"(attn1\.(to_[qkv]|add_[qkv]_proj)\.(weight|bias)|net\.0\.proj\.(weight|bias)|(^|\.)linear\.(weight|bias))$"
)
_OSP_DIM1 = re.compile(r"(attn1\.to_out\.0\.weight|attn1\.to_add_out\.weight|net\.2\.weight)$")


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Three [h*d, ...] tensors -> [h*3*d, ...] laid out per head."""
    parts = [t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)]
    fused = torch.stack(parts, dim=1)  # [h, 3, d, ...]
    return fused.reshape(-1, *q.shape[1:])


def _split_qkv(fused: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `_fuse_qkv`."""
    parts = fused.reshape(heads, 3, -1, *fused.shape[1:]).unbind(dim=1)
    return tuple(p.reshape(-1, *fused.shape[1:]).contiguous() for p in parts)  # type: ignore[return-value]


def _block_prefixes(cfg: SUVConfig) -> Iterable[tuple[str, str, bool]]:
    last = len(cfg.num_layers) - 1
    for s, n in enumerate(cfg.num_layers):
        for i in range(n):
            yield f"stages.{s}.{i}.", f"transformer_blocks.{s}.{i}.", (s == last and i == n - 1)


def _skip_names(cfg: SUVConfig) -> Iterable[tuple[str, str]]:
    if not cfg.skip_connection:
        return
    for j in range(len(cfg.num_layers) // 2):
        for ours, theirs in (
            ("skip_linears", "skip_norm_linear"),
            ("skip_linears_text", "skip_norm_linear_enc"),
        ):
            yield f"{ours}.{j}.", f"{theirs}.{j}.1."
            if not cfg.skip_connection_zero_init:
                norm = ours.replace("linears", "norms")
                yield f"{norm}.{j}.", f"{theirs}.{j}.0."


def _name_map(cfg: SUVConfig) -> dict[str, str]:
    """Our prefix -> released prefix for every one-to-one tensor group."""
    mapping = {f"{k}.": f"{v}." for k, v in _TOP_RENAMES.items()}
    mapping["time_text_embed."] = "time_text_embed."
    for ours, theirs, last in _block_prefixes(cfg):
        for k, v in _BLOCK_RENAMES.items():
            if last and (k.startswith(("ff_text", "norm2_text", "attn.linear_added_proj"))):
                continue
            if not cfg.double_ff and k.startswith(("ff_text", "norm2_text")):
                continue
            mapping[ours + k + "."] = theirs + v + "."
    mapping.update(dict(_skip_names(cfg)))
    return mapping


def expected_open_sora_plan_keys(cfg: SUVConfig) -> set[str]:
    """Every tensor name a released-layout checkpoint of `cfg` holds (TP = 1 build)."""
    keys = set()
    for ours, theirs in _name_map(cfg).items():
        if ours == "time_text_embed.":
            for emb in ("timestep_embedder", "text_embedder"):
                for lin in ("linear_1", "linear_2"):
                    keys |= {f"{theirs}{emb}.{lin}.{s}" for s in ("weight", "bias")}
            continue
        rel = ours.split(".", 3)[-1] if ours.startswith("stages.") else ours
        no_bias = rel.startswith(("ff.", "ff_text.")) or "layernorm" in rel  # FFNs and QK-norms
        no_bias |= rel.startswith(("attn.linear_proj", "attn.linear_added_proj")) and not cfg.attention_bias
        suffixes = ("weight",) if no_bias else ("weight", "bias")
        keys |= {theirs + s for s in suffixes}
    for _, theirs_block, _ in _block_prefixes(cfg):
        for names in _FUSED.values():
            for n in names:
                keys |= {
                    f"{theirs_block}{n}.{s}"
                    for s in (("weight", "bias") if cfg.attention_bias else ("weight",))
                }
    return keys


def to_open_sora_plan(state: dict[str, torch.Tensor], cfg: SUVConfig) -> dict[str, torch.Tensor]:
    """Our full (TP = 1) state dict -> the released flat layout."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {}
    prefixes = sorted(_name_map(cfg).items(), key=lambda kv: -len(kv[0]))
    for key, tensor in state.items():
        fused = _match_fused(key, cfg)
        if fused is not None:
            theirs_prefix, suffix, names = fused
            for name, part in zip(names, _split_qkv(tensor, cfg.num_heads)):
                out[f"{theirs_prefix}{name}.{suffix}"] = part
            continue
        for ours, theirs in prefixes:
            if key.startswith(ours):
                out[theirs + key[len(ours) :]] = tensor.clone()
                break
        else:
            raise CheckpointMismatch(f"no Open-Sora-Plan name for our key '{key}'")
    return out


def _match_fused(key: str, cfg: SUVConfig):
    for ours_block, theirs_block, _ in _block_prefixes(cfg):
        if not key.startswith(ours_block):
            continue
        rel = key[len(ours_block) :]
        for fused_name, names in _FUSED.items():
            if rel.startswith(fused_name + "."):
                return theirs_block, rel[len(fused_name) + 1 :], names
    return None


def from_open_sora_plan(
    released: dict[str, torch.Tensor], cfg: SUVConfig, strict: bool = True
) -> dict[str, torch.Tensor]:
    """The released flat layout -> our full (TP = 1) state dict.

    Keys that only TP > 1 builds of the release create on the last block are dropped. With
    `strict`, any other unknown or missing key raises CheckpointMismatch listing them all.
    """
    released = dict(released)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    given = set(released)
    for ours_block, theirs_block, last in _block_prefixes(cfg):
        if last:
            for extra in _TP_ONLY_LAST_BLOCK:
                for key in [k for k in released if k.startswith(theirs_block + extra)]:
                    released.pop(key)
        for fused_name, names in _FUSED.items():
            for suffix in ("weight", "bias") if cfg.attention_bias else ("weight",):
                keys = [f"{theirs_block}{n}.{suffix}" for n in names]
                if all(k in released for k in keys):
                    parts = [released.pop(k) for k in keys]
                    out[f"{ours_block}{fused_name}.{suffix}"] = _fuse_qkv(*parts, cfg.num_heads)
                else:
                    missing += [k for k in keys if k not in released]
    mapping = sorted(((v, k) for k, v in _name_map(cfg).items()), key=lambda kv: -len(kv[0]))
    unexpected = []
    for key, tensor in released.items():
        for theirs, ours in mapping:
            if key.startswith(theirs):
                out[ours + key[len(theirs) :]] = tensor
                break
        else:
            unexpected.append(key)
    missing = sorted(set(missing) | {k for k in expected_open_sora_plan_keys(cfg) if k not in given})
    if strict and (missing or unexpected):
        raise CheckpointMismatch(
            "Open-Sora-Plan checkpoint does not match the SUV config:"
            + (f"\n  missing: {sorted(missing)}" if missing else "")
            + (f"\n  unexpected: {sorted(unexpected)}" if unexpected else "")
        )
    return out


def check_against_model(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise CheckpointMismatch naming every missing, unexpected or wrongly shaped tensor."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    given = {k: v.shape for k, v in state.items() if not k.endswith("_extra_state")}
    problems = [f"missing: {k} {tuple(s)}" for k, s in expected.items() if k not in given]
    problems += [f"unexpected: {k} {tuple(s)}" for k, s in given.items() if k not in expected]
    problems += [
        f"shape: {k} checkpoint {tuple(given[k])} vs model {tuple(s)}"
        for k, s in expected.items()
        if k in given and tuple(given[k]) != tuple(s)
    ]
    if problems:
        raise CheckpointMismatch("state dict does not fit the model:\n  " + "\n  ".join(problems))


def osp_tp_split_dim(key: str) -> int | None:
    """Dimension the released layout splits `key` along under tensor parallel (None: replicated)."""
    if _OSP_DIM1.search(key):
        return 1
    if _OSP_DIM0.search(key):
        return 0
    return None


def merge_open_sora_plan_tp(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge released-layout TP shards (rank order) into one flat state dict."""
    out = {}
    for key, tensor in shards[0].items():
        dim = osp_tp_split_dim(key)
        out[key] = tensor.clone() if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return out


def split_open_sora_plan_tp(
    state: dict[str, torch.Tensor], tensor_parallel: int
) -> list[dict[str, torch.Tensor]]:
    """Split a flat released-layout state dict into `tensor_parallel` shards."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tensor_parallel)]
    for key, tensor in state.items():
        dim = osp_tp_split_dim(key)
        parts = [tensor] * tensor_parallel if dim is None else list(tensor.chunk(tensor_parallel, dim=dim))
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def convert_dense_to_suv(
    dense: dict[str, torch.Tensor], dense_cfg: SUVConfig, suv_cfg: SUVConfig, model_for_skips
) -> dict[str, torch.Tensor]:
    """Re-stage a dense MMDiT (no skips) into the SUV layout with identity-initialised skips.

    Blocks keep their global order; the new long skips are [I | 0], so with the same sparsity the
    converted model computes exactly what the dense one did. `model_for_skips` is an SUV model of
    `suv_cfg` whose freshly initialised skip tensors are copied in.
    """
    if dense_cfg.total_layers != suv_cfg.total_layers:
        raise ValueError(
            f"dense model has {dense_cfg.total_layers} blocks, SUV config {suv_cfg.total_layers}; they must match"
        )
    old = [f"stages.{s}.{i}." for s, n in enumerate(dense_cfg.num_layers) for i in range(n)]
    new = [f"stages.{s}.{i}." for s, n in enumerate(suv_cfg.num_layers) for i in range(n)]
    renames = dict(zip(old, new))
    out = {}
    for key, tensor in dense.items():
        if key.endswith("_extra_state") or key.startswith(("skip_linears", "skip_norms")):
            continue
        prefix = next((p for p in old if key.startswith(p)), None)
        out[key if prefix is None else renames[prefix] + key[len(prefix) :]] = tensor.clone()
    for key, tensor in model_for_skips.state_dict().items():
        if key.startswith(("skip_linears", "skip_norms")):
            out[key] = tensor.clone()
    return out
