"""Skiparse regrouping: sparse sub-sequences of a 1-D token sequence, as extra batch entries.

The sparsity is `sparse_n` (k in the Skiparse paper; `model.sparse_n` in the config), written k
in the formulas below.
A sequence of N tokens is padded to N' = k^2 * ceil(N / k^2) and split into k sub-sequences of
N'/k tokens; sub-sequence j of sample b becomes batch entry j * B + b.

* Single-Skip: sub-sequence j holds tokens {j, j + k, j + 2k, ...}
  (position s of sub-sequence j is token s * k + j).
* Group-Skip: groups of k adjacent tokens, every k-th group:
  position n * k + r of sub-sequence m is token n * k^2 + m * k + r.

RoPE must be applied before regrouping (positions are the original 3-D coordinates).
"""

from __future__ import annotations

import torch


def skiparse_padding(num_tokens: int, sparse_n: int) -> int:
    """Tokens to append so the length is a multiple of sparse_n^2."""
    return (-num_tokens) % (sparse_n * sparse_n)


def skiparse_regroup(x_S: torch.Tensor, sparse_n: int, group: bool) -> torch.Tensor:
    """[N', B, ...] -> [N'/sparse_n, sparse_n*B, ...] (N' must be a multiple of sparse_n^2)."""
    n, b = x_S.shape[:2]
    rest = x_S.shape[2:]
    if group:
        x = x_S.reshape(n // (sparse_n * sparse_n), sparse_n, sparse_n, b, *rest)  # (n, m, r, b)
        x = x.transpose(1, 2)  # (n, r, m, b)
    else:
        x = x_S.reshape(n // sparse_n, sparse_n, b, *rest)  # (g, j, b)
    return x.reshape(n // sparse_n, sparse_n * b, *rest)


def skiparse_ungroup(x_S: torch.Tensor, sparse_n: int, group: bool) -> torch.Tensor:
    """Inverse of `skiparse_regroup`: [N'/sparse_n, sparse_n*B, ...] -> [N', B, ...]."""
    s = x_S.shape[0]
    b = x_S.shape[1] // sparse_n
    rest = x_S.shape[2:]
    if group:
        x = x_S.reshape(s // sparse_n, sparse_n, sparse_n, b, *rest)  # (n, r, m, b)
        x = x.transpose(1, 2)  # (n, m, r, b)
    else:
        x = x_S.reshape(s, sparse_n, b, *rest)  # (g, j, b)
    return x.reshape(s * sparse_n, b, *rest)


def skiparse_key_mask(keep_BN: torch.Tensor, sparse_n: int, group: bool) -> torch.Tensor:
    """Video key validity [B, N] -> [sparse_n*B, N'/sparse_n], padded keys excluded."""
    pad = skiparse_padding(keep_BN.shape[1], sparse_n)
    keep_NB = torch.nn.functional.pad(keep_BN, (0, pad), value=False).transpose(0, 1)
    return skiparse_regroup(keep_NB, sparse_n, group).transpose(0, 1)
