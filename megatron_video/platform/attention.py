"""The one place an attention kernel is chosen.

Every kernel computes softmax(q k^T * scale + mask) v with a key-validity mask per sample (the
only mask SUV attention needs: padded video keys, masked latents and padded text tokens are
excluded from every query's softmax). A mask of None means every key is valid; callers pass None
then (`drop_full_masks` turns all-valid masks into None once per forward), so that the kernels
that take no mask can run.

Backends: `sdpa` (torch scaled_dot_product_attention, every device), `flash` (flash-attn varlen,
CUDA), `te` (Transformer Engine DotProductAttention, CUDA), `npu` (torch_npu.npu_fusion_attention,
Ascend). Optional packages are imported when first asked for; a missing one raises an error that
says what to install or which backend to pick instead.

`auto` is resolved per call from the device, the dtype and whether a mask is passed:
- Ascend: `npu`;
- CUDA, no mask: `sdpa` (torch then picks its flash / cuDNN kernels, which take no mask);
- CUDA, masked keys, bf16 / fp16: `flash` when flash-attn imports, else `te` when Transformer
  Engine imports, else `sdpa` (whose masked path is the memory-efficient kernel);
- anything else (CPU, fp32): `sdpa`.
`candidate_backends(device)` lists what can run on a device, for measuring them side by side.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash", "te", "npu")

_PACKAGES = {"flash": "flash_attn", "te": "transformer_engine.pytorch", "npu": "torch_npu"}
"""Backend -> the module it imports."""

_HALF_DTYPES = (torch.bfloat16, torch.float16)
"""What the flash-attn and Transformer Engine fused kernels compute in."""

_FLASH_MAX_HEAD_DIM = 256
"""The largest head dimension flash-attn's kernels take."""


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


@functools.cache
def backend_importable(backend: str) -> bool:
    """Whether the package of `backend` imports here (sdpa: always); asked once per process."""
    module = _PACKAGES.get(backend)
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _device_type(device: torch.device | str) -> str:
    """'cuda' for torch.device('cuda', 0) or 'cuda:0' (works for 'npu' without torch_npu loaded)."""
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def check_backend(name: str, device: torch.device | str) -> None:
    """Raise AttentionBackendUnavailable if backend `name` ('auto' or one of BACKENDS) cannot run on `device`."""
    device_type = _device_type(device)
    if name == "auto":
        return
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


def resolve_backend(
    name: str,
    device: torch.device | str,
    masked: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 64,
) -> str:
    """The concrete backend for one call: `name` checked against `device`, or what `auto` picks for
    this device, dtype, head dimension and mask (None mask: `masked=False`); see the module docstring."""
    check_backend(name, device)
    if name != "auto":
        return name
    device_type = _device_type(device)
    if device_type == "npu":
        return "npu"
    if device_type != "cuda" or not masked or dtype not in _HALF_DTYPES:
        return "sdpa"
    if head_dim <= _FLASH_MAX_HEAD_DIM and head_dim % 8 == 0 and backend_importable("flash"):
        return "flash"
    if backend_importable("te"):
        return "te"
    return "sdpa"


def candidate_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on `device` here (their packages import), `sdpa` first."""
    device_type = _device_type(device)
    wanted = {"cuda": ("flash", "te"), "npu": ("npu",)}.get(device_type, ())
    return ["sdpa", *(b for b in wanted if backend_importable(b))]


def drop_full_masks(*keeps_BS: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each key mask [B, S] (True = valid) as it is, or None when every key in it is valid (or it is None).

    Reads the masks' values: free on the CPU, one device synchronisation for all of them otherwise,
    so models call it once per forward on the masks they were given, never per attention call.
    """
    given = [k for k in keeps_BS if k is not None]
    if not given:
        return tuple(keeps_BS)
    full = iter(torch.stack([k.all() for k in given]).tolist())
    return tuple(None if k is None or next(full) else k for k in keeps_BS)


def attention(
    q_BhSd: torch.Tensor,
    k_BhSd: torch.Tensor,
    v_BhSd: torch.Tensor,
    key_keep_BS: torch.Tensor | None,
    scale: float,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Attention over [B, h, S, d] tensors; `key_keep_BS` [B, S] is True where a key may be attended
    (None: every key). `backend` is one of BACKENDS or 'auto' (resolved for this call)."""
    backend = resolve_backend(backend, q_BhSd.device, key_keep_BS is not None, q_BhSd.dtype, q_BhSd.shape[-1])
    if backend == "sdpa":
        mask = None if key_keep_BS is None else key_keep_BS[:, None, None, :]
        return F.scaled_dot_product_attention(q_BhSd, k_BhSd, v_BhSd, attn_mask=mask, scale=scale)
    if backend == "flash":
        return _flash_varlen(q_BhSd, k_BhSd, v_BhSd, key_keep_BS, scale)
    if backend == "te":
        return _transformer_engine(q_BhSd, k_BhSd, v_BhSd, key_keep_BS, scale)
    return _npu_fusion(q_BhSd, k_BhSd, v_BhSd, key_keep_BS, scale)


def _flash_varlen(q, k, v, key_keep, scale):
    """flash-attn; with a mask on packed keys (masked keys dropped, every query kept)."""
    flash_attn = _require("flash_attn", "flash", "pip install flash-attn")
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if key_keep is None:
        q_, k_, v_ = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # [B, S, h, d]
        return flash_attn.flash_attn_func(q_, k_, v_, softmax_scale=scale, causal=False).permute(0, 2, 1, 3)
    q_packed = q.permute(0, 2, 1, 3).reshape(b * sq, h, d)
    k_tokens = k.permute(0, 2, 1, 3).reshape(b * sk, h, d)
    v_tokens = v.permute(0, 2, 1, 3).reshape(b * sk, h, d)
    keep_flat = key_keep.reshape(-1)
    k_packed, v_packed = k_tokens[keep_flat], v_tokens[keep_flat]  # one synchronisation (the count)
    k_lens = key_keep.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(k_lens, 0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    # max_seqlen_k only sizes the launch grid; the padded length bounds it without reading k_lens.
    out = flash_attn.flash_attn_varlen_func(
        q_packed, k_packed, v_packed, cu_q, cu_k, sq, sk, softmax_scale=scale, causal=False
    )
    return out.reshape(b, sq, h, d).permute(0, 2, 1, 3)


@functools.lru_cache(maxsize=16)
def _te_module(heads: int, head_dim: int, scale: float, padding: bool):
    te = _require("transformer_engine.pytorch", "te", "pip install 'megatron_video[cuda]'")
    return te.DotProductAttention(
        heads,
        head_dim,
        attention_dropout=0.0,
        qkv_format="bshd",
        attn_mask_type="padding" if padding else "no_mask",
        softmax_scale=scale,
    )


def _transformer_engine(q, k, v, key_keep, scale):
    """Transformer Engine fused attention, with a padding mask when keys are masked (True = excluded in TE)."""
    b, h, sq, d = q.shape
    module = _te_module(h, d, float(scale), key_keep is not None)
    mask = None
    if key_keep is not None:
        q_pad = torch.zeros(b, 1, 1, sq, dtype=torch.bool, device=q.device)
        mask = (q_pad, ~key_keep[:, None, None, :])
    out = module(
        q.permute(0, 2, 1, 3).contiguous(),
        k.permute(0, 2, 1, 3).contiguous(),
        v.permute(0, 2, 1, 3).contiguous(),
        attention_mask=mask,
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
