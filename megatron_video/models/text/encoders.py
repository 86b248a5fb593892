"""Frozen text encoders behind one interface: tokenize, token states, pooled vector.

Shape legend
    B captions, L tokens (the encoder's max_length; captions are padded to it), C token-state
    width, P pooled width. Masks are the tokenizer's attention masks: int64, 1 = real token.

    T5 / mT5   encode -> last_hidden_state [B, L, C] (mask passed to the encoder); no pooled
    CLIP       pooled -> text_embeds [B, P] (projected state at the end-of-text token; the release
               does not pass the mask, and causal attention makes it unnecessary there);
               encode -> last_hidden_state [B, L, C]
    MiniLM     encode -> last_hidden_state [B, L, 384]; pooled -> mean over real tokens [B, 384]

Weights and tokenizers are read only from local folders (`local_files_only=True`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from megatron_video.errors import ConfigError
from megatron_video.models.text.config import TextEncoderConfig, TextEncoderPairConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CONTEXT, POOLED = "context", "pooled"
"""Role names: keys of the token dicts exchanged between the data pipeline and `TextEncoderPair`."""


class TextTokenizer:
    """The tokenizer of one encoder, padding and truncating to its max_length (no weights loaded)."""

    def __init__(self, cfg: TextEncoderConfig):
        from transformers import AutoTokenizer

        cfg.validate()
        self.cfg = cfg
        self.max_length: int = cfg.max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(cfg.model_path()), local_files_only=True)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask, both int64 [B, max_length]."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of captions, got a single string")
        out = self.tokenizer(
            list(texts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def _load_model(cfg: TextEncoderConfig) -> nn.Module:
    import transformers

    cls_name = {
        "t5": "T5EncoderModel",
        "mt5": "MT5EncoderModel",
        "clip": "CLIPTextModelWithProjection",
        "minilm": "AutoModel",
    }[cfg.kind]
    model_cls = getattr(transformers, cls_name)
    return model_cls.from_pretrained(str(cfg.model_path()), dtype=_DTYPES[cfg.dtype], local_files_only=True)


class TextEncoder(nn.Module):
    """One frozen encoder (eval mode, no gradients) with its tokenizer."""

    def __init__(self, cfg: TextEncoderConfig, device: torch.device | str | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tokenizer = TextTokenizer(cfg)
        self.model = _load_model(cfg)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and cfg.max_length > limit:
            raise ConfigError(
                f"text encoder '{cfg.kind}' max_length={cfg.max_length} exceeds the model's "
                f"{limit} position embeddings"
            )
        self.model.requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Stays in eval mode whatever `mode` is: the encoder is frozen."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the weights are; tokens are moved there before encoding."""
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        """Token-state width C."""
        config = self.model.config
        return config.d_model if self.cfg.kind in ("t5", "mt5") else config.hidden_size

    @property
    def pooled_size(self) -> int:
        """Pooled width P (CLIP projection_dim, MiniLM hidden size)."""
        if not self.cfg.pooled:
            raise ConfigError(f"text encoder '{self.cfg.kind}' is not configured to give a pooled output")
        config = self.model.config
        return config.projection_dim if self.cfg.kind == "clip" else config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask, int64 [B, L] with L = max_length."""
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, L, C] in the encoder's dtype, and the mask [B, L] (int64, 1 = token)."""
        if not self.cfg.token_states:
            raise ConfigError(f"text encoder '{self.cfg.kind}' is not configured to give token states")
        ids_BL, mask_BL = self._inputs(tokens)
        hidden_BLC = self.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        return hidden_BLC, mask_BL

    @torch.no_grad()
    def pooled(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """One vector per caption [B, P] in the encoder's dtype."""
        if not self.cfg.pooled:
            raise ConfigError(f"text encoder '{self.cfg.kind}' is not configured to give a pooled output")
        ids_BL, mask_BL = self._inputs(tokens)
        if self.cfg.kind == "clip":
            return self.model(input_ids=ids_BL).text_embeds
        hidden_BLC = self.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        return masked_mean(hidden_BLC, mask_BL)

    def _inputs(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)


def masked_mean(hidden_BLC: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where mask is 1 -> [B, C] (sums in fp32)."""
    weights_BL1 = mask_BL.to(torch.float32).unsqueeze(-1)
    total_BC = (hidden_BLC.float() * weights_BL1).sum(1)
    return (total_BC / weights_BL1.sum(1).clamp(min=1.0)).to(hidden_BLC.dtype)


class TextEmbeddings(NamedTuple):
    """What the denoiser takes from the text: token states, their mask, and the pooled vector."""

    hidden_BLC: torch.Tensor
    mask_BL: torch.Tensor
    pooled_BP: torch.Tensor | None


def build_tokenizers(cfg: TextEncoderPairConfig) -> dict[str, TextTokenizer]:
    """Tokenizers by role ("context", and "pooled" when a separate pooled encoder is set)."""
    cfg.validate()
    tokenizers = {CONTEXT: TextTokenizer(cfg.context)}
    if cfg.pooled is not None:
        tokenizers[POOLED] = TextTokenizer(cfg.pooled)
    return tokenizers


class TextEncoderPair(nn.Module):
    """A token-state encoder plus a pooled encoder (T5-XL + CLIP-bigG), or one encoder for both.

    Tokens travel as `{role: {"input_ids": [B, L], "attention_mask": [B, L]}}` with the roles of
    `build_tokenizers`, so the data pipeline can tokenize without loading any weights. With no
    separate `pooled` encoder, the context encoder gives the pooled vector when its config says so.
    """

    def __init__(self, context: TextEncoder, pooled: TextEncoder | None = None):
        super().__init__()
        if not context.cfg.token_states:
            raise ConfigError(f"context encoder '{context.cfg.kind}' must have token_states=true")
        if pooled is not None and not pooled.cfg.pooled:
            raise ConfigError(f"pooled encoder '{pooled.cfg.kind}' must have pooled=true")
        self.context_encoder = context
        self.pooled_encoder = pooled
        self.train(False)

    @classmethod
    def from_config(
        cls, cfg: TextEncoderPairConfig, device: torch.device | str | None = None
    ) -> TextEncoderPair:
        """Load the configured encoders from their local folders."""
        cfg.validate()
        pooled = TextEncoder(cfg.pooled, device) if cfg.pooled is not None else None
        return cls(TextEncoder(cfg.context, device), pooled)

    def train(self, mode: bool = True) -> TextEncoderPair:
        """Stays in eval mode whatever `mode` is: the encoders are frozen."""
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        """Token-state width C (the denoiser's caption_channels)."""
        return self.context_encoder.hidden_size

    @property
    def pooled_size(self) -> int | None:
        """Pooled width P (the denoiser's pooled_projection_dim); None without a pooled output."""
        if self.pooled_encoder is not None:
            return self.pooled_encoder.pooled_size
        return self.context_encoder.pooled_size if self.context_encoder.cfg.pooled else None

    def tokenize(self, texts: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Tokens per role for a list of captions."""
        tokens = {CONTEXT: self.context_encoder.tokenize(texts)}
        if self.pooled_encoder is not None:
            tokens[POOLED] = self.pooled_encoder.tokenize(texts)
        return tokens

    def forward(self, tokens: dict[str, dict[str, torch.Tensor]]) -> TextEmbeddings:
        """Token states [B, L, C], mask [B, L] and pooled [B, P] (None without a pooled output)."""
        context = self.context_encoder
        hidden_BLC, mask_BL = context.encode(tokens[CONTEXT])
        pooled_BP = None
        if self.pooled_encoder is not None:
            pooled_BP = self.pooled_encoder.pooled(tokens[POOLED])
        elif context.cfg.pooled and context.cfg.kind == "minilm":
            pooled_BP = masked_mean(hidden_BLC, mask_BL)  # the states are already computed
        elif context.cfg.pooled:
            pooled_BP = context.pooled(tokens[CONTEXT])
        return TextEmbeddings(hidden_BLC, mask_BL, pooled_BP)

    def encode_texts(self, texts: Sequence[str]) -> TextEmbeddings:
        """Tokenize and encode a list of captions."""
        return self(self.tokenize(texts))


class CaptionEmbeddingCache:
    """Embeddings per caption text in front of an encode function, least recently used evicted.

    `encode(texts)` runs only on the captions not held (once per distinct caption of the call); a
    call returns the rows of its captions in order. Rows are kept as copies, so a cached caption's
    embedding is the one of the batch it was first encoded in.
    """

    def __init__(self, encode: Callable[[list[str]], TextEmbeddings], size: int):
        if size < 1:
            raise ValueError(f"cache size must be >= 1, got {size}")
        self.encode, self.size = encode, size
        self.rows: OrderedDict[str, TextEmbeddings] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, texts: Sequence[str]) -> TextEmbeddings:
        missing = [text for text in dict.fromkeys(texts) if text not in self.rows]
        if missing:
            emb = self.encode(missing)
            for i, text in enumerate(missing):
                pooled = None if emb.pooled_BP is None else emb.pooled_BP[i].clone()
                self.rows[text] = TextEmbeddings(emb.hidden_BLC[i].clone(), emb.mask_BL[i].clone(), pooled)
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        rows = []
        for text in texts:
            self.rows.move_to_end(text)
            rows.append(self.rows[text])
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)
        pooled = None if rows[0].pooled_BP is None else torch.stack([r.pooled_BP for r in rows])
        return TextEmbeddings(
            torch.stack([r.hidden_BLC for r in rows]), torch.stack([r.mask_BL for r in rows]), pooled
        )
