"""Attention kernel choice: which backend `auto` picks for a device, dtype, mask and installed packages,
and that leaving out an all-valid mask changes no number."""

from __future__ import annotations

import pytest
import torch

from megatron_video.models.common.attention import joint_skiparse_attention
from megatron_video.models.opensora_dit.model import skiparse_self_attention
from megatron_video.platform import attention as dispatch
from megatron_video.platform.attention import (
    AttentionBackendUnavailable,
    attention,
    candidate_backends,
    check_backend,
    drop_full_masks,
    resolve_backend,
)


@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly the given optional packages import (only inside the test using it)."""

    def set_installed(*backends):
        monkeypatch.setattr(dispatch, "backend_importable", lambda b: b == "sdpa" or b in backends)

    return set_installed


@pytest.mark.parametrize(
    "packages, device, dtype, masked, head_dim, expected",
    [
        # No mask: torch SDPA everywhere but Ascend (on CUDA it then runs its flash / cuDNN kernels).
        (("flash", "te"), "cuda", torch.bfloat16, False, 64, "sdpa"),
        ((), "cpu", torch.float32, False, 64, "sdpa"),
        (("npu",), "npu", torch.bfloat16, False, 64, "npu"),
        # Masked keys on CUDA in half precision: flash-attn, then Transformer Engine, then SDPA.
        (("flash", "te"), "cuda", torch.bfloat16, True, 64, "flash"),
        (("flash",), "cuda", torch.float16, True, 128, "flash"),
        (("te",), "cuda", torch.bfloat16, True, 64, "te"),
        ((), "cuda", torch.bfloat16, True, 64, "sdpa"),
        # flash-attn takes head dims up to 256 (multiples of 8); Transformer Engine steps in.
        (("flash", "te"), "cuda", torch.bfloat16, True, 512, "te"),
        (("flash",), "cuda", torch.bfloat16, True, 72 + 4, "sdpa"),
        # The fused kernels compute in half precision only: fp32 stays on SDPA.
        (("flash", "te"), "cuda", torch.float32, True, 64, "sdpa"),
        # CPU and Ascend never pick a CUDA package, masked or not.
        (("flash", "te"), "cpu", torch.bfloat16, True, 64, "sdpa"),
        (("flash", "te", "npu"), "npu", torch.bfloat16, True, 64, "npu"),
    ],
)
def test_auto_picks_by_device_dtype_mask_and_packages(
    installed, packages, device, dtype, masked, head_dim, expected
):
    installed(*packages)
    assert resolve_backend("auto", device, masked, dtype, head_dim) == expected


def test_explicit_backends_are_checked_against_the_device(installed):
    installed("flash", "te")
    assert resolve_backend("te", "cuda", masked=False) == "te"  # an explicit choice is kept
    assert resolve_backend("sdpa", "cuda", masked=True) == "sdpa"
    for name, device in (("flash", "cpu"), ("te", "npu"), ("npu", "cuda")):
        with pytest.raises(AttentionBackendUnavailable, match="runs on"):
            check_backend(name, device)
    with pytest.raises(AttentionBackendUnavailable, match="unknown attention backend 'xformers'"):
        resolve_backend("xformers", "cpu")
    check_backend("auto", "cpu")  # resolved per call, so always accepted


def test_candidates_list_what_imports_on_the_device(installed):
    installed("flash", "te")
    assert candidate_backends("cuda") == ["sdpa", "flash", "te"]
    assert candidate_backends("cpu") == ["sdpa"]
    installed("te", "npu")
    assert candidate_backends(torch.device("cuda", 0)) == ["sdpa", "te"]
    assert candidate_backends("npu") == ["sdpa", "npu"]
    installed()
    assert candidate_backends("cuda") == ["sdpa"]


def test_candidates_here_are_real():
    """Without mocking: this machine's list starts with sdpa and names only known backends."""
    here = candidate_backends("cpu")
    assert here == ["sdpa"]
    assert set(candidate_backends("cuda")) <= set(dispatch.BACKENDS)


