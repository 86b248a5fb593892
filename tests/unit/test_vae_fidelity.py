"""WF-VAE and CausalVAE outputs equal the ORIGINAL Open-Sora-Plan code on the same weights (golden fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_video.models.causal_vae import state_dict_adapter as causal_adapter
from megatron_video.models.causal_vae.config import CausalVAEConfig
from megatron_video.models.causal_vae.model import CausalVAE
from megatron_video.models.wfvae import state_dict_adapter as wfvae_adapter
from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.model import WFVAE
from megatron_video.testing.vae import randomize_vae

FIXTURES = Path(__file__).parents[1] / "fixtures" / "open_sora_plan_vae"
CASES = json.loads((FIXTURES / "cases.json").read_text())
ATOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(case: dict):
    """Our model with the case's seeded weights, loaded through the released key layout."""
    if case["family"] == "wfvae":
        cfg, cls, adapter = WFVAEConfig.from_flavor("tiny", **case["model"]), WFVAE, wfvae_adapter
    else:
        cfg, cls, adapter = CausalVAEConfig.from_flavor("tiny", **case["model"]), CausalVAE, causal_adapter
    state = randomize_vae(cls(cfg), seed=case["seed"])
    model = cls(cfg)
    model.load_state_dict(adapter.from_open_sora_plan(adapter.to_open_sora_plan(state, cfg), cfg))
    return model.eval()


def _check(name: str, ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.shape == expected.shape, name
    diff = (ours - expected).abs().max().item()
    assert diff <= ATOL, f"{name}: max|diff| {diff:.2e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_original_code(name):
    case = CASES[name]
    model = _load(case)
    data = load_file(FIXTURES / f"{name}.safetensors")
    video = data["input.video"]
    exact_chunks = case["family"] == "wfvae" and model.cfg.norm_type == "layernorm"
    with torch.no_grad():
        for kwargs in ({"chunked": False}, {"chunked": True}) if exact_chunks else ({},):
            post = model.encode(video, **kwargs)
            _check(f"mean {kwargs}", post.mean, data["expected.mean"])
            _check(f"logvar {kwargs}", post.logvar, data["expected.logvar"])
            # The decoder alone, on the original's posterior mean (encoder differences not compounded).
            _check(
                f"decoded {kwargs}", model.decode(data["expected.mean"], **kwargs), data["expected.decoded"]
            )
        _check(
            "latents_normalized",
            model.encode_latents(video, sample=False),
            data["expected.latents_normalized"],
        )
        if "input.latents" in data:
            _check(
                "decoded_from_latents",
                model.decode_latents(data["input.latents"]),
                data["expected.decoded_from_latents"],
            )
