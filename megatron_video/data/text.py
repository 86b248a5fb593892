"""The text side of a training sample: pick a caption, clean it, add the aesthetic notice, drop it
for classifier-free guidance, and tokenize it for every configured encoder.

Order, as in Open-Sora-Plan v1.3: choose one caption -> aesthetic notice -> cleanup -> dropout ->
tokenize. Every random choice draws from the `torch.Generator` passed in, so a sample is
reproducible from its generator's seed.

Tokens per sample: `{role: {"input_ids": [L], "attention_mask": [L]}}` (int64) with the roles of
`megatron_video.models.text.build_tokenizers` ("context", and "pooled" when a separate pooled
encoder is configured); a default collate stacks them to the [B, L] dicts `TextEncoderPair` takes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence

import torch

from megatron_video.data.config import TextConfig
from megatron_video.errors import ConfigError
from megatron_video.models.text.config import TextEncoderPairConfig
from megatron_video.models.text.encoders import TextTokenizer, build_tokenizers

LOW_AESTHETIC_NOTICES = {
    "video": (
        "The video has low aesthetic quality.",
        "This clip looks amateurish and visually unappealing.",
        "Footage with poor composition and dull visuals.",
        "A visually unattractive, low-quality video.",
    ),
    "image": (
        "The image has low aesthetic quality.",
        "This picture looks amateurish and visually unappealing.",
        "A photo with poor composition and dull colours.",
        "A visually unattractive, low-quality image.",
    ),
}
"""Phrases added to captions whose aesthetic score is at most `TextConfig.aesthetic_low`."""

HIGH_AESTHETIC_NOTICES = {
    "video": (
        "The video has high aesthetic quality.",
        "This clip is beautifully composed and visually striking.",
        "Footage with excellent composition and appealing visuals.",
        "A visually stunning, high-quality video.",
    ),
    "image": (
        "The image has high aesthetic quality.",
        "This picture is beautifully composed and visually striking.",
        "A photo with excellent composition and appealing colours.",
        "A visually stunning, high-quality image.",
    ),
}
"""Phrases added to captions whose aesthetic score is at least `TextConfig.aesthetic_high`."""


# ---------------------------------------------------------------------------------------------
# Random draws (all from the caller's generator)


def _uniform(gen: torch.Generator | None) -> float:
    return torch.rand(1, generator=gen).item()


def _pick(items: Sequence, gen: torch.Generator | None):
    return items[int(torch.randint(len(items), (1,), generator=gen))]


# ---------------------------------------------------------------------------------------------
# Steps


def choose_caption(captions: str | Sequence[str], gen: torch.Generator | None = None) -> str:
    """One caption, uniformly at random when a sample has several."""
    if isinstance(captions, str):
        return captions
    if len(captions) == 0:
        raise ValueError("a sample has an empty caption list")
    return _pick(captions, gen)


def aesthetic_notices(score: float | None, *, is_video: bool, low: float, high: float) -> tuple[str, ...]:
    """The phrases a caption with aesthetic `score` may get: the low ones (score <= low), the high ones
    (score >= high), none when the score is None or in between."""
    if score is None or low < score < high:
        return ()
    return (LOW_AESTHETIC_NOTICES if score <= low else HIGH_AESTHETIC_NOTICES)[
        "video" if is_video else "image"
    ]


def place_notice(caption: str, notice: str, before: bool) -> str:
    """`notice` joined before or after `caption`."""
    return f"{notice} {caption}" if before else f"{caption} {notice}"


def add_aesthetic_notice(
    caption: str,
    score: float | None,
    gen: torch.Generator | None = None,
    *,
    is_video: bool = True,
    low: float = 4.25,
    high: float = 5.75,
) -> str:
    """Caption with a random low (score <= low) or high (score >= high) phrase placed before or
    after it at random; unchanged when the score is None or in between."""
    notices = aesthetic_notices(score, is_video=is_video, low=low, high=high)
    if not notices:
        return caption
    notice = _pick(notices, gen)
    return place_notice(caption, notice, before=_uniform(gen) < 0.5)


_DASHES = re.compile(r"[\u2010-\u2015\u2212\u2e3a\u2e3b\u301c\ufe58\ufe63\uff0d]+")
_DOUBLE_QUOTES = re.compile(r"[\u201c\u201d\u201e\u00ab\u00bb`\u00b4]")
_SINGLE_QUOTES = re.compile(r"[\u2018\u2019\u201a]")
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_URL = re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)
_HANDLE = re.compile(r"(?<![\w.])@\w+")
_ESCAPED_NEWLINE = re.compile(r"\\[nrt]")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"[^\W_]")


def clean_caption(
    text: str, *, lowercase: bool = True, keep_cjk: bool = False, fix_unicode: bool = False
) -> str:
    """Caption with HTML entities decoded, HTML tags, URLs and @handles removed, dash and quote
    variants unified, escaped newlines turned into spaces, and whitespace collapsed.

    Without `keep_cjk` CJK ideographs are removed, except from a caption that holds nothing else:
    removing them would leave an empty caption (the unconditional one). Such captions are counted
    when the annotations are read (`cjk_only_caption`)."""
    if fix_unicode:
        text = _ftfy_fix(text)
    text = html.unescape(html.unescape(text))
    text = _HTML_TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _HANDLE.sub(" ", text)
    text = _ESCAPED_NEWLINE.sub(" ", text)
    text = _DASHES.sub("-", text)
    text = _DOUBLE_QUOTES.sub('"', text)
    text = _SINGLE_QUOTES.sub("'", text)
    if not keep_cjk:
        without = _CJK.sub(" ", text)
        text = without if _WORD.search(without) else text
    if lowercase:
        text = text.lower()
    text = _WHITESPACE.sub(" ", text)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()


def _ftfy_fix(text: str) -> str:
    try:
        import ftfy
    except ImportError as e:
        raise ConfigError("text.fix_unicode=true needs the ftfy package: `pip install ftfy`") from e
    return ftfy.fix_text(text)


def drop_caption(
    caption: str,
    gen: torch.Generator | None = None,
    *,
    p: float,
    default_text_ratio: float = 0.0,
    default_text: str = "",
) -> str:
    """With probability p the caption is dropped: it becomes `default_text` with probability
    `default_text_ratio`, otherwise ""."""
    if _uniform(gen) >= p:
        return caption
    return default_text if _uniform(gen) < default_text_ratio else ""


# ---------------------------------------------------------------------------------------------
# The whole text side of a sample


class CaptionProcessor:
    """Turns a sample's caption field into the final string and its tokens for each encoder."""

    def __init__(self, cfg: TextConfig, tokenizers: Mapping[str, TextTokenizer] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.tokenizers = dict(tokenizers or {})

    @classmethod
    def from_encoders(cls, cfg: TextConfig, encoders: TextEncoderPairConfig) -> CaptionProcessor:
        """Processor tokenizing for the configured encoders (loads tokenizers only, no weights)."""
        return cls(cfg, build_tokenizers(encoders))

    def caption(
        self,
        captions: str | Sequence[str],
        gen: torch.Generator | None = None,
        *,
        aesthetic: float | None = None,
        is_video: bool = True,
    ) -> str:
        """The caption the model sees for this draw (possibly "" or the default sentence)."""
        cfg = self.cfg
        text = choose_caption(captions, gen)
        if cfg.aesthetic_notice:
            text = add_aesthetic_notice(
                text, aesthetic, gen, is_video=is_video, low=cfg.aesthetic_low, high=cfg.aesthetic_high
            )
        if cfg.clean:
            text = clean_caption(
                text, lowercase=cfg.lowercase, keep_cjk=cfg.keep_cjk, fix_unicode=cfg.fix_unicode
            )
        return drop_caption(
            text,
            gen,
            p=cfg.caption_dropout,
            default_text_ratio=cfg.default_text_ratio,
            default_text=cfg.default_text_video if is_video else cfg.default_text_image,
        )

    def tokenize(self, texts: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Tokens per role for a list of final captions: {role: {input_ids, attention_mask}} [B, L]."""
        return {role: tok(texts) for role, tok in self.tokenizers.items()}

    def __call__(
        self,
        captions: str | Sequence[str],
        gen: torch.Generator | None = None,
        *,
        aesthetic: float | None = None,
        is_video: bool = True,
    ) -> dict:
        """{"caption": str, "tokens": {role: {"input_ids": [L], "attention_mask": [L]}}} for one sample."""
        text = self.caption(captions, gen, aesthetic=aesthetic, is_video=is_video)
        tokens = {
            role: {key: value[0] for key, value in toks.items()}
            for role, toks in self.tokenize([text]).items()
        }
        return {"caption": text, "tokens": tokens}
