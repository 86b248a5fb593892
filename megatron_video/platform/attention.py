"""The one place an attention kernel is chosen.

Every kernel computes softmax(q k^T * scale + mask) v with a key-validity mask per sample (the
only mask SUV attention needs: padded video keys, masked latents and padded text tokens are
excluded from every query's softmax).

Backends: `sdpa` (torch scaled_dot_product_attention, every device), `flash` (flash-attn varlen,
CUDA), `te` (Transformer Engine DotProductAttention, CUDA), `npu` (torch_npu.npu_fusion_attention,
Ascend). Optional packages are imported when first asked for; a missing one raises an error that
says what to install or which backend to pick instead.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash", "te", "npu")


class AttentionBackendUnavailable(RuntimeError):
    """The requested attention kernel cannot run here."""


def _require(module: str, backend: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise AttentionBackendUnavailable(
            f"attention backend '{backend}' needs the '{module}' package ({install}); "
            f"install it or set runtime.attention_backend=sdpa. Import error: {e}"
        ) from e


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Turn 'auto' into a concrete backend for `device` and check the choice fits it."""
    device_type = torch.device(device).type
    if name == "auto":
        return "npu" if device_type == "npu" else "sdpa"
    if name not in BACKENDS:
        raise AttentionBackendUnavailable(f"unknown attention backend '{name}'; choose one of {BACKENDS}")
    if name in ("flash", "te") and device_type != "cuda":
        raise AttentionBackendUnavailable(
            f"attention backend '{name}' runs on CUDA devices only (tensors are on {device_type}); "
            "use runtime.attention_backend=sdpa"
        )
    if name == "npu" and device_type != "npu":
        raise AttentionBackendUnavailable(
            f"attention backend 'npu' runs on Ascend devices only (tensors are on {device_type}); "
            "use runtime.attention_backend=sdpa"
        )
    return name


def attention(
    q_BhSd: torch.Tensor,
    k_BhSd: torch.Tensor,
    v_BhSd: torch.Tensor,
    key_keep_BS: torch.Tensor | None,
    scale: float,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Attention over [B, h, S, d] tensors; `key_keep_BS` is True where a key may be attended."""
    backend = resolve_backend(backend, q_BhSd.device)
    if backend == "sdpa":
        mask = None if key_keep_BS is None else key_keep_BS[:, None, None, :]
        return F.scaled_dot_product_attention(q_BhSd, k_BhSd, v_BhSd, attn_mask=mask, scale=scale)
    if backend == "flash":
        return _flash_varlen(q_BhSd, k_BhSd, v_BhSd, key_keep_BS, scale)
    if backend == "te":
        return _transformer_engine(q_BhSd, k_BhSd, v_BhSd, key_keep_BS, scale)
    return _npu_fusion(q_BhSd, k_BhSd, v_BhSd, key_keep_BS, scale)


def _flash_varlen(q, k, v, key_keep, scale):
    """flash-attn on packed keys: drop masked keys, keep every query."""
    flash_attn = _require("flash_attn", "flash", "pip install flash-attn")
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if key_keep is None:
        key_keep = torch.ones(b, sk, dtype=torch.bool, device=q.device)
    q_packed = q.permute(0, 2, 1, 3).reshape(b * sq, h, d)
    k_tokens = k.permute(0, 2, 1, 3).reshape(b * sk, h, d)
    v_tokens = v.permute(0, 2, 1, 3).reshape(b * sk, h, d)
    keep_flat = key_keep.reshape(-1)
    k_packed, v_packed = k_tokens[keep_flat], v_tokens[keep_flat]
    k_lens = key_keep.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(k_lens, 0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    out = flash_attn.flash_attn_varlen_func(
        q_packed, k_packed, v_packed, cu_q, cu_k, sq, int(k_lens.max()), softmax_scale=scale, causal=False
    )
    return out.reshape(b, sq, h, d).permute(0, 2, 1, 3)


@functools.lru_cache(maxsize=16)
def _te_module(heads: int, head_dim: int, scale: float):
    te = _require("transformer_engine.pytorch", "te", "pip install 'megatron_video[cuda]'")
    return te.DotProductAttention(
        heads,
        head_dim,
        attention_dropout=0.0,
        qkv_format="bshd",
        attn_mask_type="padding",
        softmax_scale=scale,
    )


def _transformer_engine(q, k, v, key_keep, scale):
    """Transformer Engine fused attention with a padding mask (True = excluded in TE)."""
    b, h, sq, d = q.shape
    module = _te_module(h, d, float(scale))
    sk = k.shape[2]
    if key_keep is None:
        key_keep = torch.ones(b, sk, dtype=torch.bool, device=q.device)
    q_pad = torch.zeros(b, 1, 1, sq, dtype=torch.bool, device=q.device)
    kv_pad = ~key_keep[:, None, None, :]
    out = module(
        q.permute(0, 2, 1, 3).contiguous(),
        k.permute(0, 2, 1, 3).contiguous(),
        v.permute(0, 2, 1, 3).contiguous(),
        attention_mask=(q_pad, kv_pad),
    )
    return out.reshape(b, sq, h, d).permute(0, 2, 1, 3)


def _npu_fusion(q, k, v, key_keep, scale):
    """Ascend fused attention in BNSD layout (its mask: True = excluded)."""
    torch_npu = _require("torch_npu", "npu", "pip install 'megatron_video[npu]' on an Ascend machine")
    b, h, sq, _ = q.shape
    mask = None
    if key_keep is not None:
        mask = (~key_keep)[:, None, None, :].expand(b, 1, sq, key_keep.shape[1]).contiguous()
    return torch_npu.npu_fusion_attention(
        q, k, v, h, input_layout="BNSD", atten_mask=mask, scale=scale, keep_prob=1.0
    )[0]
