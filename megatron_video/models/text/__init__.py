"""Frozen text encoders (T5, mT5, CLIP, MiniLM) behind one interface."""

from megatron_video.models.text.config import TextEncoderConfig, TextEncoderPairConfig
from megatron_video.models.text.encoders import (
    CONTEXT,
    POOLED,
    TextEmbeddings,
    TextEncoder,
    TextEncoderPair,
    TextTokenizer,
    build_tokenizers,
    masked_mean,
)

__all__ = [
    "CONTEXT",
    "POOLED",
    "TextEmbeddings",
    "TextEncoder",
    "TextEncoderConfig",
    "TextEncoderPair",
    "TextEncoderPairConfig",
    "TextTokenizer",
    "build_tokenizers",
    "masked_mean",
]
