"""The text side of a sample: caption choice, cleanup, aesthetic notice, CFG dropout, tokens."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch

from megatron_video.data.text import (
    HIGH_AESTHETIC_NOTICES,
    LOW_AESTHETIC_NOTICES,
    CaptionProcessor,
    TextConfig,
    add_aesthetic_notice,
    choose_caption,
    clean_caption,
    drop_caption,
)
from megatron_video.errors import ConfigError
from megatron_video.models.text.config import TextEncoderConfig, TextEncoderPairConfig
from megatron_video.models.text.encoders import CONTEXT, POOLED
from tests.unit.test_text_encoders import save_tiny_clip, save_tiny_t5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_choose_caption_is_uniform_and_reproducible():
    caps = ["one", "two", "three"]
    assert choose_caption("only", gen()) == "only"
    assert [choose_caption(caps, gen(9)) for _ in range(3)] == [choose_caption(caps, gen(9))] * 3
    g = gen(1)
    counts = Counter(choose_caption(caps, g) for _ in range(3000))
    assert all(abs(counts[c] / 3000 - 1 / 3) < 0.04 for c in caps)  # 4.6 sigma
    with pytest.raises(ValueError, match="empty caption list"):
        choose_caption([], g)


@pytest.mark.parametrize(
    "score, kind",
    [
        (None, None),
        (1.0, "low"),
        (4.25, "low"),
        (4.26, None),
        (5.0, None),
        (5.74, None),
        (5.75, "high"),
        (7.0, "high"),
    ],
)
def test_aesthetic_thresholds(score, kind):
    out = add_aesthetic_notice("a cat", score, gen(), is_video=True)
    if kind is None:
        assert out == "a cat"
        return
    notices = (LOW_AESTHETIC_NOTICES if kind == "low" else HIGH_AESTHETIC_NOTICES)["video"]
    assert any(out in (f"{n} a cat", f"a cat {n}") for n in notices)


def test_aesthetic_notice_placement_and_image_phrases():
    g = gen(2)
    outs = [add_aesthetic_notice("a cat", 6.0, g, is_video=False) for _ in range(2000)]
    prepended = sum(o.endswith(" a cat") for o in outs) / len(outs)
    assert abs(prepended - 0.5) < 0.05  # 4.5 sigma
    assert all(any(n in o for n in HIGH_AESTHETIC_NOTICES["image"]) for o in outs)
    assert len({o.replace("a cat", "").strip() for o in outs}) == len(HIGH_AESTHETIC_NOTICES["image"])


def test_clean_caption():
    raw = (
        "  A <b>Dog</b> &amp;amp; a cat\u2014running!\\nSee https://example.com/x?y=1 or www.site.org "
        "@someone \u201cquoted\u201d it\u2019s   fine , ok \u4e2d\u6587"
    )
    assert clean_caption(raw) == 'a dog & a cat-running! see or "quoted" it\'s fine, ok'
    assert clean_caption("Keep \u4e2d\u6587 Case", lowercase=False, keep_cjk=True) == "Keep \u4e2d\u6587 Case"
    assert clean_caption("mail me at a@b.com") == "mail me at a@b.com"


def test_fix_unicode_needs_ftfy():
    if importlib.util.find_spec("ftfy") is None:
        with pytest.raises(ConfigError, match="pip install ftfy"):
            clean_caption("caf\u00c3\u00a9", fix_unicode=True)
    else:
        assert clean_caption("caf\u00c3\u00a9", fix_unicode=True) == "caf\u00e9"


def test_caption_dropout_frequency():
    """p = 0.1 over 10000 draws: sigma 0.003, tolerance 0.012. Among dropped captions, the default
    sentence appears with default_text_ratio 0.5."""
    g, draws = gen(3), 10000
    outs = [drop_caption("a cat", g, p=0.1) for _ in range(draws)]
    assert set(outs) == {"a cat", ""} and abs(outs.count("") / draws - 0.1) < 0.012
    outs = [
        drop_caption("a cat", g, p=0.2, default_text_ratio=0.5, default_text="neutral") for _ in range(draws)
    ]
    assert abs(outs.count("neutral") / draws - 0.1) < 0.012 and abs(outs.count("") / draws - 0.1) < 0.012
    assert drop_caption("a cat", g, p=0.0) == "a cat" and drop_caption("a cat", g, p=1.0) == ""


def test_text_config_validation():
    with pytest.raises(ConfigError, match="caption_dropout"):
        TextConfig(caption_dropout=1.5).validate()
    with pytest.raises(ConfigError, match="aesthetic_low"):
        TextConfig(aesthetic_low=6.0, aesthetic_high=5.0).validate()


def test_processor_order_and_i2v_default_text():
    cfg = TextConfig(caption_dropout=0.0)
    proc = CaptionProcessor(cfg)
    # Notice, then cleanup (so the notice is lower-cased too).
    text = proc.caption(["A  <i>Red</i> Car"], gen(4), aesthetic=7.0)
    assert "a red car" in text and text == text.lower() and len(text) > len("a red car")
    i2v = CaptionProcessor(TextConfig(caption_dropout=1.0, default_text_ratio=1.0))
    assert i2v.caption("x", gen(), is_video=True) == TextConfig.default_text_video
    assert i2v.caption("x", gen(), is_video=False) == TextConfig.default_text_image
    assert proc.caption("A cat", gen(5)) == proc.caption("A cat", gen(5))


def test_tokens_with_minilm():
    proc = CaptionProcessor.from_encoders(
        TextConfig(caption_dropout=0.0),
        TextEncoderPairConfig(context=TextEncoderConfig(kind="minilm", max_length=16)),
    )
    sample = proc(["A dog on a beach"], gen())
    assert sample["caption"] == "a dog on a beach"
    tokens = sample["tokens"]
    assert set(tokens) == {CONTEXT}
    ids, mask = tokens[CONTEXT]["input_ids"], tokens[CONTEXT]["attention_mask"]
    assert ids.shape == mask.shape == (16,) and ids.dtype == mask.dtype == torch.int64
    assert mask.tolist() == [1] * 7 + [0] * 9  # [CLS] a dog on a beach [SEP]
    dropped = CaptionProcessor(TextConfig(caption_dropout=1.0), proc.tokenizers)(["A dog"], gen())
    assert dropped["caption"] == "" and dropped["tokens"][CONTEXT]["attention_mask"].sum() == 2
    batch = torch.utils.data.default_collate([sample, dropped])
    assert batch["tokens"][CONTEXT]["input_ids"].shape == (2, 16)


def test_tokens_for_t5_and_clip(tmp_path):
    encoders = TextEncoderPairConfig(
        context=TextEncoderConfig(
            kind="t5", path=str(save_tiny_t5(tmp_path / "t5", weights=False)), max_length=12
        ),
        pooled=TextEncoderConfig(
            kind="clip", path=str(save_tiny_clip(tmp_path / "clip", weights=False)), max_length=10
        ),
    )
    proc = CaptionProcessor.from_encoders(TextConfig(caption_dropout=0.0), encoders)
    tokens = proc("a dog", gen())["tokens"]
    assert set(tokens) == {CONTEXT, POOLED}
    assert tokens[CONTEXT]["input_ids"].shape == (12,) and tokens[CONTEXT]["attention_mask"].sum() == 3
    assert tokens[POOLED]["input_ids"].shape == (10,) and tokens[POOLED]["attention_mask"].sum() == 6
