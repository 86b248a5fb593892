"""A deterministic stand-in for the text encoder pair, for tests that sample or train without weights."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from megatron_video.models.text.encoders import TextEmbeddings


class HashTextEncoder:
    """`encode_texts` like `TextEncoderPair`, with embeddings drawn from a generator seeded by each
    text's CRC-32: the same text gives the same embedding in every process.

    Token states [B, length, caption_channels] ~ N(0, 1); the mask keeps the first
    ceil(length / 2) + len(text) mod (length - ceil(length / 2) + 1) tokens (int64, 1 = token);
    pooled [B, pooled_dim] ~ N(0, 1), drawn after the token states.
    """

    def __init__(self, caption_channels: int, pooled_dim: int, length: int = 6):
        self.caption_channels = caption_channels
        self.pooled_dim = pooled_dim
        self.length = length

    def encode_texts(self, texts: Sequence[str]) -> TextEmbeddings:
        """Token states, mask and pooled vector for each text."""
        half = (self.length + 1) // 2
        hidden, masks, pooled = [], [], []
        for text in texts:
            gen = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            hidden.append(torch.randn(self.length, self.caption_channels, generator=gen))
            kept = half + len(text) % (self.length - half + 1)
            masks.append((torch.arange(self.length) < kept).long())
            pooled.append(torch.randn(self.pooled_dim, generator=gen))
        return TextEmbeddings(torch.stack(hidden), torch.stack(masks), torch.stack(pooled))
