"""Skiparse regrouping and joint attention against written-out references."""

from __future__ import annotations

import pytest
import torch

from megatron_video.models.common.attention import joint_skiparse_attention
from megatron_video.models.common.skiparse import (
    skiparse_padding,
    skiparse_regroup,
    skiparse_ungroup,
)


def _subsequence(n: int, k: int, group: bool) -> int:
    return (n // k) % k if group else n % k


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("n", [64, 50, 7])
def test_regroup_closed_form_and_inverse(k, group, n):
    b = 3
    padded = n + skiparse_padding(n, k)
    assert padded % (k * k) == 0 and padded - n < k * k
    idx = torch.arange(padded)[:, None].expand(padded, b) * 10 + torch.arange(b)[None, :]
    out = skiparse_regroup(idx, k, group)
    assert out.shape == (padded // k, k * b)
    for j in range(k):
        for bb in range(b):
            for s in range(padded // k):
                if group:
                    token = (s // k) * k * k + j * k + (s % k)
                else:
                    token = s * k + j
                assert out[s, j * b + bb] == token * 10 + bb
    assert torch.equal(skiparse_ungroup(out, k, group), idx)


def _dense_reference(q, k, v, tq, tk, tv, vkeep, tkeep, sparse_n, group):
    """Per sub-sequence j: full attention over [video; text] with video keys outside j masked."""
    n, b, h, d = q.shape
    L = tq.shape[0]
    allq = torch.cat([q, tq]).permute(1, 2, 0, 3)
    allk = torch.cat([k, tk]).permute(1, 2, 0, 3)
    allv = torch.cat([v, tv]).permute(1, 2, 0, 3)
    scores = allq @ allk.transpose(-1, -2) / d**0.5  # [B, h, N+L, N+L]
    sub = torch.tensor([_subsequence(i, sparse_n, group) for i in range(n)])
    out_video = torch.zeros(n, b, h, d, dtype=q.dtype)
    out_text = torch.zeros(L, b, h, d, dtype=q.dtype)
    for j in range(sparse_n):
        keep = torch.cat([vkeep & (sub == j)[None, :], tkeep], dim=1)  # [B, N+L]
        s = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        o = (s.softmax(-1) @ allv).permute(2, 0, 1, 3)  # [N+L, B, h, d]
        rows = sub == j
        out_video[rows] = o[:n][rows]
        out_text += o[n:] / sparse_n
    return out_video, out_text


@pytest.mark.parametrize("sparse_n", [1, 2, 4, 8])
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("n", [128, 75])
def test_joint_skiparse_equals_masked_dense(sparse_n, group, n):
    torch.manual_seed(sparse_n * 100 + n + group)
    b, h, d, L = 2, 3, 16, 6
    q, k, v = (torch.randn(n, b, h, d, dtype=torch.float64) for _ in range(3))
    tq, tk, tv = (torch.randn(L, b, h, d, dtype=torch.float64) for _ in range(3))
    vkeep = torch.ones(b, n, dtype=torch.bool)
    vkeep[1, n // 3 : n // 2] = False
    tkeep = torch.ones(b, L, dtype=torch.bool)
    tkeep[0, 4:] = False
    out, out_t = joint_skiparse_attention(q, k, v, tq, tk, tv, vkeep, tkeep, sparse_n, group)
    ref, ref_t = _dense_reference(q, k, v, tq, tk, tv, vkeep, tkeep, sparse_n, group)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_t, ref_t, rtol=1e-10, atol=1e-10)


def test_single_and_group_differ():
    torch.manual_seed(0)
    q, k, v = (torch.randn(64, 1, 2, 16) for _ in range(3))
    tq, tk, tv = (torch.randn(4, 1, 2, 16) for _ in range(3))
    keep_v, keep_t = torch.ones(1, 64, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    single, _ = joint_skiparse_attention(q, k, v, tq, tk, tv, keep_v, keep_t, 4, False)
    group, _ = joint_skiparse_attention(q, k, v, tq, tk, tv, keep_v, keep_t, 4, True)
    assert (single - group).abs().max() > 1e-2