def test_drop_full_masks_keeps_only_masks_with_an_invalid_key():
    full = torch.ones(2, 5, dtype=torch.bool)
    partial = full.clone()
    partial[1, 3] = False
    a, b, c = drop_full_masks(full, None, partial)
    assert a is None and b is None and c is partial
    assert drop_full_masks(None, None) == (None, None)


def _qkv(b, h, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(3)]


def test_no_mask_equals_an_all_true_mask_and_a_mask_excludes_keys():
    q, k, v = _qkv(2, 3, 7, 8, 0)
    keep = torch.ones(2, 7, dtype=torch.bool)
    unmasked = attention(q, k, v, None, 8**-0.5, "auto")
    torch.testing.assert_close(unmasked, attention(q, k, v, keep, 8**-0.5, "auto"), rtol=1e-12, atol=1e-12)
    keep[0, 4:] = False  # sample 0 attends keys 0..3 only: the same as cutting them off
    masked = attention(q, k, v, keep, 8**-0.5, "auto")
    cut = attention(q[:1], k[:1, :, :4], v[:1, :, :4], None, 8**-0.5, "auto")
    torch.testing.assert_close(masked[:1], cut, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked[1:], unmasked[1:], rtol=1e-12, atol=1e-12)
    assert (masked[0] - unmasked[0]).abs().max() > 1e-3


@pytest.mark.parametrize("n", [16, 13])  # 13 tokens: Skiparse pads to 16, and the padding is masked
@pytest.mark.parametrize("sparse_n, group", [(1, False), (2, False), (2, True)])
def test_skiparse_attention_with_none_masks_equals_all_true_masks(n, sparse_n, group):
    g = torch.Generator().manual_seed(1)
    b, h, d, num_text = 2, 2, 8, 5
    video = [torch.randn(n, b, h, d, generator=g, dtype=torch.float64) for _ in range(3)]
    text = [torch.randn(num_text, b, h, d, generator=g, dtype=torch.float64) for _ in range(3)]
    vkeep, tkeep = torch.ones(b, n, dtype=torch.bool), torch.ones(b, num_text, dtype=torch.bool)
    expected = joint_skiparse_attention(*video, *text, vkeep, tkeep, sparse_n, group, "auto")
    for masks in ((None, None), (vkeep, None), (None, tkeep)):
        got = joint_skiparse_attention(*video, *text, *masks, sparse_n, group, "auto")
        for e, o in zip(expected, got):
            torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        skiparse_self_attention(*video, None, sparse_n, group, "auto"),
        skiparse_self_attention(*video, vkeep, sparse_n, group, "auto"),
        rtol=1e-12,
        atol=1e-12,
    )


def test_models_give_the_same_output_with_all_valid_masks_or_none(megatron_single):
    """SUV and the v1.3 DiT: all-ones video / text masks take the unmasked path, with equal outputs;
    a mask with an invalid key changes them."""
    from megatron_video.testing.models import build_model, random_inputs, randomize, tiny_config
    from megatron_video.testing.opensora_dit import build_dit, random_dit_inputs, tiny_dit_config

    suv_cfg, dit_cfg = tiny_config(), tiny_dit_config()
    suv, dit = build_model(suv_cfg, backend="auto"), build_dit(dit_cfg)
    randomize(suv, seed=3)
    randomize(dit, seed=4)
    cases = [
        (suv, random_inputs(suv_cfg, 2, 2, 4, 6, 8, masks=False)),
        (dit, random_dit_inputs(dit_cfg, 2, 2, 4, 6, 8, masks=False)),
    ]
    for model, inputs in cases:
        b, _, t, h, w = inputs["latents_BCTHW"].shape
        ones = dict(text_mask_BL=torch.ones(b, 8), video_mask_BTHW=torch.ones(b, t, h, w))
        with torch.no_grad():
            unmasked = model(**inputs)
            torch.testing.assert_close(model(**inputs, **ones), unmasked, rtol=0, atol=0)
            ones["text_mask_BL"][1, 4:] = 0
            assert (model(**inputs, **ones) - unmasked).abs().max() > 1e-4
