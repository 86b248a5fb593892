"""CaptionEmbeddingCache: the encoder runs once per distinct caption, rows come back in the call's
order and equal to a direct encoding, least recently used captions are evicted; text.cache_size is
validated."""

from __future__ import annotations

import pytest
import torch

from megatron_video.errors import ConfigError
from megatron_video.models.text.config import TextEncoderPairConfig
from megatron_video.models.text.encoders import CaptionEmbeddingCache
from megatron_video.testing.text import HashTextEncoder


def test_cache_encodes_each_caption_once_and_returns_rows_in_order():
    encoder = HashTextEncoder(caption_channels=5, pooled_dim=3)
    calls: list[list[str]] = []

    def encode(texts):
        calls.append(list(texts))
        return encoder.encode_texts(texts)

    cache = CaptionEmbeddingCache(encode, size=3)
    batch = ["a cat", "", "a cat", "a dog"]
    got = cache(batch)
    want = encoder.encode_texts(batch)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert calls == [["a cat", "", "a dog"]] and (cache.hits, cache.misses) == (1, 3)

    cache(["a dog", "a cow"])  # "a cow" is new: the least recently used caption ("") goes
    assert calls[-1] == ["a cow"] and list(cache.rows) == ["a cat", "a dog", "a cow"]
    cache([""])  # encoded again; now "a cat" is the least recently used
    assert calls[-1] == [""] and list(cache.rows) == ["a dog", "a cow", ""]


def test_cache_keeps_no_pooled_vector_when_the_encoder_has_none():
    def encode(texts):
        emb = HashTextEncoder(caption_channels=4, pooled_dim=2).encode_texts(texts)
        return emb._replace(pooled_BP=None)

    got = CaptionEmbeddingCache(encode, size=2)(["x", "y", "x"])
    assert (
        got.pooled_BP is None
        and got.hidden_BLC.shape[0] == 3
        and torch.equal(got.hidden_BLC[0], got.hidden_BLC[2])
    )


def test_cache_size_is_validated():
    with pytest.raises(ConfigError, match="text.cache_size must be >= 0"):
        TextEncoderPairConfig(cache_size=-1).validate(check_files=False)
    with pytest.raises(ValueError, match="cache size must be >= 1"):
        CaptionEmbeddingCache(lambda texts: None, size=0)
